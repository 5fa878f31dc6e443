"""Inversion-recovery T1 and multi-echo T2 (the relax modality): discovery on the BIDS examples,
the plan, bad series, the contract's estimate, and the workflow against the synthetic phantom's
ground truth (without noise: median |relative error| ≤ 1 %; at the default SNR: within one
percentage point of the per-voxel Cramér–Rao floor).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_qmri import modalities
from bids_qmri.bids.derivatives import init_derivatives
from bids_qmri.bids.discovery import discover
from bids_qmri.cli.run import main
from bids_qmri.config import Config
from bids_qmri.errors import EXIT_INPUT
from bids_qmri.modalities.base import EstimateContext
from bids_qmri.modalities.relax.inputs import SeriesProtocol
from helpers import run_cli, save_img, validate_bids, write_json


def _config(bids_dir, tmp_path, **kw):
    return Config(bids_dir=Path(bids_dir), output_dir=tmp_path / "out", **kw)


# ------------------------------------------------------------------------------------ discovery
def test_irt1_four_inversion_times_with_inherited_metadata(bids_examples, tmp_path):
    (sess,) = discover(_config(bids_examples / "qmri_irt1", tmp_path, dry_run=True))
    assert (sess.subject, sess.session) == ("01", None)
    (series,) = sess.inputs["irt1"]
    assert series.values == [0.05, 0.4, 1.1, 2.5]
    assert [p.name for p in series.files] == [f"sub-01_inv-0{i}_IRT1.nii.gz" for i in range(1, 5)]
    # Top-level IRT1.json is inherited by every file.
    for meta in series.metadata:
        assert meta["RepetitionTimeExcitation"] == 2.55 and meta["FlipAngle"] == 3
        assert meta["Manufacturer"] == "Siemens"
    assert not sess.skipped and not sess.inputs["bssfp"] and not sess.inputs["mese"]


def test_mese_32_echo_times(bids_examples, tmp_path):
    (sess,) = discover(_config(bids_examples / "qmri_mese", tmp_path, dry_run=True))
    (series,) = sess.inputs["mese"]
    assert len(series.files) == 32
    np.testing.assert_allclose(series.values, np.arange(1, 33) * 0.01, rtol=0, atol=1e-12)
    assert all(m["PulseSequenceType"] == "SE" for m in series.metadata)
    assert not sess.skipped


def test_examples_plan_cleanly_and_list_their_maps(bids_examples, tmp_path, capsys):
    """The real bids-examples trees plan without a skip and list the maps a run writes."""
    out = tmp_path / "o"
    assert main([str(bids_examples / "qmri_irt1"), str(out), "participant", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "InversionTime = [0.05, 0.4, 1.1, 2.5] s" in text and "skipped inputs" not in text
    for name in ("sub-01_desc-mle_T1map.nii.gz", "sub-01_desc-mle_M0map.nii.gz", "sub-01_desc-mle_IEmap.nii.gz",
                 "sub-01_desc-ref_IRT1.nii.gz", "sub-01_from-IRT1_to-T1w_mode-image_xfm.mat",
                 "sub-01_atlas-AAL_roistats.tsv"):
        assert f"sub-01/anat/{name}" in text, name
    assert "not processed by this version" not in text
    assert main([str(bids_examples / "qmri_mese"), str(out), "participant", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "32 files: sub-01_echo-{01..32}_MESE.nii.gz" in text
    assert "0.01, 0.02" in text and "0.32] s" in text
    assert "sub-01/anat/sub-01_desc-mle_T2map.nii.gz" in text and "skipped inputs" not in text
    assert not out.exists()  # a dry run writes nothing


def test_examples_run_skips_the_empty_images_with_one_line(bids_examples, tmp_path):
    """A real run reads the images: the examples' are empty, so the series is skipped, named."""
    proc = run_cli(bids_examples / "qmri_irt1", tmp_path / "out", "participant", "--skip-bids-validation",
                   "-w", tmp_path / "w")
    assert proc.returncode == EXIT_INPUT, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("bids_qmri: error:")]
    assert "no processable input" in line and "sub-01_inv-01_IRT1.nii.gz: is an empty file (0 bytes)" in line


@pytest.mark.slow
def test_synthetic_dataset_series(synth_dataset, tmp_path):
    """bids_qmri-synth's IRT1 and MESE series are found whole, sorted, nothing skipped."""
    for sess in discover(_config(synth_dataset, tmp_path)):
        assert not sess.skipped and not sess.unprocessed
        (ir,) = sess.inputs["irt1"]
        (se,) = sess.inputs["mese"]
        assert ir.acq == "ir" and ir.values == [0.1, 0.3, 0.6, 1.0, 1.6, 2.5]
        assert se.acq == "se" and se.values == [0.01, 0.02, 0.04, 0.08, 0.16, 0.32]


# ---------------------------------------------------------------------------------- bad series
def _series_dataset(root: Path, n=6, kind="IRT1", shape=(6, 5, 4), times=None, seed=0) -> Path:
    """A tiny valid dataset with one IRT1 (or MESE) series (plausible IR / T2 signals)."""
    write_json(root / "dataset_description.json", {"Name": "relax", "BIDSVersion": "1.10.0"})
    anat = root / "sub-01" / "anat"
    rng = np.random.default_rng(seed)
    t1 = rng.uniform(0.7, 1.5, shape)
    t2 = rng.uniform(0.06, 0.12, shape)
    if times is None:
        times = np.linspace(0.1, 2.5, n) if kind == "IRT1" else np.linspace(0.01, 0.2, n)
    entity, key = ("inv", "InversionTime") if kind == "IRT1" else ("echo", "EchoTime")
    for i, t in enumerate(times, start=1):
        sig = np.abs(1 - 2 * np.exp(-t / t1)) if kind == "IRT1" else np.exp(-t / t2)
        save_img(anat / f"sub-01_acq-x_{entity}-{i}_{kind}.nii.gz", 1000 * sig + 1)
        write_json(anat / f"sub-01_acq-x_{entity}-{i}_{kind}.json", {key: float(t)})
    return root


@pytest.mark.parametrize("damage, culprit, reason", [
    ("missing", "sub-01_acq-x_inv-1_IRT1.nii.gz", "IRT1 series lacks inv-3 (found inv-1, 2, 4, 5, 6)"),
    ("milliseconds", "sub-01_acq-x_inv-6_IRT1.nii.gz", "InversionTime 2500 looks like milliseconds"),
    ("shape", "sub-01_acq-x_inv-4_IRT1.nii.gz", "shape (3, 5, 4) differs from sub-01_acq-x_inv-1_IRT1.nii.gz's"),
    ("zeros", "sub-01_acq-x_inv-2_IRT1.nii.gz", "contains only zeros"),
    ("no time", "sub-01_acq-x_inv-5_IRT1.nii.gz", "missing or non-numeric InversionTime"),
    ("repeat", "sub-01_acq-x_inv-2_IRT1.nii.gz", "InversionTime 0.1 repeats sub-01_acq-x_inv-1_IRT1.nii.gz's"),
])
def test_bad_series_are_skipped_naming_the_file(tmp_path, damage, culprit, reason):
    root = _series_dataset(tmp_path / "bids")
    anat = root / "sub-01" / "anat"
    if damage == "missing":
        (anat / "sub-01_acq-x_inv-3_IRT1.nii.gz").unlink()
        (anat / "sub-01_acq-x_inv-3_IRT1.json").unlink()
    elif damage == "milliseconds":
        for i, t in enumerate(np.linspace(100, 2500, 6), start=1):
            write_json(anat / f"sub-01_acq-x_inv-{i}_IRT1.json", {"InversionTime": float(t)})
    elif damage == "shape":
        save_img(anat / "sub-01_acq-x_inv-4_IRT1.nii.gz", np.ones((3, 5, 4)))
    elif damage == "zeros":
        save_img(anat / "sub-01_acq-x_inv-2_IRT1.nii.gz", np.zeros((6, 5, 4)))
    elif damage == "no time":
        write_json(anat / "sub-01_acq-x_inv-5_IRT1.json", {"InversionTime": "late"})
    elif damage == "repeat":
        write_json(anat / "sub-01_acq-x_inv-2_IRT1.json", {"InversionTime": 0.1})
    (sess,) = discover(_config(root, tmp_path))
    assert not sess.inputs["irt1"]
    (skip,) = sess.skipped
    assert Path(skip.path).name == culprit and reason in skip.reason, skip
    assert "\n" not in skip.reason
    # the command line ends with that one line and a non-zero exit, no traceback
    proc = run_cli(root, tmp_path / "out", "participant", "--skip-bids-validation", "-w", tmp_path / "w")
    assert proc.returncode == EXIT_INPUT and "Traceback" not in proc.stderr, proc.stderr
    assert f"bids_qmri: skipped {anat / culprit}: {reason}" in proc.stderr


def test_too_few_echo_times(tmp_path):
    root = _series_dataset(tmp_path / "bids", n=2, kind="MESE")
    (sess,) = discover(_config(root, tmp_path))
    assert not sess.inputs["mese"] and "only 2 TEs; 3 are needed" in sess.skipped[0].reason


# ---------------------------------------------------------------------------- contract estimate
def _relax_volume(shape=(7, 6, 5), seed=3):
    """Off-grid IR/T2 parameters per voxel and their noise-free magnitudes (the physics layer)."""
    import torch

    from bids_qmri.physics.relaxation import inversion_recovery, t2_decay

    rng = np.random.default_rng(seed)
    p = {"T1": rng.uniform(0.55, 2.7, shape), "T2": rng.uniform(0.045, 0.35, shape),
         "A": rng.uniform(200, 900, shape), "B": rng.uniform(1.7, 1.99, shape)}
    ti = np.array([0.08, 0.21, 0.43, 0.77, 1.3, 2.2, 3.9])
    te = np.array([0.012, 0.027, 0.045, 0.08, 0.15, 0.31])
    ir = inversion_recovery(torch.tensor(p["A"]), torch.tensor(p["B"]), torch.tensor(p["T1"]), ti).numpy()
    t2 = t2_decay(torch.tensor(p["A"]), torch.tensor(p["T2"]), te).numpy()
    return p, ti, te, ir, t2


def test_estimate_recovers_off_grid_parameters_through_the_contract():
    p, ti, te, ir, t2 = _relax_volume()
    mask = np.ones(ir.shape[:3], bool)
    mask[0] = False
    irt1, mese = modalities.get("irt1"), modalities.get("mese")
    ctx = EstimateContext()
    maps, prov = irt1.method("mle").estimate({"signal": ir}, mask, SeriesProtocol("InversionTime", tuple(ti)), ctx)
    assert set(maps) == {"T1map", "M0map", "IEmap"} and set(maps) == {s.suffix for s in irt1.method("mle").maps}
    for suffix, key in (("T1map", "T1"), ("M0map", "A"), ("IEmap", "B")):
        np.testing.assert_allclose(maps[suffix][mask], p[key][mask], rtol=1e-5)
        assert np.isnan(maps[suffix][~mask]).all()
    assert prov["voxels_invalid"] == 0 and "Gaussian" in prov["algorithm"] and "Sabidussi" in prov["reference"]
    maps, prov = mese.method("mle").estimate({"signal": t2}, mask, SeriesProtocol("EchoTime", tuple(te)), ctx)
    np.testing.assert_allclose(maps["T2map"][mask], p["T2"][mask], rtol=1e-5)
    np.testing.assert_allclose(maps["M0map"][mask], p["A"][mask], rtol=1e-5)


def test_protocol_round_trip_and_key():
    prot = SeriesProtocol("InversionTime", (0.1, 0.3, 0.6))
    assert SeriesProtocol.from_dict(prot.as_dict()) == prot
    assert prot.key() == SeriesProtocol("InversionTime", (0.1 + 1e-9, 0.3, 0.6)).key()
    assert prot.key() != SeriesProtocol("EchoTime", (0.1, 0.3, 0.6)).key()
    assert "3 TIs [100, 300, 600] ms" == prot.describe()


# ------------------------------------------------------------------------------- the workflow
def _synth(out: Path, *extra) -> Path:
    exe = Path(sys.executable).parent / "bids_qmri-synth"
    cmd = [str(exe), str(out), "--participants", "1", "--sessions", "0", "--resolution", "4",
           "--seed", "1", "--kinds", "irt1", "mese", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def _run(bids: Path, out: Path, work: Path, methods=("mle",)) -> dict:
    from bids_qmri.workflows.base import mapped_inputs

    config = Config(bids_dir=bids, output_dir=out, work_dir=work, methods={"irt1": methods, "mese": methods},
                    nprocs=2, omp_nthreads=1, seed=1, device="cpu")
    (sess,) = discover(config)
    init_derivatives(out, bids, extra_ignore=modalities.bidsignore_lines())
    written = {}
    for modality, item in mapped_inputs(sess, config):
        wf = modality.init_workflow(item, sess, config, f"{modality.name}_wf")
        wf.base_dir = str(work)
        wf.run(plugin="Linear")
        written[modality.name] = item
    return written


def _truth(bids: Path, acq: str):
    gt = bids / "derivatives" / "groundtruth" / "sub-01"
    load = lambda d, s: nib.load(gt / d / f"sub-01_acq-{acq}_{s}.nii.gz").get_fdata()  # noqa: E731
    return {s: load("anat", s) for s in ("T1map", "T2map", "M0map", "dseg")} | {"B1": load("fmap", "TB1map")}


def _errors(out: Path, bids: Path, acq: str, suffix: str, truth_key: str, method: str = "mle"):
    anat = out / "sub-01" / "anat"
    est = nib.load(anat / f"sub-01_acq-{acq}_desc-{method}_{suffix}.nii.gz").get_fdata()
    mask = nib.load(anat / f"sub-01_acq-{acq}_desc-brain_mask.nii.gz").get_fdata() > 0
    truth = _truth(bids, acq)
    tissue = mask & np.isin(truth["dseg"], (1, 2))
    rel = np.abs(est[tissue] - truth[truth_key][tissue]) / truth[truth_key][tissue]
    return rel, tissue, truth


@pytest.fixture(scope="module")
def noise_free(tmp_path_factory):
    root = tmp_path_factory.mktemp("relax_clean")
    bids = _synth(root / "bids", "--snr", "inf")
    _run(bids, root / "out", root / "work")
    return bids, root / "out"


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    root = tmp_path_factory.mktemp("relax_noisy")
    bids = _synth(root / "bids")
    _run(bids, root / "out", root / "work", methods=("mle", "rim", "resnet"))  # the bundled networks
    return bids, root / "out"


def test_mask_image_is_the_shortest_ti_for_ir_and_the_mean_for_mese(tmp_path):
    """The brain mask of an IRT1 series comes from its shortest-TI volume (in any file order),
    that of a MESE series from the mean over the echoes."""
    from bids_qmri.modalities.relax.interfaces import MotionCorrectSeries
    from bids_qmri.modalities.relax.workflow import mask_volume

    assert mask_volume("IRT1", (0.1, 0.3, 2.5)) == 0 and mask_volume("IRT1", (0.6, 0.05, 1.0)) == 1
    assert mask_volume("MESE", (0.01, 0.02)) == -1
    series = np.random.default_rng(0).uniform(0, 1, (4, 5, 3, 3)).astype(np.float32)
    path = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(series, np.eye(4)), path)
    for volume, expected in ((1, series[..., 1]), (-1, series.mean(-1))):
        (tmp_path / f"v{volume}").mkdir()
        res = MotionCorrectSeries(in_file=str(path), ref_index=1, enabled=False, mask_volume=volume).run(
            cwd=str(tmp_path / f"v{volume}"))
        assert np.allclose(nib.load(res.outputs.mask_image).get_fdata(), expected, atol=1e-6)


@pytest.mark.slow
def test_brain_masks_match_the_truth(noisy):
    """The workflow's IRT1 and MESE masks against the phantom's brain on each series' grid. The
    mean magnitude over the TIs (the written reference image, the IRT1 mask image before issue 17)
    mixes each tissue's null and gives a worse mask on the same data."""
    from bids_qmri.preproc.mask import brain_mask

    bids, out = noisy
    anat, gt = out / "sub-01" / "anat", bids / "derivatives" / "groundtruth" / "sub-01" / "anat"

    def dice(a, b):
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    scores = {}
    for acq in ("ir", "se"):
        mask = nib.load(anat / f"sub-01_acq-{acq}_desc-brain_mask.nii.gz").get_fdata() > 0
        truth = nib.load(gt / f"sub-01_acq-{acq}_desc-brain_mask.nii.gz").get_fdata() > 0.5
        scores[acq] = dice(mask, truth)
    ref = nib.load(anat / "sub-01_acq-ir_desc-ref_IRT1.nii.gz")
    old = brain_mask(ref.get_fdata(), ref.header.get_zooms()[:3])
    truth = nib.load(gt / "sub-01_acq-ir_desc-brain_mask.nii.gz").get_fdata() > 0.5
    scores["ir_mean"] = dice(old, truth)
    # Measured (4 mm, seed 1): IRT1 0.903, MESE 0.979, the mean-magnitude IRT1 mask 0.812.
    assert scores["ir"] > 0.88 and scores["se"] > 0.88
    assert scores["ir"] > scores["ir_mean"] + 0.05


@pytest.mark.slow
def test_noise_free_maps_within_one_percent(noise_free):
    """GM+WM of the ground truth inside the workflow's mask, motion between the files corrected."""
    bids, out = noise_free
    for acq, suffix, key in (("ir", "T1map", "T1map"), ("se", "T2map", "T2map")):
        rel, tissue, _ = _errors(out, bids, acq, suffix, key)
        assert tissue.sum() > 500
        assert np.median(rel) < 0.01, (suffix, np.median(rel))
    # the inversion efficiency of a B1-scaled 180° pulse, B = 1 − cos(π B1)
    rel, tissue, truth = _errors(out, bids, "ir", "T1map", "T1map")
    est_b = nib.load(out / "sub-01" / "anat" / "sub-01_acq-ir_desc-mle_IEmap.nii.gz").get_fdata()
    true_b = 1 - np.cos(np.pi * truth["B1"])
    assert np.median(np.abs(est_b[tissue] - true_b[tissue]) / true_b[tissue]) < 0.01


@pytest.mark.slow
def test_noisy_maps_within_one_point_of_the_cramer_rao_floor(noisy):
    """Median |relative error| ≤ median per-voxel CRB floor + 1 percentage point. The floor is the
    median |error| of an efficient unbiased estimator, 0.6745·√CRB, with the noise σ the dataset
    was simulated with (bids_qmri-synth: σ = mean brain magnitude / (√2·SNR) per channel)."""
    from bids_qmri.modalities.relax.mle import ir_crb, t2_crb
    from bids_qmri.synth.dataset import IRT1_TIS, MESE_TES, MESE_TR

    bids, out = noisy
    snr = 25.0
    for acq, suffix in (("ir", "T1map"), ("se", "T2map")):
        rel, tissue, truth = _errors(out, bids, acq, suffix, suffix)
        brain = truth["dseg"] > 0
        truth = {k: np.where(brain, v, np.nan) for k, v in truth.items()}  # the phantom's head only
        pd_ = 1000 * truth["M0map"]
        if acq == "ir":
            b = 1 - np.cos(np.pi * truth["B1"])
            t = np.asarray(IRT1_TIS)
            signal = np.abs(pd_[..., None] * (1 - b[..., None] * np.exp(-t / truth["T1map"][..., None])))
        else:
            a = pd_ * -np.expm1(-MESE_TR / truth["T1map"])
            t = np.asarray(MESE_TES)
            signal = a[..., None] * np.exp(-t / truth["T2map"][..., None])
        sigma = signal[brain].mean() / (np.sqrt(2) * snr)
        if acq == "ir":
            var = ir_crb(pd_[tissue], b[tissue], truth["T1map"][tissue], t, sigma)[:, 2]
        else:
            var = t2_crb(a[tissue], truth["T2map"][tissue], t, sigma)[:, 1]
        floor = np.median(0.6745 * np.sqrt(var) / truth[suffix][tissue])
        assert np.median(rel) <= floor + 0.01, (suffix, np.median(rel), floor)


@pytest.mark.slow
def test_learned_maps_through_the_workflow(noisy):
    """rim and resnet (bundled models for the dataset's TI/TE lists) run in the same modality
    workflow as the MLE: maps with sidecars naming the method and the model card, and GM+WM
    T1/T2 near the phantom's truth (bounds: measured + margin; the MLE's error
    on the same voxels is printed beside them)."""
    bids, out = noisy
    anat = out / "sub-01" / "anat"
    measured = {}
    for acq, suffix, names in (("ir", "T1map", ("T1map", "M0map", "IEmap")), ("se", "T2map", ("T2map", "M0map"))):
        for method in ("rim", "resnet"):
            for name in names:
                assert (anat / f"sub-01_acq-{acq}_desc-{method}_{name}.nii.gz").is_file(), (method, name)
            side = json.loads((anat / f"sub-01_acq-{acq}_desc-{method}_{suffix}.json").read_text())
            card = side["ModelCard"]
            assert side["Provenance"]["method"] == method and card["method"] == method
            assert card["origin"].startswith("bundled") and len(card["sha256"]) == 64
            assert "Sabidussi" in side["EstimationReference"] and side["Units"] == "s"
            rel, tissue, _ = _errors(out, bids, acq, suffix, suffix, method)
            assert np.isfinite(rel).all() and tissue.sum() > 500
            measured[(suffix, method)] = float(np.median(rel))
        measured[(suffix, "mle")] = float(np.median(_errors(out, bids, acq, suffix, suffix)[0]))
    print(measured)
    assert measured[("T1map", "rim")] < LEARNED_BOUNDS[("T1map", "rim")], measured
    assert measured[("T1map", "resnet")] < LEARNED_BOUNDS[("T1map", "resnet")], measured
    assert measured[("T2map", "rim")] < LEARNED_BOUNDS[("T2map", "rim")], measured
    assert measured[("T2map", "resnet")] < LEARNED_BOUNDS[("T2map", "resnet")], measured


#: median |relative error| in GM+WM of the bundled networks on the 4 mm SNR 25 dataset: measured
#: rim 5.7 % / 4.4 %, resnet 4.8 % / 6.5 % (T1 / T2; mle 2.6 % / 2.6 %), bounds +~30 %; with the
#: IRT1 mask of the shortest TI and the continued IRT1 RIM (issue 17): rim T1 4.0 %, mle 2.7 / 2.6 %;
#: the 2026-12-03 RIMs (structures, IRT1 B weight, annealed): rim T1 3.0 %, T2 3.6 % (bounds +~30 %);
#: the IRT1 RIM continued once more (2026-12-03 09:40): rim T1 2.5 %, mle 2.7 % (bound +~30 %);
#: the IRT1 RIM with the structure voxels weighted 30x (2026-12-03 11:40): rim T1 2.25 % (bound +~30 %);
#: weighted 100x (2026-12-03 12:31, epoch 40): rim T1 2.49 %, mle 2.67 % (bound +~30 %);
#: the blend of 2026-12-04 (0.26 of that file + two epoch means of its W = 300 continuation): rim T1 2.10 %
#: the blend of 2026-12-05 (0.5 of it + its low-SNR-weighted continuation): rim T1 2.23 %, mle 2.67 %
LEARNED_BOUNDS = {("T1map", "rim"): 0.028, ("T1map", "resnet"): 0.065, ("T2map", "rim"): 0.046,
                  ("T2map", "resnet"): 0.085}


@pytest.mark.slow
def test_outputs_sidecars_and_validator(noisy):
    bids, out = noisy
    anat = out / "sub-01" / "anat"
    side = json.loads((anat / "sub-01_acq-ir_desc-mle_T1map.json").read_text())
    assert side["Units"] == "s" and side["InversionTimes"] == [0.1, 0.3, 0.6, 1.0, 1.6, 2.5]
    assert "Sabidussi" in side["EstimationReference"] and side["ComputeDevice"] == "cpu"
    assert side["Sources"][0].startswith("bids:raw:sub-01/anat/sub-01_acq-ir_inv-1_IRT1")
    assert "volume 4" in side["MotionCorrection"] and side["Provenance"]["settings"]["likelihood"] == "gaussian"
    assert json.loads((anat / "sub-01_acq-ir_desc-mle_IEmap.json").read_text())["Units"] == "1"
    motion = (anat / "sub-01_acq-ir_desc-motion_IRT1.tsv").read_text().splitlines()
    assert motion[0].split("\t")[0] == "volume" and len(motion) == 7
    assert (anat / "sub-01_acq-se_desc-ref_MESE.nii.gz").is_file()
    result = validate_bids(out, derivative=True)
    assert result.ok, result.summary()


@pytest.mark.slow
def test_cli_end_to_end_roi_tables_and_cross_modality_agreement(tmp_path):
    """Through the command line: the IRT1 reference image is registered to the T1w, its maps enter
    the ROI table, the run prints its progress, and the group level compares IRT1 T1 with pc-bSSFP
    T1 (agreement across modalities of one quantity)."""
    import pandas as pd

    exe = Path(sys.executable).parent / "bids_qmri-synth"
    bids, out, work = tmp_path / "bids", tmp_path / "out", tmp_path / "work"
    proc = subprocess.run([str(exe), str(bids), "--participants", "1", "--sessions", "0", "--resolution", "5",
                           "--seed", "2", "--npc", "6", "--kinds", "bssfp", "t1w", "irt1"],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    part = run_cli(bids, out, "participant", "-w", work, "--methods", "bssfp:miracle", "irt1:mle", "--seed", "1",
                   "--nprocs", "2", "--skip-bids-validation", timeout=3600)
    assert part.returncode == 0, part.stderr[-3000:]
    assert "bids_qmri: sub-01: bssfp pc6, irt1 ir" in part.stderr
    steps = [ln for ln in part.stderr.splitlines() if ln.startswith("bids_qmri: [") and ln.endswith(" done")]
    assert any("irt1_ir · estimate_mle done" in ln for ln in steps) and any("roi · roi_stats" in ln for ln in steps)
    anat = out / "sub-01" / "anat"
    assert (anat / "sub-01_acq-ir_from-IRT1_to-T1w_mode-image_xfm.mat").is_file()
    roi = pd.read_csv(anat / "sub-01_atlas-AAL_roistats.tsv", sep="\t", keep_default_na=False)
    t1 = roi[(roi.suffix == "T1map") & (roi.region == "WM")]
    ir, bssfp = (float(t1[t1.acq == a]["median"].iloc[0]) for a in ("ir", "pc6"))
    assert 0.6 < ir < 1.2 and abs(ir - bssfp) / bssfp < 0.15, (ir, bssfp)  # both near the phantom's WM T1
    assert set(roi[roi.acq == "ir"].suffix) == {"T1map", "M0map", "IEmap"}
    group = run_cli(bids, out, "group", "-w", work, "--seed", "1")
    assert group.returncode == 0, group.stderr[-3000:]
    agr = pd.read_csv(out / "group" / "agreement.tsv", sep="\t", keep_default_na=False)
    row = agr[(agr.suffix == "T1map") & (agr.acq == "ir") & (agr.acq_b == "pc6")]
    assert len(row) == 1 and row.method_a.iloc[0] == "mle" and row.method_b.iloc[0] == "miracle"
    assert float(row.ccc.iloc[0]) > 0.5 and int(row.n_regions.iloc[0]) > 50
    assert validate_bids(out, derivative=True).ok
