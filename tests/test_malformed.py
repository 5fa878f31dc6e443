"""A catalogue of malformed datasets and command lines.

Each case runs the real ``bids_qmri`` command in a fresh interpreter and checks: the exit code,
one line ``bids_qmri: error: ...`` naming the problem, no traceback, and nothing written to the
output directory. Datasets are tiny generated ones with one file broken.
"""

from __future__ import annotations

import gzip
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bids_qmri.errors import EXIT_INPUT, EXIT_USAGE
from helpers import make_bssfp_dataset, save_img, tree, write_json

ANAT = Path("sub-01") / "anat"
MAG = ANAT / "sub-01_acq-pc4_part-mag_bSSFP.nii.gz"
PHASE = ANAT / "sub-01_acq-pc4_part-phase_bSSFP.nii.gz"
SIDECAR = ANAT / "sub-01_acq-pc4_bSSFP.json"


def _edit_sidecar(root, **changes):
    meta = json.loads((root / SIDECAR).read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    write_json(root / SIDECAR, meta)


# Each case: (id, mutate(root, tmp) -> extra args, expected exit code, expected message part).
def _no_description(root, tmp):
    (root / "dataset_description.json").unlink()
    return []


def _bad_description(root, tmp):
    (root / "dataset_description.json").write_text('{"Name": "x",')
    return []


def _no_participants(root, tmp):
    import shutil

    shutil.rmtree(root / "sub-01")
    return []


def _zero_byte(root, tmp):
    (root / MAG).write_bytes(b"")
    return ["--skip-bids-validation"]


def _zero_byte_validated(root, tmp):
    # A standard file (our bSSFP is .bidsignored, so the validator does not look at it).
    (root / ANAT / "sub-01_T1w.nii.gz").write_bytes(b"")
    return []


def _truncated_gzip(root, tmp):
    data = (root / PHASE).read_bytes()
    # Keep the header intact (it decompresses), lose most voxel data.
    raw = gzip.decompress(data)
    (root / PHASE).write_bytes(gzip.compress(raw)[: len(gzip.compress(raw)) // 2])
    return ["--skip-bids-validation"]


def _mismatched_pair(root, tmp):
    save_img(root / PHASE, np.random.default_rng(0).random((8, 8, 5, 4)))
    return ["--skip-bids-validation"]


def _missing_part(root, tmp):
    (root / PHASE).unlink()
    return ["--skip-bids-validation"]


def _wrong_cycle_count(root, tmp):
    _edit_sidecar(root, PhaseIncrements=[30, 90, 150, 210, 270, 330])
    return ["--skip-bids-validation"]


def _missing_flip_angle(root, tmp):
    _edit_sidecar(root, FlipAngle=None)
    return ["--skip-bids-validation"]


def _tr_in_ms(root, tmp):
    _edit_sidecar(root, RepetitionTimeExcitation=4.8, EchoTime=2.4)
    return ["--skip-bids-validation"]


def _nan_image(root, tmp):
    save_img(root / MAG, np.full((8, 8, 6, 4), np.nan))
    return ["--skip-bids-validation"]


def _two_d_image(root, tmp):
    save_img(root / MAG, np.ones((8, 8)))
    save_img(root / PHASE, np.ones((8, 8)))
    return ["--skip-bids-validation"]


def _broken_sidecar_json(root, tmp):
    (root / SIDECAR).write_text("{not json")
    return ["--skip-bids-validation"]


def _hostile_label(root, tmp):
    return ["--participant-label", "../../etc"]


def _hostile_label_slash(root, tmp):
    return ["--participant-label", "sub-01/../../x"]


def _unknown_label(root, tmp):
    return ["--participant-label", "07", "sub-01"]


def _bad_filter_json(root, tmp):
    path = tmp / "filters.json"
    path.write_text('{"bssfp": {"acquisition": "pc4"')
    return ["--bids-filter-file", str(path)]


def _bad_filter_kind(root, tmp):
    path = write_json(tmp / "filters.json", {"bold": {"task": "rest"}})
    return ["--bids-filter-file", str(path)]


def _bad_methods(root, tmp):
    return ["--methods", "bssfp:miracle,magic"]


def _bad_plugin(root, tmp):
    path = tmp / "plugin.yml"
    path.write_text("plugin: [MultiProc\n")
    return ["--use-plugin", str(path)]


def _missing_atlas(root, tmp):
    return ["--atlas", f"{tmp}/labels.nii.gz:{tmp}/labels.txt"]


def _bad_session(root, tmp):
    return ["--session-label", "ses-1;rm"]


def _work_in_bids(root, tmp):
    return ["-w", str(root / "work")]


CASES = [
    ("missing dataset_description", _no_description, EXIT_USAGE, "dataset_description.json is missing"),
    ("invalid dataset_description", _bad_description, EXIT_USAGE, "is not valid JSON"),
    ("no participants", _no_participants, EXIT_USAGE, "no participants found"),
    ("zero-byte NIfTI", _zero_byte, EXIT_INPUT, "part-mag_bSSFP.nii.gz: is an empty file (0 bytes)"),
    ("zero-byte NIfTI, validated", _zero_byte_validated, EXIT_USAGE, "EMPTY_FILE x1 (e.g. /sub-01/anat/sub-01_T1w.nii.gz)"),
    ("truncated gzip", _truncated_gzip, EXIT_INPUT, "part-phase_bSSFP.nii.gz: is truncated or corrupt"),
    ("mismatched part pair", _mismatched_pair, EXIT_INPUT, "part-phase shape (8, 8, 5, 4) differs from part-mag shape (8, 8, 6, 4)"),
    ("missing part", _missing_part, EXIT_INPUT, "has part-mag — provide a part-mag/part-phase"),
    ("wrong phase-cycle count", _wrong_cycle_count, EXIT_INPUT, "4 volumes but 6 PhaseIncrements"),
    ("missing FlipAngle", _missing_flip_angle, EXIT_INPUT, "missing sidecar metadata FlipAngle"),
    ("times in ms", _tr_in_ms, EXIT_INPUT, "implausible timing RepetitionTimeExcitation=4.8"),
    ("NaN-filled image", _nan_image, EXIT_INPUT, "contains 1536 NaN/Inf voxel(s)"),
    ("2D image where 4D expected", _two_d_image, EXIT_INPUT, "has 2D shape (8, 8) but a 4D phase-cycled bSSFP series is expected"),
    ("broken sidecar JSON", _broken_sidecar_json, EXIT_USAGE, "sub-01_acq-pc4_bSSFP.json"),
    ("hostile participant label", _hostile_label, EXIT_USAGE, "invalid participant label '../../etc'"),
    ("hostile label with slash", _hostile_label_slash, EXIT_USAGE, "invalid participant label 'sub-01/../../x'"),
    ("unknown participant label", _unknown_label, EXIT_USAGE, "participant label(s) not found in"),
    ("bad --bids-filter-file JSON", _bad_filter_json, EXIT_USAGE, "is not valid JSON"),
    ("unknown kind in filter file", _bad_filter_kind, EXIT_USAGE, "unknown input kind 'bold'"),
    ("unknown method", _bad_methods, EXIT_USAGE, "unknown method(s) magic for bssfp"),
    ("bad plugin YAML", _bad_plugin, EXIT_USAGE, "is not valid YAML"),
    ("missing atlas files", _missing_atlas, EXIT_USAGE, "--atlas"),
    ("hostile session label", _bad_session, EXIT_USAGE, "invalid session label"),
    ("work dir inside BIDS dir", _work_in_bids, EXIT_USAGE, "is inside the BIDS directory"),
]


def _run(args, **kw):
    cmd = [sys.executable, "-m", "bids_qmri.cli.run", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **kw.pop("env", {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, **kw)


def _check_one_line_error(proc, code, expected):
    err_lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    errors = [ln for ln in err_lines if ln.startswith("bids_qmri: error: ")]
    assert len(errors) == 1, proc.stderr
    assert expected in errors[0], errors[0]


@pytest.mark.parametrize("name,mutate,code,expected", CASES, ids=[c[0] for c in CASES])
def test_malformed(tmp_path, name, mutate, code, expected):
    root = make_bssfp_dataset(tmp_path / "bids", b1=None, t1w=False)
    out = tmp_path / "out"
    extra = mutate(root, tmp_path)
    if "-w" not in extra:
        extra += ["-w", str(tmp_path / "work")]
    proc = _run([root, out, "participant", *extra])
    _check_one_line_error(proc, code, expected)
    assert tree(out) == [], "a failed run must leave nothing in the output directory"


def test_catalogue_size():
    assert len(CASES) + 3 >= 15  # + output = BIDS dir, output inside BIDS dir, read-only output


@pytest.mark.parametrize("where", ["same", "inside"])
def test_output_dir_is_or_is_inside_bids_dir(tmp_path, where):
    root = make_bssfp_dataset(tmp_path / "bids", b1=None, t1w=False)
    before = tree(root)
    out = root if where == "same" else root / "derivatives" / "bids_qmri"
    proc = _run([root, out, "participant", "-w", tmp_path / "work"])
    _check_one_line_error(proc, EXIT_USAGE, "BIDS directory")
    assert tree(root) == before


def test_read_only_output_dir(tmp_path):
    """A read-only output directory is a one-line error. Mode bits do not stop root, so as root
    the output directory is a read-only tmpfs mount (a genuine EROFS, not a simulated one)."""
    root = make_bssfp_dataset(tmp_path / "bids", b1=None, t1w=False)
    out = tmp_path / "out"
    out.mkdir()
    mounted = False
    if os.geteuid() == 0:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(out)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"running as root without mount permission: {proc.stderr.strip()}")
        mounted = True
    else:
        os.chmod(out, stat.S_IRUSR | stat.S_IXUSR)
    try:
        proc = _run([root, out, "participant", "-w", tmp_path / "work", "--skip-bids-validation"])
        _check_one_line_error(proc, EXIT_USAGE, f"OUTPUT_DIR {out} is not writable")
        assert tree(out) == []
    finally:
        if mounted:
            subprocess.run(["umount", str(out)], check=True)
        else:
            os.chmod(out, stat.S_IRWXU)


def test_verbose_shows_the_traceback(tmp_path):
    root = make_bssfp_dataset(tmp_path / "bids", b1=None, t1w=False)
    proc = _run([root, root, "participant", "-v"])
    assert proc.returncode == EXIT_USAGE
    assert "Traceback" in proc.stderr and "bids_qmri: error: OUTPUT_DIR is the BIDS directory" in proc.stderr


def test_internal_error_writes_a_crash_report(tmp_path):
    """Any exception that is not a user error: exit 1, one line naming the crash report file."""
    root = make_bssfp_dataset(tmp_path / "bids", b1=None, t1w=False)
    out = tmp_path / "out"
    code = (
        "import sys, bids_qmri.bids.discovery as d\n"
        "def boom(*a, **k): raise ZeroDivisionError('simulated bug')\n"
        "d.discover = boom\n"
        "from bids_qmri.cli.run import main\n"
        f"sys.exit(main([{str(root)!r}, {str(out)!r}, 'participant', '--skip-bids-validation', "
        f"'-w', {str(tmp_path / 'work')!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("bids_qmri: internal error")]
    report = Path(line.split("crash report: ")[1].split(" — ")[0])
    assert report.is_file() and report.parent == out / "logs"
    text = report.read_text()
    assert "ZeroDivisionError: simulated bug" in text and "Traceback" in text
