"""Whole-run behaviour: parallel participants into one output directory, resume after a kill.

Runs the real command and the real workflows (anatomy, bSSFP, ROI) with
``--methods bssfp:miracle`` on the smallest realistic dataset: ``bids_qmri-synth`` at 8 mm,
4 phase cycles, only the kinds the run uses (bSSFP, TB1TFL, T1w). The anatomy workflow
registers to MNI and runs Atropos, which needs a brain-like image, not a toy ellipsoid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bids_qmri.utils.atomic import leftover_temporaries
from helpers import validate_bids

pytestmark = pytest.mark.slow


def _command(*args):
    return [sys.executable, "-m", "bids_qmri.cli.run", *map(str, args)]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth8mm") / "bids"
    exe = Path(sys.executable).parent / "bids_qmri-synth"
    proc = subprocess.run([str(exe), str(out), "--participants", "2", "--sessions", "0", "--resolution", "8",
                           "--npc", "4", "--kinds", "bssfp", "tb1tfl", "t1w", "--seed", "1"],
                          capture_output=True, text=True, env=_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def _maps(out, subject):
    return sorted(p.name for p in (out / f"sub-{subject}" / "anat").glob("*_desc-miracle_T[12]map.nii.gz"))


def test_two_participants_in_parallel_into_one_output(dataset, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    plan = subprocess.run(_command(dataset, out, "participant", "--dry-run", "--methods", "bssfp:miracle"),
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert plan.returncode == 0, plan.stderr
    planned = [ln.strip() for ln in plan.stdout.splitlines() if ln.startswith("    sub-")]
    assert len(planned) >= 2 * 17  # 17 per participant, + the HTML report once reports exist
    assert "sub-01/anat/sub-01_acq-pc4_desc-miracle_T1map.nii.gz" in planned
    procs = [subprocess.Popen(_command(dataset, out, "participant", "--participant-label", sub,
                                       "-w", work, "--nprocs", "1", "--methods", "bssfp:miracle"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
             for sub in ("01", "02")]
    results = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    for sub in ("01", "02"):
        assert _maps(out, sub) == [f"sub-{sub}_acq-pc4_desc-miracle_T1map.nii.gz",
                                   f"sub-{sub}_acq-pc4_desc-miracle_T2map.nii.gz"]
        record = json.loads((work / "bids_qmri" / f"sub-{sub}_inputs.json").read_text())
        assert record["participant_id"] == f"sub-{sub}"
    missing = [p for p in planned if not (out / p).is_file()]
    assert missing == [], "the --dry-run plan promised files that were not written"
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert leftover_temporaries(out) == []
    result = validate_bids(out, derivative=True)
    assert result.ok, result.summary(10)


def _results(work):
    """nipype writes result_<node>.pklz when a node finishes; mtime_ns per node directory."""
    return {str(p.relative_to(work)): p.stat().st_mtime_ns for p in Path(work).rglob("result_*.pklz")}


def test_killed_run_resumes_without_redoing_finished_nodes(dataset, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    plugin = tmp_path / "linear.yml"
    plugin.write_text("plugin: Linear\n")  # one node at a time: a well-defined kill point
    args = _command(dataset, out, "participant", "--participant-label", "02", "-w", work,
                    "--use-plugin", plugin, "--methods", "bssfp:miracle", "--skip-bids-validation")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=_env(), start_new_session=True)
    deadline = time.time() + 600
    while len(_results(work)) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = _results(work)
    assert len(first) >= 3
    # Killed mid-way: the maps are not there yet, and no half-written file is in their place.
    assert _maps(out, "02") == []

    time.sleep(0.05)  # mtimes in the re-run must be distinguishable
    rerun = subprocess.run(args, capture_output=True, text=True, env=_env(), timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    second = _results(work)
    assert set(first) < set(second), "the re-run must finish the remaining nodes"
    redone = [node for node, stamp in first.items() if second[node] != stamp]
    assert redone == [], f"finished nodes were executed again: {redone}"
    assert _maps(out, "02") == ["sub-02_acq-pc4_desc-miracle_T1map.nii.gz", "sub-02_acq-pc4_desc-miracle_T2map.nii.gz"]
    assert leftover_temporaries(out) == []
