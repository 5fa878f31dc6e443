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
    estimated_voxels,
    merge_roistats,
    parse_entities,
    region_masks,
    roi_table,
)

SPEC_COLUMNS = ["participant_id", "session_id", "atlas", "region_index", "region", "suffix", "method", "acq",
                "n_voxels", "mean", "std", "median", "q1", "q3", "units", "coverage"]


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


def test_only_estimated_voxels_count_and_coverage_is_reported():
    """A map written with 0 outside its own (smaller) brain mask and where a fit failed: only the
    estimated voxels count; the old rule (every region voxel) takes the zeros in."""
    probs, atlas, brain, table = _toy()
    x = np.indices(atlas.shape)[0]
    values = np.where(atlas == 1, 1.0 + 0.1 * x, 0.8)  # a ramp along x through region 1
    own = x >= 4  # the map's brain mask misses x < 4: 4 of region 1's 10 slices
    values[~own] = 0.0
    values[5, 5, 5] = 0.0  # a failed fit inside the mask
    values[6, 5, 5] = np.nan
    masks = region_masks(atlas, table, probs, brain, 0.5)
    kw = dict(participant_id="sub-01", session_id=None, atlas="Toy", suffix="T1map", method="mle", acq="ir", units="s")
    new = roi_table(values, masks, valid=estimated_voxels(values, own, zero_is_missing=True), **kw).set_index("region")
    old = roi_table(values, masks, **kw).set_index("region")
    region = masks[[name for _, name, _ in masks].index("Cortex")][2]  # GM-dominated x < 8, z > 0
    used = region & own & np.isfinite(values) & (values != 0)
    # Truth by hand: x = 4..7 over 10 × 9 voxels each, minus the two failed voxels at x = 5 and 6.
    assert used.sum() == 4 * 90 - 2
    ramp = np.repeat(1.0 + 0.1 * np.arange(4, 8), 90)
    ramp = np.delete(ramp, [90, 180])  # one voxel of x = 5 and one of x = 6
    assert new.loc["Cortex", "n_voxels"] == ramp.size
    assert new.loc["Cortex", "median"] == pytest.approx(np.median(ramp))
    assert new.loc["Cortex", "mean"] == pytest.approx(ramp.mean())
    assert new.loc["Cortex", "coverage"] == pytest.approx(ramp.size / (8 * 90))
    assert new.loc["WhiteMatter", "coverage"] == pytest.approx(1.0)
    assert np.isnan(new.loc["Absent", "coverage"]) and new.loc["Absent", "n_voxels"] == 0
    # The old rule counts the 4 uncovered slices as T1 = 0 s: the median falls below any true value.
    assert old.loc["Cortex", "median"] < 1.4 < new.loc["Cortex", "median"]
    # Without the "0 = not estimated" convention (a fieldmap may be 0 Hz) a zero is a value.
    assert estimated_voxels(values, own).sum() == estimated_voxels(values, own, zero_is_missing=True).sum() + 1


def _sphere_phantom(tmp_path):
    """A spherical head on a 3 mm T1w grid: tissue probabilities, brain mask, a two-region atlas
    (Left, Right halves along the first axis) and a T1w, written as files; the output tree."""
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
    files["table"] = str(tmp_path / "atlas.tsv")
    pd.DataFrame({"index": [1, 2], "name": ["Left", "Right"]}).to_csv(files["table"], sep="\t", index=False)
    out = tmp_path / "out"
    anat = out / "sub-01" / "anat"
    anat.mkdir(parents=True)
    ref = anat / "sub-01_acq-x_desc-ref_bSSFP.nii.gz"
    nb.save(nb.Nifti1Image(t1w, affine), ref)
    return {"gm": gm, "wm": wm, "csf": csf, "x": ii[0], "atlas": atlas, "affine": affine, "files": files,
            "out": out, "anat": anat, "ref": str(ref)}


def _run_roi(tmp_path, ph, maps, brain_masks=None):
    from bids_qmri.anatomy.roistats import roi_analysis

    f = ph["files"]
    return roi_analysis(subject="01", session=None, output_dir=ph["out"], work_dir=tmp_path / "work", t1w=f["t1w"],
                        mask=f["mask"], probseg=[f["GM"], f["WM"], f["CSF"]], atlas_dseg=f["atlas"],
                        atlas_table=f["table"], atlas_name="Toy", ref_images=[ph["ref"]], maps=maps,
                        brain_masks=brain_masks, pv_threshold=0.5, nthreads=1)


def test_roi_analysis_identity_grid(tmp_path):
    """Maps on the T1w grid with a reference identical to the T1w: the rigid registration is
    the identity, so ROI means equal the direct NumPy means."""
    ph = _sphere_phantom(tmp_path)
    gm, wm, csf, anat = ph["gm"], ph["wm"], ph["csf"], ph["anat"]
    t1 = (1.4 * gm + 0.8 * wm + 3.5 * csf).astype(np.float32)
    map_path = anat / "sub-01_acq-x_desc-truth_T1map.nii.gz"
    nb.save(nb.Nifti1Image(t1, ph["affine"]), map_path)
    map_path.with_name(map_path.name.replace(".nii.gz", ".json")).write_text(json.dumps({"Units": "s"}))
    tsv = _run_roi(tmp_path, ph, [[str(map_path)]])
    df = pd.read_csv(tsv, sep="\t")
    assert tsv.endswith("sub-01_atlas-Toy_roistats.tsv")
    assert (anat / "sub-01_acq-x_from-bSSFP_to-T1w_mode-image_xfm.mat").is_file()
    assert set(df["units"]) == {"s"} and set(df["method"]) == {"truth"} and set(df["acq"]) == {"x"}
    rows = df.set_index("region")
    brain = (gm + wm + csf) > 0.5
    # Measured relative differences: GM 6.2e-4 (the rigid registration is not exactly the
    # identity), WM 1e-7; bound 1.5× the larger.
    for tissue, p in (("GM", gm), ("WM", wm)):
        direct = t1[brain & (p >= 0.5)].mean()
        assert rows.loc[tissue, "mean"] == pytest.approx(direct, rel=9.4e-4)
    assert rows.loc["WM", "coverage"] == 1.0  # a map without a brain mask of its own: every finite voxel


def test_roi_analysis_uses_the_maps_own_smaller_brain_mask(tmp_path):
    """The demo's IRT1 case: the modality's brain mask is smaller than the T1w's and the map is 0
    outside it (``EstimateMaps``). Each region's statistics come from the voxels inside the map's
    own mask only, and ``coverage`` says how much of the region that is. Truth: the T1 ramp along
    x over the covered voxels, computed directly."""
    ph = _sphere_phantom(tmp_path)
    gm, wm, csf, x, anat = ph["gm"], ph["wm"], ph["csf"], ph["x"], ph["anat"]
    brain = (gm + wm + csf) > 0.5
    own = brain & (x >= 13)  # the map's mask misses the first 13 slices: most of Left, part of the CSF
    t1 = (1.4 * gm + 0.8 * wm + 3.5 * csf) * (1 + 0.01 * x)
    written = np.where(own, t1, 0.0).astype(np.float32)
    map_path = anat / "sub-01_acq-x_desc-mle_T1map.nii.gz"
    nb.save(nb.Nifti1Image(written, ph["affine"]), map_path)
    map_path.with_name(map_path.name.replace(".nii.gz", ".json")).write_text(
        json.dumps({"Units": "s", "VoxelsNotEstimated": 0}))
    mask_path = anat / "sub-01_acq-x_desc-brain_mask.nii.gz"
    nb.save(nb.Nifti1Image(own.astype(np.uint8), ph["affine"]), mask_path)
    rows = pd.read_csv(_run_roi(tmp_path, ph, [[str(map_path)]], [str(mask_path)]), sep="\t").set_index("region")
    # GM dominates both atlas halves (a thick GM shell around a small WM core).
    regions = {"Left": (ph["atlas"] == 1) & brain & (gm >= 0.5), "Right": (ph["atlas"] == 2) & brain & (gm >= 0.5),
               "CSF": brain & (csf >= 0.5), "GM": brain & (gm >= 0.5)}
    # The reference-to-T1w registration is the identity only to ~1e-3 voxel, so a few voxels at a
    # tissue's 0.5-probability border may swap (measured: 1 of 796). Bounds: voxel counts 0.5 %,
    # mean 0.1 %, median one slice step of the ramp (1 %).
    for name, region in regions.items():
        covered = region & own
        assert rows.loc[name, "n_voxels"] == pytest.approx(covered.sum(), rel=5e-3)
        assert rows.loc[name, "coverage"] == pytest.approx(covered.sum() / region.sum(), rel=5e-3)
        assert rows.loc[name, "median"] == pytest.approx(np.median(t1[covered]), rel=1e-2)
        assert rows.loc[name, "mean"] == pytest.approx(t1[covered].mean(), rel=1e-3)
    assert rows.loc["Right", "coverage"] == 1.0
    assert rows.loc["Left", "coverage"] == pytest.approx(0.326, abs=2e-3)
    # The old rule (every region voxel, the zeros outside the map's mask included) gave Left a
    # median of 0 s and the CSF (64 % covered) a mean 36 % low.
    assert np.median(written[regions["Left"]]) == 0.0
    assert written[regions["CSF"]].mean() < 0.7 * t1[regions["CSF"] & own].mean()


# --- A head phantom defined in world coordinates (mm) -------------------------------------------
# An ellipsoidal brain (WM core with an off-centre ventricle, GM shell, CSF shell) inside a scalp.
# Everything is a function of position, so the same head can be evaluated on the T1w grid and,
# moved by a known rigid motion, on a reference grid: the truth on the moved grid is exact, not
# resampled. The probabilistic segmentation gives the scalp a GM-like probability (as a
# segmentation of an unstripped head does), which only the brain mask excludes.
VOX = 3.0
HEAD_SHAPE = (36, 42, 34)
HEAD_AFFINE = np.diag([VOX, VOX, VOX, 1.0])
HEAD_CENTRE = (np.array(HEAD_SHAPE) - 1) / 2 * VOX
ATLAS_NAMES = {1: "RightPosterior", 2: "LeftPosterior", 3: "RightAnterior", 4: "LeftAnterior"}


def _soft(d):
    """Partial-volume occupancy of a voxel whose centre is ``d`` mm outside a surface."""
    return np.clip(0.5 - d / VOX, 0.0, 1.0)


def _head(points):
    """Tissue probabilities, brain mask, atlas labels and a T1 map at world points ``[..., 3]``."""
    rel = points - HEAD_CENTRE
    rho = np.sqrt(((rel / np.array([1.0, 1.25, 0.95])) ** 2).sum(-1))
    vent = _soft(np.linalg.norm(rel - np.array([9.0, 12.0, 6.0]), axis=-1) - 6.0)
    wm = _soft(rho - 22.0) * (1 - vent)
    gm = _soft(rho - 30.0) - _soft(rho - 22.0)
    csf = _soft(rho - 35.0) - _soft(rho - 30.0) + _soft(rho - 22.0) * vent
    scalp = _soft(rho - 44.0) - _soft(rho - 38.0)
    grad = 1.0 + 0.004 * rel[..., 0] - 0.003 * rel[..., 1]  # smooth T1 variation across the brain
    return {
        "GM": gm + 0.7 * scalp, "WM": wm, "CSF": csf, "brain": (gm + wm + csf) >= 0.5, "scalp": scalp,
        "tissue": (gm, wm, csf),
        # octants of the brain's centre, reaching past the brain into the scalp (atlases warped
        # from a template often do)
        "atlas": np.where(rho < 44.0, 1 + (rel[..., 0] > 0) + 2 * (rel[..., 1] > 0), 0),
        "T1": (1.4 * gm + 0.8 * wm + 3.5 * csf) * grad + 0.35 * scalp,
    }


def _grid_points():
    return np.moveaxis(np.indices(HEAD_SHAPE).astype(float), 0, -1) * VOX


def _expected_rows(head, values, pv=0.5):
    """SPEC ROI rows computed directly: tissue rows and atlas regions inside the brain mask, a
    region keeping its dominant tissue's voxels with probability ≥ ``pv``. -> {region: (n, mean)}."""
    brain = head["brain"]
    probs = {t: head[t] for t in ("GM", "WM", "CSF")}
    masks = {t: brain & (p >= pv) for t, p in probs.items()}
    masks["WholeBrain"] = brain & (probs["GM"] + probs["WM"] >= pv)
    for idx, name in ATLAS_NAMES.items():
        inside = (head["atlas"] == idx) & brain
        dominant = max(probs, key=lambda t: probs[t][inside].sum())
        masks[name] = inside & (probs[dominant] >= pv)
    return {name: (int(m.sum()), float(values[m].mean())) for name, m in masks.items()}


def _atlas_table():
    return pd.DataFrame({"index": list(ATLAS_NAMES), "name": list(ATLAS_NAMES.values())})


def test_atlas_rows_respect_brain_mask_on_head_phantom():
    head = _head(_grid_points())
    brain = head["brain"]
    # The test can fail: atlas labels and a ≥ 0.5 GM probability both reach outside the mask,
    # where the map holds scalp values (0.35 s, far from any brain tissue).
    outside = (head["atlas"] > 0) & ~brain & (head["GM"] >= 0.5)
    assert 0 < brain.mean() < 0.5 and outside.sum() > 1000
    masks = region_masks(head["atlas"], _atlas_table(), {t: head[t] for t in ("GM", "WM", "CSF")}, brain, 0.5)
    df = roi_table(head["T1"], masks, participant_id="sub-01", session_id=None, atlas="Octants",
                   suffix="T1map", method="truth", acq=None, units="s").set_index("region")
    expected = _expected_rows(head, head["T1"])
    for name, (n, mean) in expected.items():
        assert df.loc[name, "n_voxels"] == n, name
        assert df.loc[name, "mean"] == pytest.approx(mean, rel=1e-9), name
    for idx, name in ATLAS_NAMES.items():  # no region row counts a voxel outside the brain
        region = next(m for i, _, m in masks if i == idx)
        assert region.any() and not (region & ~brain).any(), name
    # Without the mask the GM-dominant regions would take in the scalp: every atlas region's
    # mean would drop by 0.60-0.78 s (measured), 45-47 % of the mean.
    for idx, name in ATLAS_NAMES.items():
        loose = (head["atlas"] == idx) & (head["GM"] >= 0.5)
        assert head["T1"][loose].mean() < expected[name][1] - 0.4, name


def test_roi_analysis_moved_reference_transform_direction(tmp_path):
    """The reference (and its map) see the head moved by a known rigid motion M (10° about z,
    5° about x, shift (6, −4.5, 3) mm). roi_analysis registers the reference to the T1w and must
    bring the T1w-space segmentation and atlas onto the map's grid through M⁻¹ (the inverse of
    the written reference→T1w transform). The expected rows are computed on the map's grid from
    the moved head itself, with no registration or resampling. Applied in the wrong direction
    (M instead of M⁻¹, a 20° / 14 mm misalignment) the rows are off by 3-68 %; with no transform
    at all by 13-50 % (measured)."""
    import ants
    from scipy.spatial.transform import Rotation

    from bids_qmri.anatomy.roistats import roi_analysis

    rot = Rotation.from_euler("zx", [10.0, 5.0], degrees=True).as_matrix()
    shift = np.array([6.0, -4.5, 3.0])
    points = _grid_points()
    t1w_head = _head(points)
    # the moved head: content at q is the T1w-space content at p = M⁻¹ q, M p = R (p − c) + c + t
    ref_head = _head((points - HEAD_CENTRE - shift) @ rot + HEAD_CENTRE)

    rng = np.random.default_rng(0)
    files = {}

    def save(name, arr, dtype=np.float32, folder=tmp_path):
        files[name] = folder / f"{name}.nii.gz"
        nb.save(nb.Nifti1Image(arr.astype(dtype), HEAD_AFFINE), files[name])
        return str(files[name])

    gm, wm, csf = t1w_head["tissue"]
    save("t1w", 0.6 * wm + 0.4 * gm + 0.1 * csf + 0.8 * t1w_head["scalp"] + rng.normal(0, 0.005, HEAD_SHAPE))
    for name in ("GM", "WM", "CSF", "brain"):
        save(name, t1w_head[name])
    save("atlas", t1w_head["atlas"], np.int16)
    table = tmp_path / "atlas.tsv"
    _atlas_table().to_csv(table, sep="\t", index=False)
    out = tmp_path / "out"
    anat = out / "sub-01" / "anat"
    anat.mkdir(parents=True)
    gm, wm, csf = ref_head["tissue"]  # a different contrast (CSF bright), registered by mutual information
    ref = save("sub-01_acq-x_desc-ref_bSSFP",
               0.3 * wm + 0.5 * gm + 1.0 * csf + 0.4 * ref_head["scalp"] + rng.normal(0, 0.005, HEAD_SHAPE),
               folder=anat)
    map_path = save("sub-01_acq-x_desc-truth_T1map", ref_head["T1"], folder=anat)
    (anat / "sub-01_acq-x_desc-truth_T1map.json").write_text(json.dumps({"Units": "s"}))

    tsv = roi_analysis(subject="01", session=None, output_dir=out, work_dir=tmp_path / "work",
                       t1w=str(files["t1w"]), mask=str(files["brain"]),
                       probseg=[str(files["GM"]), str(files["WM"]), str(files["CSF"])],
                       atlas_dseg=str(files["atlas"]), atlas_table=str(table), atlas_name="Octants",
                       ref_images=[ref], maps=[[map_path]], pv_threshold=0.5, nthreads=1)
    rows = pd.read_csv(tsv, sep="\t").set_index("region")

    # The written transform maps T1w points to the reference's: M within 0.65 mm (measured
    # 0.41 mm at most, at 20-25 mm from the centre). ITK works in LPS, NIfTI in RAS.
    xfm = ants.read_transform(str(anat / "sub-01_acq-x_from-bSSFP_to-T1w_mode-image_xfm.mat"))
    lps = np.diag([-1.0, -1.0, 1.0])
    for offset in ([0, 0, 0], [20, 0, 0], [0, 25, 0], [0, 0, 20]):
        p = HEAD_CENTRE + offset
        q = lps @ np.array(xfm.apply_to_point(tuple(lps @ p)))
        assert np.linalg.norm(q - (rot @ (p - HEAD_CENTRE) + HEAD_CENTRE + shift)) < 0.65, offset

    # Measured |relative error| of the means: ≤ 0.64 % for GM, WM, WholeBrain and the regions,
    # 1.83 % for the thin, partial-volume CSF shell (linear resampling of the probabilities);
    # bounds 1.5× those.
    for name, (n, mean) in _expected_rows(ref_head, ref_head["T1"]).items():
        tol = 0.0275 if name == "CSF" else 0.0096
        assert rows.loc[name, "mean"] == pytest.approx(mean, rel=tol), name
