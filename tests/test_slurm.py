"""bids_qmri-slurm: the generated submission script, run against stand-ins for sbatch/apptainer.

The real cluster test (slurmctld + slurmd + munge, jobs through sbatch) is scripts/ci_slurm.sh
(`make ci-slurm`, root only); here the script's own logic is checked: one array task per
participant, the group job depending on the array, each task running its own participant.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from bids_qmri.cli.slurm import main

FAKE_SBATCH = r"""#!/usr/bin/env bash
# Records each call (argv + the job script read from stdin) and prints a job id like --parsable.
n=$(( $(ls "$FAKE_DIR"/call_*.json 2>/dev/null | wc -l) ))
python3 -c 'import json, sys; json.dump(sys.argv[1:], open(sys.argv[1], "w"))' "$FAKE_DIR/call_$n.json" "$@"
cat > "$FAKE_DIR/call_$n.sh"
echo "$(( 100 + n ));cluster"
"""

FAKE_APPTAINER = r"""#!/usr/bin/env bash
python3 -c 'import json, sys; json.dump(sys.argv[2:], open(sys.argv[1], "w"))' "$FAKE_DIR/apptainer_$SLURM_ARRAY_TASK_ID.json" "$@"
"""


def _exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def cohort(tmp_path):
    bids = tmp_path / "bids"
    for sub in ("01", "02", "x7"):
        (bids / f"sub-{sub}" / "anat").mkdir(parents=True)
    (bids / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.10.0"}')
    (bids / "participants.tsv").write_text("participant_id\n")
    fake = tmp_path / "fake"
    fake.mkdir()
    _exe(fake / "sbatch", FAKE_SBATCH)
    _exe(fake / "apptainer", FAKE_APPTAINER)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "FAKE_DIR": str(fake)}
    return tmp_path, bids, fake, env


def _submit(script: Path, env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=60)


def test_array_then_dependent_group(cohort):
    tmp, bids, fake, env = cohort
    script = tmp / "job.sh"
    assert main([str(bids), str(tmp / "out"), "-w", str(tmp / "work"), "--cpus", "3", "--mem-gb", "6",
                 "--max-parallel", "2", "--partition", "short", "--sbatch-option=--qos=low",
                 "-o", str(script), "--", "--methods", "bssfp:miracle", "--seed", "7"]) == 0
    proc = _submit(script, env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "100 101"

    array_args = json.loads((fake / "call_0.json").read_text())
    group_args = json.loads((fake / "call_1.json").read_text())
    # 3 participants -> tasks 0..2, at most 2 at once; resources as asked
    assert "--array=0-2%2" in array_args
    assert {"--cpus-per-task=3", "--mem=6144M", "--partition=short", "--qos=low"} <= set(array_args)
    # the group job waits for the whole array (the id sbatch printed, cluster name stripped)
    assert "--dependency=afterok:100" in group_args
    assert "--cpus-per-task=1" in group_args
    assert (tmp / "work" / "slurm-logs").is_dir() and (tmp / "out").is_dir()

    part = (fake / "call_0.sh").read_text()
    group = (fake / "call_1.sh").read_text()
    assert "LABELS=(01 02 x7)" in part
    assert f"{sys.executable} -m bids_qmri.cli.run {bids} {tmp / 'out'} participant" in part
    assert '--participant-label "$label"' in part and "--methods bssfp:miracle --seed 7" in part
    assert " group " in group and "--participant-label" not in group and "--seed 7" in group
    for body in (part, group):
        assert subprocess.run(["bash", "-n"], input=body, text=True).returncode == 0


def test_container_tasks_run_their_own_participant(cohort):
    tmp, bids, fake, env = cohort
    sif = tmp / "bids_qmri.sif"
    sif.write_bytes(b"SIF")
    script = tmp / "job.sh"
    assert main([str(bids), str(tmp / "out"), "-w", str(tmp / "work"), "--container", str(sif),
                 "--model-dir", str(tmp / "models"), "--participant-label", "sub-02", "x7",
                 "-o", str(script)]) == 0
    assert _submit(script, env).returncode == 0
    assert "--array=0-1" in json.loads((fake / "call_0.json").read_text())
    body = (fake / "call_0.sh").read_text()
    # Run the array task body as Slurm would for task 1 (the second label).
    task_env = {**env, "SLURM_ARRAY_TASK_ID": "1", "SLURM_JOB_ID": "55", "SLURM_CPUS_PER_TASK": "2"}
    proc = subprocess.run(["bash", "-s"], input=body, capture_output=True, text=True, env=task_env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    argv = json.loads((fake / "apptainer_1.json").read_text())
    assert argv[:2] == ["run", "--containall"]
    assert argv[argv.index("--workdir") + 1] == str(tmp / "work" / "tmp" / "sub-x7")
    binds = [argv[i + 1] for i, a in enumerate(argv) if a == "--bind"]
    assert f"{bids}:/data:ro" in binds and f"{tmp / 'work'}:/work" in binds and f"{tmp / 'models'}:/models" in binds
    app = argv[argv.index(str(sif)) + 1:]
    assert app[:3] == ["/data", "/out", "participant"]
    assert app[app.index("--participant-label") + 1] == "x7"
    assert app[app.index("--nprocs") + 1] == "2" and app[app.index("--model-dir") + 1] == "/models"


@pytest.mark.parametrize("args, message", [
    (["--participant-label", "03"], "sub-03 does not exist"),
    (["--participant-label", "0-1"], "alphanumeric"),
    (["--time", "tomorrow"], "--time 'tomorrow'"),
    (["--container", "/nonexistent.sif"], "no such image file"),
])
def test_bad_arguments_one_line(cohort, capsys, args, message):
    tmp, bids, _, _ = cohort
    assert main([str(bids), str(tmp / "out"), "-w", str(tmp / "work"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bids_qmri-slurm: error:") and message in err and "\n" not in err


def test_not_a_bids_dataset(tmp_path, capsys):
    (tmp_path / "notbids").mkdir()
    assert main([str(tmp_path / "notbids"), str(tmp_path / "out"), "-w", str(tmp_path / "w")]) == 2
    assert "no dataset_description.json" in capsys.readouterr().err
