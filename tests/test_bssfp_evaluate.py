"""``modalities.bssfp.evaluate.workflow_errors`` reads the right files for datasets with and without
a session level: on hand-made maps whose relative error per voxel is known, the medians it returns
must be the ones computed here from those known errors alone."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_qmri.modalities.bssfp.evaluate import workflow_errors

SHAPE = (4, 4, 2)
ACQ = "pc12"


def _save(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.eye(4)), path)


def _write_session(bids: Path, out: Path, sub: str, ses: str | None, rel_error: dict) -> dict:
    """Ground truth, brain mask and maps of one session; returns the expected medians (%).

    Half of the voxels are GM/WM inside the brain mask; the rest are CSF, or tissue outside the
    mask, and carry a 1000 % error that must not count. ``rel_error[method]`` is the relative error
    of that method's maps in the counted voxels (a different value per voxel, so that the median
    depends on which voxels are read)."""
    rel = Path(f"sub-{sub}") / (f"ses-{ses}" if ses else "")
    stem = f"sub-{sub}" + (f"_ses-{ses}" if ses else "") + f"_acq-{ACQ}"
    n = int(np.prod(SHAPE))
    index = np.arange(n).reshape(SHAPE)
    dseg = np.where(index % 4 == 0, 1, np.where(index % 4 == 1, 2, 3))  # GM, WM, CSF, CSF
    mask = index < n - 4  # the last four voxels (one of them GM) lie outside the brain mask
    counted = mask & np.isin(dseg, (1, 2))
    # Truth T1 1 s (inside the seed's training range) in the first half, 3 s (outside) in the second.
    t1 = np.where(index < n // 2, 1.0, 3.0)
    t2 = np.where(index < n // 2, 0.08, 0.5)
    gt = bids / "derivatives" / "groundtruth" / rel / "anat"
    _save(gt / f"{stem}_dseg.nii.gz", dseg)
    _save(gt / f"{stem}_T1map.nii.gz", t1)
    _save(gt / f"{stem}_T2map.nii.gz", t2)
    _save(out / rel / "anat" / f"{stem}_desc-brain_mask.nii.gz", mask)
    expected = {}
    for method, scale in rel_error.items():
        error = np.where(counted, scale * (1 + index / n), 10.0)  # 10 = 1000 % where not counted
        for suffix, truth in (("T1map", t1), ("T2map", t2)):
            sign = 1 if suffix == "T1map" else -1
            _save(out / rel / "anat" / f"{stem}_desc-{method}_{suffix}.nii.gz", truth * (1 + sign * error))
            expected[method, suffix, "all"] = 100 * float(np.median(error[counted]))
            expected[method, suffix, "trained"] = 100 * float(np.median(error[counted & (index < n // 2)]))
    return expected


@pytest.mark.parametrize("sessions", [("01", "02"), (None,)])
def test_workflow_errors_per_session(tmp_path, sessions):
    bids, out = tmp_path / "bids", tmp_path / "out"
    expected = {}
    for k, ses in enumerate(sessions):
        for j, sub in enumerate(("01", "02")):
            # Every (participant, session) gets its own errors: reading another's files shows.
            errors = {"miracle": 0.01 * (1 + k + 2 * j), "svnn": 0.03 * (1 + k + 2 * j)}
            expected[sub, ses] = _write_session(bids, out, sub, ses, errors)
    for (sub, ses), want in expected.items():
        got = workflow_errors(bids, out, ACQ, ("miracle", "svnn"), sub=sub, ses=ses)
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-5), (sub, ses, key)
