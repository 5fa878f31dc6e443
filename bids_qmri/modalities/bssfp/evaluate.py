"""pc-bSSFP maps of a workflow run against a synthetic dataset's ground truth, and ROI biases (lives in
the bSSFP plug-in because it reads the bSSFP grid, training range and estimators; the synthetic
phantom in ``bids_qmri.synth`` names no modality).

Shared by the workflow tests, ``benchmarks/bench_bssfp_accuracy.py`` and ``bench_bssfp_demo.py``
(per participant and session: ``ses=None`` for a dataset without a session level). Accuracy is the median
|relative error| of T1 and T2 in brain tissue: GM and WM of the ground-truth segmentation inside
the workflow's brain mask (CSF has T1/T2 far outside the networks' training range, and voxels at
the brain surface are mixtures whose ground truth is a volume average). It is reported over all
of that tissue (``"all"``) and over the voxels inside the networks' training range
(``"trained"``, SPEC §7: T1 360–2080 ms, T2 20–120 ms), where the networks are defined.

The *noise floor* is the same voxels simulated from the ground truth with noise at the dataset's
SNR and estimated directly (true B1, no image processing, no denoising): what one voxel's noise
alone costs each estimator. The workflow's denoising can go below it; motion, interpolation and
B1 processing add to it.

*ROI biases* (``truth_as_maps``, ``tissue_roi_biases``; ``benchmarks/bench_anat.py --roi`` and
``tests/test_anat_dice.py``): the ground-truth T1/T2 maps on the bSSFP grid enter the ROI step as
a perfect method's maps; the tissue means of the ROI table (our segmentation) are compared with
the same means on the truth's own tissue fractions (fraction >= 0.5 on both sides), so what
remains is the cost of segmentation and registration alone.
"""

from __future__ import annotations

from pathlib import Path

import json

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from bids_qmri.modalities.bssfp.training import DISTRIBUTIONS

TRAINED_T1 = DISTRIBUTIONS["uniform"]["T1"]
TRAINED_T2 = DISTRIBUTIONS["uniform"]["T2"]
SUFFIXES = ("T1map", "T2map")


def _session_dir(sub: str, ses: str | None) -> Path:
    """``sub-X[/ses-Y]``: where a session's files live, in the dataset and in the derivatives."""
    return Path(f"sub-{sub}") / (f"ses-{ses}" if ses else "")


def _stem(sub: str, ses: str | None, acq: str) -> str:
    return f"sub-{sub}" + (f"_ses-{ses}" if ses else "") + f"_acq-{acq}"


def _truth_dir(bids: Path, sub: str, ses: str | None = None) -> Path:
    return Path(bids) / "derivatives" / "groundtruth" / _session_dir(sub, ses)


def tissue_masks(bids: Path, out: Path, acq: str, sub: str = "01", ses: str | None = None):
    """Ground-truth T1/T2 on the bSSFP grid, the GM+WM voxels inside the workflow's brain mask,
    and those of them inside the networks' training range (``ses`` None: no session level)."""
    gt = _truth_dir(bids, sub, ses)
    stem = _stem(sub, ses, acq)
    mask = nib.load(Path(out) / _session_dir(sub, ses) / "anat" / f"{stem}_desc-brain_mask.nii.gz").get_fdata() > 0
    dseg = nib.load(gt / "anat" / f"{stem}_dseg.nii.gz").get_fdata()
    truth = {s: nib.load(gt / "anat" / f"{stem}_{s}.nii.gz").get_fdata() for s in SUFFIXES}
    tissue = mask & np.isin(dseg, (1, 2))
    t1, t2 = truth["T1map"], truth["T2map"]
    trained = (tissue & (t1 >= TRAINED_T1[0]) & (t1 <= TRAINED_T1[1])
               & (t2 >= TRAINED_T2[0]) & (t2 <= TRAINED_T2[1]))
    return truth, tissue, trained


def median_relative_error(estimate, reference, where) -> float:
    """Median |estimate − reference| / reference over ``where``, in percent."""
    return 100 * float(np.median(np.abs(estimate[where] - reference[where]) / reference[where]))


def workflow_errors(bids: Path, out: Path, acq: str, methods, sub: str = "01", ses: str | None = None) -> dict:
    """``{(method, suffix, "all" | "trained"): median |relative error| (%)}`` of the maps the
    workflow wrote under ``out`` for participant ``sub``, session ``ses`` (None: no session level)."""
    truth, tissue, trained = tissue_masks(bids, out, acq, sub, ses)
    errors = {}
    for method in methods:
        for suffix in SUFFIXES:
            path = Path(out) / _session_dir(sub, ses) / "anat" / f"{_stem(sub, ses, acq)}_desc-{method}_{suffix}.nii.gz"
            est = nib.load(path).get_fdata()
            errors[method, suffix, "all"] = median_relative_error(est, truth[suffix], tissue)
            errors[method, suffix, "trained"] = median_relative_error(est, truth[suffix], trained)
    return errors


def noise_floor(bids: Path, out: Path, acq: str, methods, protocol, model_dir: Path, *, snr: float,
                sub: str = "01", ses: str | None = None, seed: int = 11) -> dict:
    """The errors of ``workflow_errors`` without any image processing (see the module docstring)."""
    from bids_qmri.modalities.bssfp.estimate import estimate_bssfp
    from bids_qmri.physics.bssfp import bssfp_signal
    from bids_qmri.modalities.bssfp.net import configuration_noise_sigma
    from bids_qmri.physics.noise import add_complex_noise, noise_sigma
    from bids_qmri.preproc.configurations import compute_configurations

    truth, tissue, trained = tissue_masks(bids, out, acq, sub, ses)
    gt = _truth_dir(bids, sub, ses)
    stem = _stem(sub, ses, acq)
    load = lambda name: nib.load(gt / name).get_fdata()[tissue]  # noqa: E731
    b1 = load(f"fmap/{stem}_TB1map.nii.gz")
    b0 = load(f"fmap/{stem}_fieldmap.nii.gz")
    m0 = load(f"anat/{stem}_M0map.nii.gz")
    t1, t2 = truth["T1map"][tissue], truth["T2map"][tissue]
    tt = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    S = bssfp_signal(tt(t1), tt(t2), tt(m0), tt(b1), tt(b0), tr=protocol.tr, te=protocol.te,
                     flip_rad=protocol.flip_rad, phase_increments_rad=protocol.phase_increments_rad())
    S = add_complex_noise(S, snr, torch.Generator().manual_seed(seed)).numpy()
    F = compute_configurations(S, protocol.phase_increments_deg)
    in_range = trained[tissue]
    floor = {}
    for method in methods:
        maps, _ = estimate_bssfp(method, F, b1, protocol, model_dir=model_dir, seed=1,
                                 noise_sigma=configuration_noise_sigma(noise_sigma(snr), protocol.npc))
        for suffix, ref in (("T1map", t1), ("T2map", t2)):
            rel = np.abs(maps[suffix] - ref) / ref
            floor[method, suffix, "all"] = 100 * float(np.median(rel))
            floor[method, suffix, "trained"] = 100 * float(np.median(rel[in_range]))
    return floor


def error_table(errors: dict, floor: dict) -> str:
    """Plain-text table: method, map, all GM+WM (floor), inside the training range (floor)."""
    rows = [f"{'method':12s} {'map':6s} {'all GM+WM':>10s} {'(floor)':>8s} {'trained':>8s} {'(floor)':>8s}"]
    for (method, suffix, part) in errors:
        if part == "all":
            rows.append(f"{method:12s} {suffix:6s} {errors[method, suffix, 'all']:9.2f}% {floor[method, suffix, 'all']:7.2f}% "
                        f"{errors[method, suffix, 'trained']:7.2f}% {floor[method, suffix, 'trained']:7.2f}%")
    return "\n".join(rows)


def truth_as_maps(bids: Path, anat_dir: Path, acq: str = "pc12", sub: str = "01") -> tuple[str, list[str]]:
    """Write, under ``anat_dir``, the bSSFP mean magnitude as the reference image
    (``..._desc-ref_bSSFP``) and the ground-truth T1/T2 on its grid as maps of a method named
    ``truth``; returns (reference path, map paths) for the ROI step."""
    anat_dir = Path(anat_dir)
    anat_dir.mkdir(parents=True, exist_ok=True)
    stem = f"sub-{sub}_acq-{acq}"
    mag = nib.load(Path(bids) / f"sub-{sub}" / "anat" / f"{stem}_part-mag_bSSFP.nii.gz")
    ref = anat_dir / f"{stem}_desc-ref_bSSFP.nii.gz"
    nib.save(nib.Nifti1Image(mag.get_fdata(dtype=np.float32).mean(-1), mag.affine), ref)
    maps = []
    for suffix in SUFFIXES:
        dest = anat_dir / f"{stem}_desc-truth_{suffix}.nii.gz"
        nib.save(nib.load(_truth_dir(bids, sub) / "anat" / f"{stem}_{suffix}.nii.gz"), dest)
        dest.with_name(dest.name.replace(".nii.gz", ".json")).write_text(
            json.dumps({"Units": "s", "EstimationAlgorithm": "ground truth", "SkullStripped": False}))
        maps.append(str(dest))
    return str(ref), maps


def tissue_roi_biases(bids: Path, roistats_tsv: Path, acq: str = "pc12", sub: str = "01") -> dict[str, float]:
    """``{"T1 GM": %, "T1 WM": %, "T1 WholeBrain": %, "T2 ...": %}``: the ROI table's tissue means of
    the ``truth`` maps relative to the same means on the truth's fractions (bSSFP grid)."""
    gt = _truth_dir(bids, sub) / "anat"
    stem = f"sub-{sub}_acq-{acq}"
    load = lambda name: np.asanyarray(nib.load(gt / f"{stem}_{name}.nii.gz").dataobj).astype(float)  # noqa: E731
    fr = {t: load(f"label-{t}_probseg") for t in ("GM", "WM", "CSF")}
    brain = load("desc-brain_mask") > 0
    df = pd.read_csv(roistats_tsv, sep="\t", na_values="n/a", keep_default_na=False)
    df = df[df["method"] == "truth"]
    biases = {}
    for suffix in SUFFIXES:
        values = load(suffix)
        rows = df[df.suffix == suffix].set_index("region")
        for tissue, sel in (("GM", fr["GM"] >= 0.5), ("WM", fr["WM"] >= 0.5),
                            ("WholeBrain", (fr["GM"] + fr["WM"]) >= 0.5)):
            direct = values[brain & sel].mean()
            biases[f"{suffix[:2]} {tissue}"] = 100 * float(rows.loc[tissue, "mean"] / direct - 1)
    return biases
