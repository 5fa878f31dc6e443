"""Anatomical + ROI workflows and the report on a bids_qmri-synth phantom, against its ground truth.

One module-scoped run (low resolution, 2 threads): T1w -> N4 -> template registration ->
Atropos -> atlas; the ground-truth T1/T2 maps on the bSSFP grid go through the ROI workflow as if
they were a method's maps, with the bSSFP mean magnitude as their reference image.
"""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
import pytest

from bids_qmri.modalities import bidsignore_lines

pytestmark = pytest.mark.slow

SUB = "01"
ACQ_BSSFP = "pc12"
RES_MM = 3.0


def _gt(bids: Path, name: str) -> Path:
    return bids / "derivatives" / "groundtruth" / f"sub-{SUB}" / ("fmap" if "fieldmap" in name else "anat") / name


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from nipype.pipeline import engine as pe

    from bids_qmri.bids.derivatives import init_derivatives
    from bids_qmri.bids.inputs import SessionInputs
    from bids_qmri.config import Config
    from bids_qmri.reports.participant import write_participant_report
    from bids_qmri.synth.dataset import SynthOptions, write_dataset
    from bids_qmri.workflows.anat import init_anat_wf
    from bids_qmri.workflows.roi import init_roi_wf

    root = tmp_path_factory.mktemp("anatwf")
    bids = root / "bids"
    write_dataset(bids, SynthOptions(participants=1, sessions=0, resolution=RES_MM, seed=2, kinds=("t1w", "bssfp")),
                  progress=False)
    out = root / "out"
    config = Config(bids_dir=bids, output_dir=out, work_dir=root / "work", omp_nthreads=2, nprocs=2, seed=0)
    init_derivatives(out, bids, extra_ignore=bidsignore_lines())
    t1w = bids / f"sub-{SUB}" / "anat" / f"sub-{SUB}_acq-mprage_T1w.nii.gz"
    anat_dir = out / f"sub-{SUB}" / "anat"
    anat_dir.mkdir(parents=True, exist_ok=True)
    # Stand-ins for the bSSFP workflow's outputs: its reference image (mean magnitude over phase
    # cycles) and "maps" that are the ground truth on the bSSFP grid.
    mag = nb.load(bids / f"sub-{SUB}" / "anat" / f"sub-{SUB}_acq-{ACQ_BSSFP}_part-mag_bSSFP.nii.gz")
    ref = anat_dir / f"sub-{SUB}_acq-{ACQ_BSSFP}_desc-ref_bSSFP.nii.gz"
    nb.save(nb.Nifti1Image(mag.get_fdata(dtype=np.float32).mean(-1), mag.affine), ref)
    maps = []
    for suffix in ("T1map", "T2map"):
        src = _gt(bids, f"sub-{SUB}_acq-{ACQ_BSSFP}_{suffix}.nii.gz")
        dest = anat_dir / f"sub-{SUB}_acq-{ACQ_BSSFP}_desc-truth_{suffix}.nii.gz"
        shutil.copyfile(src, dest)
        dest.with_name(dest.name.replace(".nii.gz", ".json")).write_text(
            json.dumps({"Units": "s", "EstimationAlgorithm": "ground truth", "SkullStripped": False}))
        maps.append(str(dest))
    wf = pe.Workflow(name="test_anat_roi", base_dir=str(root / "work"))
    anat = init_anat_wf(t1w, SUB, None, config)
    roi = init_roi_wf(SUB, None, config)
    roi.inputs.inputnode.ref_image = [str(ref)]
    roi.inputs.inputnode.maps = [maps]
    fields = ["t1w_preproc", "t1w_mask", "dseg", "probseg", "atlas_dseg", "atlas_table", "atlas_name"]
    wf.connect(anat, [f"outputnode.{f}" for f in fields][0], roi, "inputnode.t1w_preproc")
    for f in fields[1:]:
        wf.connect(anat, f"outputnode.{f}", roi, f"inputnode.{f}")
    wf.run(plugin="Linear")
    sess = SessionInputs(subject=SUB, session=None, t1w=[t1w])
    report = write_participant_report(out, SUB, [sess], config)
    return {"bids": bids, "out": out, "anat": anat_dir, "report": report, "t1w": t1w}


def _load(path) -> np.ndarray:
    return np.asanyarray(nb.load(path).dataobj)


def test_spec_outputs_exist(run):
    a = run["anat"]
    for name in ("desc-preproc_T1w", "desc-brain_mask", "dseg", "label-GM_probseg", "label-WM_probseg",
                 "label-CSF_probseg", "atlas-AAL_dseg"):
        assert (a / f"sub-{SUB}_{name}.nii.gz").is_file(), name
        assert (a / f"sub-{SUB}_{name}.json").is_file(), name
    assert pd.read_csv(a / f"sub-{SUB}_dseg.tsv", sep="\t")["name"].tolist() == ["gray matter", "white matter",
                                                                                   "cerebrospinal fluid"]
    table = pd.read_csv(a / f"sub-{SUB}_atlas-AAL_dseg.tsv", sep="\t")
    assert list(table.columns) == ["index", "name"] and len(table) == 116
    for xfm in ("from-T1w_to-MNI152NLin2009aSym", "from-MNI152NLin2009aSym_to-T1w"):
        assert (a / f"sub-{SUB}_{xfm}_mode-image_xfm.h5").is_file()
    assert (a / f"sub-{SUB}_acq-{ACQ_BSSFP}_from-bSSFP_to-T1w_mode-image_xfm.mat").is_file()
    from helpers import validate_bids

    result = validate_bids(run["out"], derivative=True)
    assert result.ok, result.summary()


def test_tissue_dice_against_truth(run):
    from bids_qmri.anatomy.segmentation import dice

    truth = _load(_gt(run["bids"], f"sub-{SUB}_acq-mprage_dseg.nii.gz"))
    ours = _load(run["anat"] / f"sub-{SUB}_dseg.nii.gz")
    assert truth.shape == ours.shape
    scores = {t: dice(truth == i, ours == i) for i, t in ((1, "GM"), (2, "WM"), (3, "CSF"))}
    print("Dice", scores, "brain", dice(truth > 0, ours > 0))
    # Brain mask from the brain-affine stage: measured 0.975 (0.978 with Colin27 as the initial
    # head, 0.948 when the mask came from the head affine and SyN).
    assert dice(truth > 0, ours > 0) >= 0.97
    # Issue 5 asks for >= 0.8 on every class: shown at the 1 mm a researcher acquires
    # (test_anat_dice.py). At 3 mm, measured (crisp phantom anatomy, Atropos prior weight 0.25,
    # synthetic-head initial affine): GM 0.809, WM 0.795, CSF 0.701 (benchmarks/bench_anat.py,
    # seeds 3 / 4: 0.899 / 0.896 / 0.624, 0.895 / 0.890 / 0.581). Guards against regressions.
    assert scores["GM"] >= 0.8 and scores["WM"] >= 0.78 and scores["CSF"] >= 0.68
    # CSF at 3 mm is mostly partial volume (44 % of the truth's CSF voxels hold 40-60 % CSF):
    # noise-free, inside the true brain mask, the best intensity threshold scores 0.70. Compare
    # the probabilistic overlap too, which counts partial voxels by their fraction.
    gt_csf = _load(_gt(run["bids"], f"sub-{SUB}_acq-mprage_label-CSF_probseg.nii.gz")).astype(float)
    our_csf = _load(run["anat"] / f"sub-{SUB}_label-CSF_probseg.nii.gz").astype(float)
    soft = 2 * np.minimum(gt_csf, our_csf).sum() / (gt_csf.sum() + our_csf.sum())
    print("CSF soft Dice", soft, "hard", scores["CSF"])
    assert soft >= 0.63  # measured 0.656


def test_atlas_covers_the_brain(run):
    truth = _load(_gt(run["bids"], f"sub-{SUB}_acq-mprage_dseg.nii.gz"))
    atlas = _load(run["anat"] / f"sub-{SUB}_atlas-AAL_dseg.nii.gz")
    gm = truth == 1
    covered = ((atlas > 0) & gm).sum() / gm.sum()
    inside = ((atlas > 0) & (truth > 0)).sum() / (atlas > 0).sum()
    print("atlas covers", covered, "of GM; inside brain", inside)
    # AAL was drawn on Colin27, not on the MNI152 2009 template, and labels GM only: about 80 %
    # of the phantom's GM voxels receive a label, and labels rarely fall outside the brain.
    assert covered >= 0.75
    assert inside >= 0.95  # measured 0.967 (0.981 with Colin27 as the initial head; 0.876 when SyN grew onto the marrow)
    # Left labels (odd AAL indices) on the left (x < 0 in RAS mm), right ones on the right.
    # Hemispheres: for every AAL pair (odd _L, even _R, indices 1-90) the right label's centroid
    # lies to the right of the left one, along one common left-right axis close to +x (the
    # acquisition's head pose rotates the phantom a little, so the midline is not x = 0).
    img = nb.load(run["anat"] / f"sub-{SUB}_atlas-AAL_dseg.nii.gz")

    def centroid(lab):
        ijk = np.argwhere(atlas == lab)
        return nb.affines.apply_affine(img.affine, ijk).mean(0) if len(ijk) else None

    pairs = [(centroid(k), centroid(k + 1)) for k in range(1, 91, 2)]
    d = np.array([r - l for l, r in pairs if l is not None and r is not None])
    axis = d.mean(0) / np.linalg.norm(d.mean(0))
    assert len(d) >= 40 and axis[0] > 0.9
    assert (d @ axis > 0).all()
    assert len(np.unique(atlas[atlas > 0])) >= 100


def test_user_atlas_custom_table(run, tmp_path):
    """A user atlas (AAL with hemispheres merged, labelled in the MCALT_ADIR122.txt style:
    headerless "number,name" rows) goes through the saved template->T1w transform and lands
    where the merged AAL labels are."""
    from bids_qmri.anatomy.atlases import read_label_table
    from bids_qmri.anatomy.pipeline import atlas_to_native
    from bids_qmri.anatomy.segmentation import dice

    aal = nb.load("/usr/share/mricron/templates/aal.nii.gz")
    merged = (np.asarray(aal.dataobj).astype(np.int16) + 1) // 2
    labels = tmp_path / "MCALT_Merged.nii.gz"
    nb.save(nb.Nifti1Image(merged, aal.affine), labels)
    names = read_label_table("/usr/share/mricron/templates/aal.nii.txt").set_index("index")["name"]
    (tmp_path / "MCALT_Merged.txt").write_text(
        "".join(f"{k},{names[2 * k - 1].removesuffix('_L')}\n" for k in range(1, 59)) + "59,Unknown\n")
    a = run["anat"]
    out = atlas_to_native(f"{labels}:{tmp_path / 'MCALT_Merged.txt'}", str(a / f"sub-{SUB}_desc-preproc_T1w.nii.gz"),
                          str(a / f"sub-{SUB}_from-MNI152NLin2009aSym_to-T1w_mode-image_xfm.h5"), tmp_path / "native",
                          mask=str(a / f"sub-{SUB}_desc-brain_mask.nii.gz"), nthreads=2)
    assert out["atlas_name"] == "MCALTMerged"
    table = pd.read_csv(out["atlas_table"], sep="\t")
    assert len(table) == 58 and "Unknown" not in set(table["name"])  # 59 never occurs in the image
    ours = _load(out["atlas_dseg"])
    native_aal = _load(a / f"sub-{SUB}_atlas-AAL_dseg.nii.gz")
    assert dice(ours > 0, native_aal > 0) >= 0.95
    both = (ours > 0) & (native_aal > 0)
    assert np.mean(ours[both] == (native_aal[both] + 1) // 2) >= 0.95


def test_transform_to_template(run):
    """The saved from-T1w_to-<template> composite brings the phantom's true brain onto the
    template's brain mask (contrast-free check of the normalisation)."""
    from bids_qmri.anatomy import registration as reg
    from bids_qmri.anatomy.segmentation import dice
    from bids_qmri.anatomy.templates import load_template

    tpl = load_template(None)
    tpl_path = run["out"].parent / "tpl_mask.nii.gz"
    nb.save(tpl.mask, tpl_path)
    xfm = run["anat"] / f"sub-{SUB}_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.h5"
    truth = _gt(run["bids"], f"sub-{SUB}_acq-mprage_desc-brain_mask.nii.gz")
    moved = reg.apply(str(truth), str(tpl_path), [str(xfm)]).numpy() >= 0.5
    score = dice(moved, tpl.mask.get_fdata() > 0)
    print("brain Dice in template space", score)
    assert score >= 0.95  # measured 0.965 (0.974 with Colin27 as the initial head)


def test_roi_chain_matches_phantom(run, tmp_path):
    """ROI machinery alone (rigid bSSFP->T1w, resampling onto the map grid, PV selection,
    statistics) with the truth segmentation on the T1w grid: tissue means within 2 % of the
    means computed directly on the bSSFP-grid truth."""
    from bids_qmri.anatomy.roistats import roi_analysis

    gtt = f"sub-{SUB}_acq-mprage"
    a = run["anat"]
    out = tmp_path / "out"
    tsv = roi_analysis(
        subject=SUB, session=None, output_dir=out, work_dir=tmp_path / "work",
        t1w=str(a / f"sub-{SUB}_desc-preproc_T1w.nii.gz"),
        mask=str(_gt(run["bids"], f"{gtt}_desc-brain_mask.nii.gz")),
        probseg=[str(_gt(run["bids"], f"{gtt}_label-{t}_probseg.nii.gz")) for t in ("GM", "WM", "CSF")],
        atlas_dseg=str(a / f"sub-{SUB}_atlas-AAL_dseg.nii.gz"), atlas_table=str(a / f"sub-{SUB}_atlas-AAL_dseg.tsv"),
        atlas_name="AAL", ref_images=[str(a / f"sub-{SUB}_acq-{ACQ_BSSFP}_desc-ref_bSSFP.nii.gz")],
        maps=[str(p) for p in sorted(a.glob("*_desc-truth_*map.nii.gz"))], nthreads=2)
    # Whole-brain T2 (GM+WM >= 0.5) is the one row within 3 %: CSF (T2 = 2 s, 20x WM) in its
    # border voxels moves its mean when the probabilities are interpolated onto the bSSFP grid.
    _compare_with_direct(run, pd.read_csv(tsv, sep="\t"), rel=0.02, rel_wholebrain_t2=0.03)


def _compare_with_direct(run, df, rel, rel_wholebrain_t2=None):
    grid = f"sub-{SUB}_acq-{ACQ_BSSFP}"
    fr = {t: _load(_gt(run["bids"], f"{grid}_label-{t}_probseg.nii.gz")).astype(float) for t in ("GM", "WM", "CSF")}
    brain = _load(_gt(run["bids"], f"{grid}_desc-brain_mask.nii.gz")) > 0
    for suffix in ("T1map", "T2map"):
        values = _load(_gt(run["bids"], f"{grid}_{suffix}.nii.gz")).astype(float)
        rows = df[df.suffix == suffix].set_index("region")
        for tissue, sel in (("GM", fr["GM"] >= 0.5), ("WM", fr["WM"] >= 0.5),
                            ("WholeBrain", (fr["GM"] + fr["WM"]) >= 0.5)):
            direct = values[brain & sel].mean()
            ours = rows.loc[tissue, "mean"]
            print(suffix, tissue, f"pipeline {ours:.4f} direct {direct:.4f} ({100 * (ours / direct - 1):+.2f} %)")
            tol = rel_wholebrain_t2 if (tissue, suffix) == ("WholeBrain", "T2map") and rel_wholebrain_t2 else rel
            assert ours == pytest.approx(direct, rel=tol)


def test_roi_table_matches_phantom(run):
    tsv = run["anat"] / f"sub-{SUB}_atlas-AAL_roistats.tsv"
    df = pd.read_csv(tsv, sep="\t", na_values="n/a", keep_default_na=False)
    assert list(df.columns) == ["participant_id", "session_id", "atlas", "region_index", "region", "suffix",
                                "method", "acq", "n_voxels", "mean", "std", "median", "q1", "q3", "units",
                                "coverage"]
    assert set(df["suffix"]) == {"T1map", "T2map"} and set(df["method"]) == {"truth"}
    assert set(df["acq"]) == {ACQ_BSSFP} and set(df["units"]) == {"s"} and set(df["atlas"]) == {"AAL"}
    # Whole pipeline (our segmentation): the region's voxel set differs from the truth's by the
    # segmentation error, so the means can move; issue 5 asks for 2 %. Measured (crisp phantom
    # anatomy, Atropos prior weight 0.25, synthetic-head initial affine): T1 GM -0.19 %, WM +0.97 %,
    # WholeBrain -1.39 %; T2 within 0.84 %. On a head the pipeline has never seen (colin27) the
    # biases are larger: tests/test_anat_dice.py. On the earlier fuzzy-anatomy phantom T1 GM was -1.75 % (-3.95 % with the
    # head-affine brain mask, skull/marrow edge voxels entering GM).
    _compare_with_direct(run, df, rel=0.02)


def test_report_renders(run):
    html = run["report"].read_text()

    class P(HTMLParser):
        imgs: list = []

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.imgs.append(dict(attrs)["src"])

    p = P()
    p.feed(html)
    assert len(p.imgs) >= 5
    for src in p.imgs:
        assert (run["out"] / src).is_file()
    assert "desc-truth" in html and "Precentral_L" in html
