"""ROI statistics against values computed independently (NumPy on known masks)."""

from __future__ import annotations

import json

import nibabel as nb
import numpy as np
import pandas as pd
import pytest

from bids_qmri.anatomy.roistats import (
    COLUMNS,
    TISSUE_ROWS,
    describe,
    merge_roistats,
    parse_entities,
    region_masks,
    roi_table,
)

SPEC_COLUMNS = ["participant_id", "session_id", "atlas", "region_index", "region", "suffix", "method", "acq",
                "n_voxels", "mean", "std", "median", "q1", "q3", "units"]


def test_columns_are_exactly_spec():
    assert COLUMNS == SPEC_COLUMNS


def test_describe_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(1.2, 0.3, 1001)
    d = describe(x)
    assert d["n_voxels"] == 1001
    assert d["mean"] == pytest.approx(np.mean(x))
    assert d["std"] == pytest.approx(np.std(x, ddof=1))
    assert d["median"] == pytest.approx(np.median(x))
    assert d["q1"] == pytest.approx(np.quantile(x, 0.25))
    assert d["q3"] == pytest.approx(np.quantile(x, 0.75))
    empty = describe(np.array([np.nan]))
    assert empty["n_voxels"] == 0 and np.isnan(empty["mean"])


def _toy():
    """Two half-spaces: region 1 is mostly GM with a WM fringe, region 2 is WM."""
    shape = (20, 10, 10)
    gm = np.zeros(shape, np.float32)
    wm = np.zeros(shape, np.float32)
    csf = np.zeros(shape, np.float32)
    gm[:10] = 0.9
    wm[:10] = 0.1
    gm[8:10] = 0.3  # partial-volume fringe of region 1
    wm[8:10] = 0.7
    wm[10:] = 1.0
    csf[:, :, 0] = 1.0  # a CSF layer on one face
    gm[:, :, 0] = wm[:, :, 0] = 0
    atlas = np.zeros(shape, np.int32)
    atlas[:10] = 1
    atlas[10:] = 2
    brain = np.ones(shape, bool)
    table = pd.DataFrame({"index": [1, 2, 3], "name": ["Cortex", "WhiteMatter", "Absent"]})
    return {"GM": gm, "WM": wm, "CSF": csf}, atlas, brain, table


def test_partial_volume_and_dominant_tissue():
    probs, atlas, brain, table = _toy()
    values = np.where(probs["GM"] > 0.5, 1.4, np.where(probs["WM"] > 0.5, 0.8, 3.5))
    masks = region_masks(atlas, table, probs, brain, pv_threshold=0.5)
    df = roi_table(values, masks, participant_id="sub-01", session_id=None, atlas="Toy", suffix="T1map",
                   method="miracle", acq="fast", units="s")
    assert list(df.columns) == SPEC_COLUMNS
    rows = df.set_index("region")
    # Region 1: GM dominates; the WM fringe (P(GM)=0.3) and the CSF face are excluded.
    expected_n = int(((atlas == 1) & (probs["GM"] >= 0.5)).sum())
    assert rows.loc["Cortex", "n_voxels"] == expected_n
    assert rows.loc["Cortex", "mean"] == pytest.approx(1.4)
    assert rows.loc["WhiteMatter", "mean"] == pytest.approx(0.8)
    # Tissue rows: negative indices, PV threshold per class; WholeBrain = GM + WM.
    assert rows.loc["GM", "region_index"] == TISSUE_ROWS["GM"] == -1
    assert rows.loc["CSF", "mean"] == pytest.approx(3.5)
    assert rows.loc["WholeBrain", "n_voxels"] == int(((probs["GM"] + probs["WM"]) >= 0.5).sum())
    # A label absent from the map's grid gives an empty row, not an error.
    assert rows.loc["Absent", "n_voxels"] == 0 and np.isnan(rows.loc["Absent", "mean"])
    # A stricter threshold can only remove voxels.
    strict = roi_table(values, region_masks(atlas, table, probs, brain, 0.95), participant_id="sub-01",
                       session_id=None, atlas="Toy", suffix="T1map", method="miracle", acq="fast", units="s")
    assert (strict["n_voxels"].to_numpy() <= df["n_voxels"].to_numpy()).all()


def test_parse_entities():
    e = parse_entities("/x/sub-01_ses-2_acq-fast_desc-miracle_T1map.nii.gz")
    assert e == {"sub": "01", "ses": "2", "acq": "fast", "desc": "miracle", "suffix": "T1map"}


def test_merge_keeps_other_acquisitions_and_reads_back(tmp_path):
    probs, atlas, brain, table = _toy()
    masks = region_masks(atlas, table, probs, brain, 0.5)
    values = np.ones(atlas.shape)
    kw = dict(participant_id="sub-01", session_id="ses-1", atlas="Toy", units="s")
    a = roi_table(values, masks, suffix="T1map", method="svnn", acq="a", **kw)
    b = roi_table(2 * values, masks, suffix="T1map", method="svnn", acq="b", **kw)
    dest = tmp_path / "sub-01_ses-1_atlas-Toy_roistats.tsv"
    merge_roistats(dest, a)
    merge_roistats(dest, b)
    merge_roistats(dest, a)  # a re-run replaces, never duplicates
    df = pd.read_csv(dest, sep="\t", na_values="n/a", keep_default_na=False)
    assert list(df.columns) == SPEC_COLUMNS
    assert len(df) == len(a) + len(b)
    assert set(df["acq"]) == {"a", "b"}
    assert df.loc[(df.acq == "b") & (df.region == "GM"), "mean"].item() == pytest.approx(2.0)
    assert df.loc[df.region == "Absent", "mean"].isna().all()


def test_roi_analysis_identity_grid(tmp_path):
    """Maps on the T1w grid with a reference identical to the T1w: the rigid registration is
    the identity, so ROI means equal the direct NumPy means."""
    from bids_qmri.anatomy.roistats import roi_analysis

    rng = np.random.default_rng(1)
    shape = (32, 36, 30)
    ii = np.indices(shape).astype(float)
    r = np.sqrt(((ii - np.array(shape)[:, None, None, None] / 2) ** 2 * np.array([1, 0.8, 1])[:, None, None, None])
                .sum(0))
    wm = np.clip(8 - r, 0, 1).astype(np.float32)
    gm = np.clip(np.minimum(r - 7, 12 - r), 0, 1).astype(np.float32)
    csf = np.clip(np.minimum(r - 11, 14 - r), 0, 1).astype(np.float32)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    t1w = (0.6 * wm + 0.4 * gm + 0.1 * csf + rng.normal(0, 0.005, shape)).astype(np.float32)
    files = {}
    for name, arr in {"t1w": t1w, "GM": gm, "WM": wm, "CSF": csf,
                      "mask": ((gm + wm + csf) > 0.5).astype(np.float32)}.items():
        files[name] = str(tmp_path / f"{name}.nii.gz")
        nb.save(nb.Nifti1Image(arr, affine), files[name])
    atlas = np.where(ii[0] < shape[0] / 2, 1, 2) * ((gm + wm) > 0.2)
    files["atlas"] = str(tmp_path / "atlas.nii.gz")
    nb.save(nb.Nifti1Image(atlas.astype(np.int32), affine), files["atlas"])
    table = tmp_path / "atlas.tsv"
    pd.DataFrame({"index": [1, 2], "name": ["Left", "Right"]}).to_csv(table, sep="\t", index=False)
    t1 = (1.4 * gm + 0.8 * wm + 3.5 * csf).astype(np.float32)
    out = tmp_path / "out"
    anat = out / "sub-01" / "anat"
    anat.mkdir(parents=True)
    map_path = anat / "sub-01_acq-x_desc-truth_T1map.nii.gz"
    nb.save(nb.Nifti1Image(t1, affine), map_path)
    map_path.with_name(map_path.name.replace(".nii.gz", ".json")).write_text(json.dumps({"Units": "s"}))
    ref = anat / "sub-01_acq-x_desc-ref_bSSFP.nii.gz"
    nb.save(nb.Nifti1Image(t1w, affine), ref)
    tsv = roi_analysis(subject="01", session=None, output_dir=out, work_dir=tmp_path / "work", t1w=files["t1w"],
                       mask=files["mask"], probseg=[files["GM"], files["WM"], files["CSF"]],
                       atlas_dseg=files["atlas"], atlas_table=str(table), atlas_name="Toy", ref_images=[str(ref)],
                       maps=[[str(map_path)]], pv_threshold=0.5, nthreads=1)
    df = pd.read_csv(tsv, sep="\t")
    assert tsv.endswith("sub-01_atlas-Toy_roistats.tsv")
    assert (anat / "sub-01_acq-x_from-bSSFP_to-T1w_mode-image_xfm.mat").is_file()
    assert set(df["units"]) == {"s"} and set(df["method"]) == {"truth"} and set(df["acq"]) == {"x"}
    rows = df.set_index("region")
    brain = (gm + wm + csf) > 0.5
    for tissue, p in (("GM", gm), ("WM", wm)):
        direct = t1[brain & (p >= 0.5)].mean()
        assert rows.loc[tissue, "mean"] == pytest.approx(direct, rel=0.01)
