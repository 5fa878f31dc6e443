"""Hardening (issue 19): bad input as a careless or hostile user gives it, leaks, reproducibility.

One test per fault of the issue (each failed on the code before the fix), a property-style test
that feeds random header corruptions to discovery, and (``slow``) two whole runs with the same
``--seed`` that must give byte-identical derivatives, also after a kill and a resume, leaving
nothing in the system temp directory.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from bids_qmri.bids.discovery import discover
from bids_qmri.config import Config
from bids_qmri.errors import EXIT_FAILED, EXIT_INPUT, EXIT_USAGE, InputError
from helpers import make_bssfp_dataset, run_cli, save_img, write_json

MAG = Path("sub-01/anat/sub-01_acq-pc4_part-mag_bSSFP.nii.gz")
T1W = Path("sub-01/anat/sub-01_T1w.nii.gz")
B1 = Path("sub-01/fmap/sub-01_TB1map.nii.gz")


def _config(root, tmp_path, **kw) -> Config:
    kw.setdefault("methods", {"bssfp": ("miracle",)})
    return Config(bids_dir=Path(root), output_dir=tmp_path / "out", **kw)


def _no_traceback(proc):
    assert "Traceback" not in proc.stdout and "Traceback" not in proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]


def _one_error_line(proc, code, expected):
    _no_traceback(proc)
    assert proc.returncode == code, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("bids_qmri: error: ")]
    assert len(errors) == 1, proc.stderr
    assert expected in errors[0], errors[0]
    return errors[0]


# --------------------------------------------------------------------------------------------
# NIfTI header surgery: the header is rewritten field by field, the voxel bytes are kept.
# --------------------------------------------------------------------------------------------
def _read_raw(path) -> tuple[nb.Nifti1Header, bytes]:
    raw = Path(path).read_bytes()
    if str(path).endswith(".gz"):
        raw = gzip.decompress(raw)
    hdr = nb.Nifti1Header.from_fileobj(io.BytesIO(raw), check=False)
    return hdr, raw


def _write_raw(path, hdr, raw, *, keep_bytes: int | None = None) -> None:
    blob = hdr.binaryblock + raw[348:]
    if str(path).endswith(".gz"):
        blob = gzip.compress(blob, mtime=0)
    if keep_bytes is not None:
        blob = blob[:keep_bytes]
    Path(path).write_bytes(blob)


def patch_header(path, **fields) -> None:
    hdr, raw = _read_raw(path)
    for key, value in fields.items():
        hdr[key] = value
    _write_raw(path, hdr, raw)


# --------------------------------------------------------------------------------------------
# 1, 2: header validation before any data is read
# --------------------------------------------------------------------------------------------
def test_huge_claimed_shape_is_skipped_naming_the_file(tmp_path):
    """Fault 1: a header claiming 4096^3 voxels was loaded (MemoryError, internal error)."""
    root = make_bssfp_dataset(tmp_path / "bids", t1w=False, b1=None)
    patch_header(root / MAG, dim=[4, 4096, 4096, 4096, 4, 1, 1, 1])
    proc = run_cli(root, tmp_path / "out", "participant", "-w", tmp_path / "work", "--skip-bids-validation",
                   "--methods", "bssfp:miracle", timeout=300)
    _one_error_line(proc, EXIT_INPUT, "no processable input")
    (skip,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("bids_qmri: skipped")]
    assert str(root / MAG) in skip and "(4096, 4096, 4096, 4)" in skip and "cannot hold" in skip


@pytest.mark.parametrize("target", [MAG, T1W, B1], ids=["bSSFP", "T1w", "TB1map"])
def test_singular_affine_is_skipped_in_discovery(tmp_path, target):
    """Fault 2: an all-zero affine passed discovery and failed inside the workflow (exit 4)."""
    root = make_bssfp_dataset(tmp_path / "bids")
    zero = np.zeros(4)
    patch_header(root / target, srow_x=zero, srow_y=zero, srow_z=zero, sform_code=2, qform_code=0)
    (sess,) = discover(_config(root, tmp_path))
    reasons = {Path(s.path): s.reason for s in sess.skipped}
    assert root / target in reasons, sess.skipped
    assert "non-invertible" in reasons[root / target]
    with pytest.raises(InputError) as err:
        discover(_config(root, tmp_path, stop_on_first_crash=True))
    assert str(root / target) in str(err.value) and "\n" not in str(err.value)


def test_qform_sform_disagreement_is_skipped(tmp_path):
    root = make_bssfp_dataset(tmp_path / "bids")
    hdr, _ = _read_raw(root / T1W)
    shifted = hdr.get_sform()
    shifted[:3, 3] += [20.0, 0.0, 0.0]  # 20 mm: several voxels
    patch_header(root / T1W, srow_x=shifted[0], srow_y=shifted[1], srow_z=shifted[2], sform_code=2, qform_code=1)
    (sess,) = discover(_config(root, tmp_path))
    (reason,) = [s.reason for s in sess.skipped if Path(s.path) == root / T1W]
    assert "qform and sform that disagree by 20 mm" in reason


# Corruptions of one header field (or of the file's length), drawn at random.
DTYPE_CODES = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, 77, -3]


def _corrupt(path, rng) -> str:
    hdr, raw = _read_raw(path)
    kind = rng.choice(["dims", "datatype", "affine", "pixdim", "truncate", "quatern"])
    if kind == "dims":
        dim = hdr["dim"].copy()
        axis = int(rng.integers(0, 5))
        dim[axis] = int(rng.choice([0, -1, 1, 2, 7, 9, 300, 4096, 32767]))
        hdr["dim"] = dim
    elif kind == "datatype":
        hdr["datatype"] = int(rng.choice(DTYPE_CODES))
        hdr["bitpix"] = int(rng.choice([0, 8, 16, 32, 64, 128]))
    elif kind == "affine":
        row = f"srow_{rng.choice(['x', 'y', 'z'])}"
        hdr[row] = rng.choice([np.zeros(4), np.full(4, np.nan), np.full(4, np.inf), rng.normal(size=4) * 1e-9,
                               rng.normal(size=4) * 10])
        hdr["sform_code"] = int(rng.choice([0, 1, 2, 4]))
        hdr["qform_code"] = int(rng.choice([0, 1]))
    elif kind == "pixdim":
        pix = hdr["pixdim"].copy()
        pix[int(rng.integers(1, 4))] = float(rng.choice([0.0, -2.0, np.nan, np.inf, 1e-30]))
        hdr["pixdim"] = pix
        hdr["sform_code"] = 0
    elif kind == "quatern":
        for key in ("quatern_b", "quatern_c", "quatern_d"):
            hdr[key] = float(rng.choice([0.0, 0.7, 2.0, np.nan]))
        hdr["qform_code"] = 1
        hdr["sform_code"] = int(rng.choice([0, 1]))
    _write_raw(path, hdr, raw)
    if kind == "truncate":
        size = Path(path).stat().st_size
        _write_raw(path, hdr, raw, keep_bytes=int(rng.integers(0, size)))
    return kind


def test_random_header_corruptions_give_a_clean_skip(tmp_path):
    """Property: whatever is done to a header (dims, datatype, affine, voxel sizes, quaternion,
    truncation), discovery either skips that file with a one-line reason naming it, or raises a
    one-line InputError with --stop-on-first-crash, or accepts a file that genuinely loads (finite
    invertible affine, all voxels readable) -- never any other exception."""
    root = make_bssfp_dataset(tmp_path / "bids")
    targets = [MAG, T1W, B1]
    originals = {t: (root / t).read_bytes() for t in targets}
    # A corrupt bSSFP magnitude may be reported on its phase partner (e.g. "different affines").
    named = {MAG: {root / MAG, root / str(MAG).replace("part-mag", "part-phase")}, T1W: {root / T1W}, B1: {root / B1}}
    rng = np.random.default_rng(19)
    outcomes = {"skipped": 0, "error": 0, "accepted": 0}
    for trial in range(36):
        target = targets[trial % 3]
        for t, blob in originals.items():
            (root / t).write_bytes(blob)
        kind = _corrupt(root / target, rng)
        stop = bool(trial % 4 == 3)
        try:
            (sess,) = discover(_config(root, tmp_path, stop_on_first_crash=stop))
        except InputError as exc:
            assert stop and Path(exc.path) in named[target] and "\n" not in str(exc), (kind, exc)
            outcomes["error"] += 1
            continue
        reasons = [s.reason for s in sess.skipped if Path(s.path) in named[target]]
        if reasons:
            assert all("\n" not in r and r for r in reasons), (kind, reasons)
            outcomes["skipped"] += 1
            continue
        img = nb.load(root / target)  # accepted: must be a usable image after all
        assert np.all(np.isfinite(img.affine)) and abs(np.linalg.det(img.affine[:3, :3])) > 0, kind
        assert np.asanyarray(img.dataobj).size > 0
        outcomes["accepted"] += 1
    assert outcomes["skipped"] >= 15 and outcomes["error"] >= 3, outcomes


# --------------------------------------------------------------------------------------------
# 3: model files
# --------------------------------------------------------------------------------------------
def test_unreadable_model_file_is_named(tmp_path):
    """Fault 3: a non-safetensors ``<model>.safetensors`` with a matching card was a traceback
    (SafetensorError: header too large)."""
    from bids_qmri.models.registry import cache_dir, get_model, model_stem, sha256_file
    from bids_qmri.physics.bssfp import seed_protocol

    protocol = seed_protocol(12)
    folder = cache_dir(tmp_path / "models", "bssfp", protocol)
    folder.mkdir(parents=True)
    weights = folder / f"{model_stem('svnn', protocol)}.safetensors"
    weights.write_bytes(b"\xff" * 64 + b"import os; os.system('echo owned')")
    write_json(weights.with_suffix(".json"), {"sha256": sha256_file(weights)})
    with pytest.raises(InputError) as err:
        get_model("bssfp", "svnn", protocol, model_dir=tmp_path / "models", trainer=None, allow_training=False)
    message = str(err.value)
    assert message.startswith(str(weights)) and "not a usable bids_qmri model file" in message
    assert "\n" not in message
    weights.with_suffix(".json").write_text("{not json")
    with pytest.raises(InputError, match="model card cannot be read"):
        get_model("bssfp", "svnn", protocol, model_dir=tmp_path / "models", trainer=None, allow_training=False)


# --------------------------------------------------------------------------------------------
# 4: a failed node is one line, its traceback in the crash file (and under -v)
# --------------------------------------------------------------------------------------------
FAIL_N4 = """
import sys
import bids_qmri.anatomy.pipeline as p
def broken(in_file, out_dir, nthreads=1):
    raise ValueError("simulated N4 failure on " + in_file.rsplit("/", 1)[-1])
p.bias_correct = broken
from bids_qmri.cli.run import main
sys.exit(main(sys.argv[1:]))
"""


def test_failed_node_is_one_summary_line(tmp_path):
    """Fault 4: every failed node printed its whole traceback to stdout even without -v."""
    root = make_bssfp_dataset(tmp_path / "bids", b1=None)
    plugin = tmp_path / "linear.yml"
    plugin.write_text("plugin: Linear\n")  # nodes run in this process, where N4 is broken
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(systmp)}
    args = [root, tmp_path / "out", "participant", "-w", tmp_path / "work", "--skip-bids-validation",
            "--methods", "bssfp:miracle", "--use-plugin", plugin]
    proc = subprocess.run([sys.executable, "-c", FAIL_N4, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)
    _no_traceback(proc)
    assert proc.returncode == EXIT_FAILED, proc.stderr[-3000:]
    failed = [ln for ln in proc.stderr.splitlines() if "failed step" in ln]
    assert len(failed) == 1, proc.stderr
    assert "anat_wf.n4" in failed[0] and "sub-01_T1w.nii.gz" in failed[0]
    assert "ValueError: simulated N4 failure on sub-01_T1w.nii.gz" in failed[0]
    crash = Path(failed[0].rsplit("(traceback: ", 1)[1].rstrip(")"))
    assert "Traceback" in crash.read_text() and "simulated N4 failure" in crash.read_text()
    assert len(proc.stdout.splitlines()) + len(proc.stderr.splitlines()) < 40
    assert sorted(systmp.iterdir()) == [], "the run left files in the system temp directory"


def test_nipype_crash_messages_are_shown_only_with_verbose():
    import logging

    from bids_qmri.utils.logs import quiet_nipype_crashes

    logger = logging.getLogger("nipype.workflow")
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep(level=logging.DEBUG)
    logger.addHandler(handler)
    try:
        for verbose in (0, 1):
            quiet_nipype_crashes(verbose)
            logger.error("Node %s failed to run on host %s.", "n4", "vm")
            logger.error("Saving crash info to %s\n%s", "crash.txt", "Traceback (most recent call last):\n  ...")
            logger.warning('[Node] Error on "%s" (%s)', "wf.n4", "/work")
            logger.error("something else went wrong")
        assert seen == ["something else went wrong", "Node n4 failed to run on host vm.",
                        "Saving crash info to crash.txt\nTraceback (most recent call last):\n  ...",
                        '[Node] Error on "wf.n4" (/work)', "something else went wrong"]
    finally:
        logger.removeHandler(handler)
        quiet_nipype_crashes(1)


# --------------------------------------------------------------------------------------------
# 5: temporary files and lock files
# --------------------------------------------------------------------------------------------
def _sphere_t1w(tmp_path):
    shape = (24, 24, 20)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    r = np.sqrt((grid ** 2).sum(0))
    rng = np.random.default_rng(3)
    t1w = np.where(r < 0.45, 900.0, np.where(r < 0.7, 600.0, np.where(r < 0.85, 200.0, 0.0)))
    t1w = t1w + rng.normal(0, 40, shape) * (r < 0.85)
    mask = r < 0.85
    priors = [(r >= 0.42) & (r < 0.73), r < 0.48, r >= 0.67]  # GM, WM, CSF, blurred edges
    paths = [save_img(tmp_path / "t1w.nii.gz", t1w), save_img(tmp_path / "mask.nii.gz", mask.astype(np.float32))]
    paths.append([save_img(tmp_path / f"prior{k}.nii.gz", p.astype(np.float32) * 0.8) for k, p in enumerate(priors)])
    return paths


def test_atropos_is_reproducible_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    """Faults 5 and 7 at the unit level: antspyx's Atropos left ``antsr*prob0N.nii.gz`` in the temp
    directory on every call, and seeded its initialisation from the clock."""
    from bids_qmri.anatomy.segmentation import segment_tissues

    t1w, mask, priors = _sphere_t1w(tmp_path)
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    monkeypatch.setenv("TMPDIR", str(systmp))
    runs = [segment_tissues(t1w, mask, priors, iterations=5, seed=s) for s in (0, 0, 7)]
    assert sorted(systmp.iterdir()) == []
    assert tempfile.gettempdir() == str(systmp) and os.environ["TMPDIR"] == str(systmp)
    for probs, dseg in runs[1:]:
        assert np.array_equal(dseg, runs[0][1])
        for a, b in zip(probs, runs[0][0]):
            assert np.array_equal(a, b)
    assert len(np.unique(runs[0][1])) == 4  # background and three classes: a real segmentation


def test_roistats_lock_file_is_removed(tmp_path):
    import pandas as pd

    from bids_qmri.anatomy.roistats import COLUMNS, merge_roistats

    dest = tmp_path / "sub-01" / "anat" / "sub-01_atlas-AAL_roistats.tsv"
    row = {c: "x" for c in COLUMNS} | {"region_index": 1, "n_voxels": 3, "mean": 1.0, "std": 0.0, "median": 1.0,
                                       "q1": 1.0, "q3": 1.0}
    merge_roistats(dest, pd.DataFrame([row]))
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]


def _count_under_lock(path, counter, n):
    from bids_qmri.utils.locks import exclusive_lock

    for _ in range(n):
        with exclusive_lock(path):
            value = int(counter.read_text())
            time.sleep(0.0005)
            counter.write_text(str(value + 1))


def test_exclusive_lock_excludes_while_removing_its_file(tmp_path):
    """Removing the lock file after use must not let two processes hold the lock at once (the
    naive version lets a waiter lock the unlinked file while a newcomer locks a new one)."""
    import multiprocessing as mp

    counter = tmp_path / "counter"
    counter.write_text("0")
    lock = tmp_path / ".counter.lock"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_count_under_lock, args=(lock, counter, 60)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert int(counter.read_text()) == 240  # no lost update
    assert not lock.exists()


# --------------------------------------------------------------------------------------------
# 6: outputs never go through a symlink that leaves the output tree
# --------------------------------------------------------------------------------------------
def test_symlink_out_of_the_output_tree_is_refused(tmp_path):
    """Fault 6: a symlink planted at OUTPUT_DIR/sub-01 made the run write 82 files outside."""
    root = make_bssfp_dataset(tmp_path / "bids", b1=None, t1w=False)
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "sub-01").symlink_to(elsewhere, target_is_directory=True)
    proc = run_cli(root, out, "participant", "-w", tmp_path / "work", "--skip-bids-validation",
                   "--methods", "bssfp:miracle", timeout=300)
    line = _one_error_line(proc, EXIT_USAGE, f"{out / 'sub-01'} is a symlink to {elsewhere}")
    assert "outside the output directory" in line
    assert list(elsewhere.iterdir()) == []


def test_writer_refuses_a_deeper_link_and_allows_links_inside(tmp_path):
    from bids_qmri.bids.derivatives import OutputTreeError, derivative_path, save_json

    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    (out / "sub-01").mkdir(parents=True)
    elsewhere.mkdir()
    (out / "sub-01" / "anat").symlink_to(elsewhere, target_is_directory=True)
    path = derivative_path(out, subject="01", suffix="T1map", extension=".json", desc="x")
    with pytest.raises(OutputTreeError, match="anat resolves to .*outside the output directory"):
        save_json(path, {"a": 1})
    assert list(elsewhere.iterdir()) == []
    (out / "sub-01" / "anat").unlink()
    (out / "sub-01" / "real").mkdir()
    (out / "sub-01" / "anat").symlink_to(out / "sub-01" / "real", target_is_directory=True)
    save_json(path, {"a": 1})  # a link that stays inside the tree is fine
    assert json.loads((out / "sub-01" / "real" / path.name).read_text()) == {"a": 1}


# --------------------------------------------------------------------------------------------
# 8: messages
# --------------------------------------------------------------------------------------------
def test_plan_does_not_call_used_kinds_unprocessed(tmp_path):
    """Fault 8a: with a selection that maps nothing needing B1 (or nothing at all in a session),
    the plan listed TB1TFL and T1w as "not processed by this version"."""
    from bids_qmri.bids.discovery import format_plan

    root = make_bssfp_dataset(tmp_path / "bids", b1="TB1TFL")
    config = _config(root, tmp_path, dry_run=True, methods={"irt1": ("mle",)})
    plan = format_plan(discover(config), config)
    (idle,) = [ln for ln in plan.splitlines() if "found, used only beside" in ln]
    assert "T1w" in idle and "TB1TFL" in idle
    assert not [ln for ln in plan.splitlines() if "not processed by this version:" in ln]


def test_filter_that_matches_nothing_is_named(tmp_path):
    """Fault 8b: a --bids-filter-file that matched nothing ended in "no processable input"
    without naming the filter."""
    root = make_bssfp_dataset(tmp_path / "bids", b1=None, t1w=False)
    filt = write_json(tmp_path / "filter.json", {"bssfp": {"acquisition": "pc99"}})
    proc = run_cli(root, tmp_path / "out", "participant", "-w", tmp_path / "work", "--skip-bids-validation",
                   "--methods", "bssfp:miracle", "--bids-filter-file", filt, timeout=300)
    line = _one_error_line(proc, EXIT_INPUT, "no processable input")
    assert f"--bids-filter-file {filt} selects nothing for bssfp" in line and '"acquisition": "pc99"' in line


def test_filter_with_unknown_entity_is_a_usage_error(tmp_path):
    """Fault 8c: a filter with an unknown entity silently dropped inputs."""
    root = make_bssfp_dataset(tmp_path / "bids", b1=None, t1w=False)
    filt = write_json(tmp_path / "filter.json", {"bssfp": {"acqusition": "pc4"}})
    proc = run_cli(root, tmp_path / "out", "participant", "--dry-run", "--bids-filter-file", filt, timeout=300)
    _one_error_line(proc, EXIT_USAGE, "unknown BIDS entity 'acqusition'")
    from bids_qmri.bids.discovery import check_filters

    for good in ({"bssfp": {"acq": "pc4"}}, {"bssfp": {"acquisition": "pc4"}}, {"irt1": {"inversion": 1}},
                 {"mrf": {"desc": "svd"}}):  # short and long names work
        assert check_filters(good) == good
    write_json(filt, {"bssfp": {"acq": "pc4"}})
    ok = run_cli(root, tmp_path / "out", "participant", "--dry-run", "--bids-filter-file", filt, timeout=300)
    assert ok.returncode == 0 and "acq-pc4_desc-miracle_T1map" in ok.stdout, ok.stderr


def test_part_pair_with_disagreeing_sidecars_is_skipped(tmp_path):
    """Fault 8d: an MRF pair whose part-real and part-imag sidecars disagree on the schedule
    length was not noticed."""
    root = make_bssfp_dataset(tmp_path / "bids", b1=None)
    anat = root / "sub-01" / "anat"
    n = 20
    meta = {"FlipAngle": list(np.linspace(5, 60, n)), "RepetitionTimeExcitation": [0.012] * n, "EchoTime": 0.002,
            "InversionTime": 0.04, "MRFSequenceType": "FISP"}
    data = np.random.default_rng(0).normal(size=(6, 6, 4, n)).astype(np.float32)
    for part in ("real", "imag"):
        save_img(anat / f"sub-01_acq-fisp_part-{part}_MRF.nii.gz", data)
    write_json(anat / "sub-01_acq-fisp_part-real_MRF.json", meta)
    write_json(anat / "sub-01_acq-fisp_part-imag_MRF.json", {**meta, "FlipAngle": meta["FlipAngle"][:-1]})
    (sess,) = discover(_config(root, tmp_path, dry_run=True))
    assert sess.inputs["mrf"] == []
    (reason,) = [s.reason for s in sess.skipped if "MRF" in s.path]
    assert "part-real and part-imag sidecars disagree on FlipAngle (20 values vs 19 values)" in reason
    write_json(anat / "sub-01_acq-fisp_part-imag_MRF.json", meta)  # agreeing sidecars: collected
    (sess,) = discover(_config(root, tmp_path, dry_run=True))
    assert len(sess.inputs["mrf"]) == 1


# --------------------------------------------------------------------------------------------
# 7: whole runs with the same --seed are byte-identical (also after a kill and a resume)
# --------------------------------------------------------------------------------------------
# Files whose bytes legitimately differ between runs: the participant report shows when it
# was generated ("generated <date> <time> UTC"); its other content is compared without that line.
TIMESTAMPED = ("sub-01.html",)


def _checksums(out) -> dict[str, str]:
    sums = {}
    for p in sorted(Path(out).rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name in TIMESTAMPED:
                data = b"\n".join(ln for ln in data.splitlines() if b"generated" not in ln)
            sums[str(p.relative_to(out))] = hashlib.sha256(data).hexdigest()
    return sums


@pytest.fixture(scope="module")
def tiny_synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_h19") / "bids"
    exe = Path(sys.executable).parent / "bids_qmri-synth"
    proc = subprocess.run([str(exe), str(out), "--participants", "1", "--sessions", "0", "--resolution", "8",
                           "--npc", "4", "--kinds", "bssfp", "tb1tfl", "t1w", "--seed", "1"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.mark.slow
def test_same_seed_gives_identical_derivatives_also_after_kill_and_resume(tiny_synth, tmp_path):
    """Fault 7: two runs with the same --seed differed in the dseg, the probsegs, the ROI table
    and the bytes of the .h5 transforms. Run 1 is computed independently of run 0 (its own work
    directory), killed after a few steps and resumed: its files must equal run 0's byte for byte,
    so one test shows both. Both leave nothing in the system temp directory (fault 5)."""
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(systmp)}

    def command(k, *extra):
        return [sys.executable, "-m", "bids_qmri.cli.run", str(tiny_synth), str(tmp_path / f"out{k}"), "participant",
                "-w", str(tmp_path / f"work{k}"), "--skip-bids-validation", "--methods", "bssfp:miracle",
                "--seed", "3", *extra]

    proc = subprocess.run(command(0), capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = _checksums(tmp_path / "out0")
    assert len(first) > 40 and any(name.endswith("_xfm.h5") for name in first)
    assert not [n for n in first if n.endswith(".lock") or "/." in n], "lock or temporary files left"

    plugin = tmp_path / "linear.yml"
    plugin.write_text("plugin: Linear\n")  # one node at a time: a well-defined kill point
    args = command(1, "--use-plugin", str(plugin))
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    deadline = time.time() + 600
    while (len(list((tmp_path / "work1").rglob("result_*.pklz"))) < 4 and proc.poll() is None
           and time.time() < deadline):
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list((tmp_path / "work1" / "tmp").iterdir()), "the killed run had no private temp folder"
    rerun = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    second = _checksums(tmp_path / "out1")
    assert sorted(n for n in first if first[n] != second.get(n)) == [] and second.keys() == first.keys()
    assert sorted(systmp.iterdir()) == [], "the runs left files in the system temp directory"
    assert not (tmp_path / "work1" / "tmp").exists(), "the killed run's temporary folder was not removed"
