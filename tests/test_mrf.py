"""MR fingerprinting (the mrf modality): schedule checks and skips, the dictmatch method through
the contract against fingerprints simulated directly by ``fisp_mrf`` at random off-grid values,
frames vs coefficient input, and the workflow on the synthetic phantom (GM+WM median |relative
error| ≤ 3 % T1, ≤ 5 % T2 for dictmatch+refine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bids_qmri import modalities
from bids_qmri.bids.derivatives import init_derivatives
from bids_qmri.bids.discovery import discover
from bids_qmri.config import Config
from bids_qmri.modalities.base import EstimateContext
from bids_qmri.modalities.mrf.protocol import MRFProtocol, schedule_problem
from bids_qmri.physics import epg, svd
from helpers import save_img, validate_bids, write_json

SCHEDULE = epg.default_fisp_schedule(300)
PROTOCOL = MRFProtocol(tuple(float(v) for v in np.degrees(SCHEDULE["flip_rad"].numpy())),
                       tuple(float(v) for v in SCHEDULE["tr"].numpy()), SCHEDULE["te"], SCHEDULE["ti"])
SMALL = {"mrf_grid_steps": 30, "mrf_b1_step": 0.1}


def _meta(n=10, **kw):
    return {"FlipAngle": [10.0] * n, "RepetitionTimeExcitation": [0.012] * n, "EchoTime": 0.002,
            "InversionTime": 0.02, "MRFSequenceType": "FISP", **kw}


# ------------------------------------------------------------------------------ protocol, inputs
def test_protocol_round_trip_key_and_schedule():
    again = MRFProtocol.from_dict(json.loads(json.dumps(PROTOCOL.as_dict())))
    assert again == PROTOCOL and again.key() == PROTOCOL.key() and PROTOCOL.n_frames == 300
    other = MRFProtocol.from_dict(_meta(300))
    assert other.key() != PROTOCOL.key()
    sched = PROTOCOL.schedule()
    torch.testing.assert_close(sched["flip_rad"], SCHEDULE["flip_rad"])
    assert "300 frames" in PROTOCOL.describe()
    # a scalar TR is one TR for every frame
    assert MRFProtocol.from_dict(_meta(4, RepetitionTimeExcitation=0.01)).tr == (0.01,) * 4


@pytest.mark.parametrize("change, words", [
    ({"RepetitionTimeExcitation": [0.012] * 9}, "FlipAngle has 10 values but RepetitionTimeExcitation has 9"),
    ({"MRFSequenceType": "bSSFP"}, "not supported"),
    ({"RepetitionTimeExcitation": [12.0] * 10}, "milliseconds"),
    ({"EchoTime": 0.02}, "not shorter than the shortest TR"),
    ({"FlipAngle": ["a"] * 10}, "not a list of numbers"),
])
def test_schedule_problems(change, words):
    problem, fix = schedule_problem(_meta(**change))
    assert words in problem and fix and "\n" not in problem + fix
    assert schedule_problem(_meta()) is None


def _dataset(root: Path, metas: dict[str, dict], frames=10) -> Path:
    from test_discovery import make_bssfp_dataset

    bids = make_bssfp_dataset(root, b1=None)
    anat = bids / "sub-01" / "anat"
    data = np.random.default_rng(0).random((4, 4, 3, frames)) + 0.1
    for acq, meta in metas.items():
        for part in ("mag", "phase"):
            save_img(anat / f"sub-01_acq-{acq}_part-{part}_MRF.nii.gz", data)
        write_json(anat / f"sub-01_acq-{acq}_MRF.json", meta)
    return bids


def test_disagreeing_schedule_lengths_are_skipped_with_one_line(tmp_path):
    bids = _dataset(tmp_path / "bids", {"good": _meta(10), "bad": _meta(10, RepetitionTimeExcitation=[0.012] * 7),
                                        "short": _meta(8)})
    (sess,) = discover(Config(bids_dir=bids, output_dir=tmp_path / "out", methods={"mrf": ("dictmatch",)}))
    assert [i.acq for i in sess.inputs["mrf"]] == ["good"]
    reasons = {Path(s.path).name: s.reason for s in sess.skipped}
    bad = reasons["sub-01_acq-bad_part-mag_MRF.nii.gz"]
    assert "FlipAngle has 10 values but RepetitionTimeExcitation has 7" in bad and "\n" not in bad
    assert "10 frames but the sidecar schedule" in reasons["sub-01_acq-short_part-mag_MRF.nii.gz"]


# ------------------------------------------------------------------------------------ estimate
def _fingerprints(n, seed, snr=None):
    g = torch.Generator().manual_seed(seed)
    u = lambda lo, hi: torch.empty(n, dtype=torch.float64).uniform_(lo, hi, generator=g)  # noqa: E731
    t1, t2, b1 = u(np.log(0.5), np.log(2.5)).exp(), u(np.log(0.03), np.log(0.2)).exp(), u(0.75, 1.25)
    m0 = u(0.5, 2.0) * torch.exp(1j * u(-3, 3))
    sig = m0[:, None] * epg.fisp_mrf(t1, t2, b1, **SCHEDULE)
    if snr:
        sigma = sig.abs().mean() / snr
        sig = sig + sigma * torch.complex(torch.randn(sig.shape, generator=g, dtype=torch.float64),
                                          torch.randn(sig.shape, generator=g, dtype=torch.float64))
    return sig, {"T1map": t1, "T2map": t2, "M0map": m0.abs(), "b1": b1}


def _estimate(data, options, tmp_path, shape=(20, 20, 1)):
    method = modalities.get("mrf").method("dictmatch")
    data = {k: (v.reshape(*shape, -1) if v.ndim == 2 and k == "signal" else v) for k, v in data.items()}
    ctx = EstimateContext(model_dir=tmp_path / "models", options={**SMALL, **options})
    return method.estimate(data, np.ones(shape, bool), PROTOCOL, ctx)


def _median_rel(maps, truth):
    return {k: float(np.median(np.abs(maps[k].ravel() / truth[k].numpy() - 1))) for k in ("T1map", "T2map", "M0map")}


def test_dictmatch_recovers_off_grid_fingerprints_and_refinement_leaves_the_grid(tmp_path, monkeypatch):
    sig, truth = _fingerprints(400, seed=1)
    data = {"signal": sig.numpy(), "b1": truth["b1"].numpy().reshape(20, 20, 1)}
    grid_maps, grid_prov = _estimate(data, {"mrf_refine": "off"}, tmp_path)
    ref_maps, ref_prov = _estimate(data, {}, tmp_path)
    grid, refined = _median_rel(grid_maps, truth), _median_rel(ref_maps, truth)
    # grid matching is quantised: log step ln(50)/29 = 13 % in T1 (B1 step 0.1 as well)
    assert 0.005 < grid["T1map"] < 0.08 and grid["T2map"] < 0.12
    # refinement at the voxel's own B1: noise-free truth within the EPG state cap's error
    assert refined["T1map"] < 0.003 and refined["T2map"] < 0.005 and refined["M0map"] < 0.003
    assert ref_prov["RefinementMedianResidualReduction"] > 10 and grid_prov["Refinement"] is False
    assert ref_prov["RefinementVoxelsOnEPG"] < 20 and "interpolated" in ref_prov["RefinementModel"]
    # the fused numba kernel (taken from KERNEL_MIN_PAIRS voxel-atom pairs on) gives the same maps
    from bids_qmri.fitting import dictmatch

    monkeypatch.setattr(dictmatch, "KERNEL_MIN_PAIRS", 0)
    kernel_maps, kernel_prov = _estimate(data, {"mrf_refine": "off"}, tmp_path)
    assert kernel_prov["MatchingImplementation"].startswith("fused numba kernel")
    assert grid_prov["MatchingImplementation"].startswith("torch")
    for name, volume in grid_maps.items():
        np.testing.assert_array_equal(kernel_maps[name], volume)
    monkeypatch.undo()
    for options in ({"mrf_refine_model": "epg"}, {"mrf_refine_model": "epg", "mrf_refine_jacobian": "every"}):
        epg_maps, epg_prov = _estimate(data, options, tmp_path)
        assert _median_rel(epg_maps, truth)["T1map"] < 0.003 and "RefinementModel" not in epg_prov
    assert ref_prov["SVDRank"] >= 5 and ref_prov["DictionaryGrid"]["T1Steps"] == 30
    assert ref_prov["DictionaryB1Values"] == [0.8, 0.9, 1.0, 1.1, 1.2]  # B1 in [0.75, 1.25]: nearest values
    # B1 missing (NaN): B1 = 1 is used, only that slice is simulated
    nob1 = {"signal": data["signal"], "b1": np.full((20, 20, 1), np.nan)}
    _, prov = _estimate(nob1, {"mrf_refine": "off"}, tmp_path)
    assert prov["DictionaryB1Values"] == [1.0]


def test_noisy_accuracy_and_frames_equal_coefficients(tmp_path):
    sig, truth = _fingerprints(400, seed=2, snr=20)
    b1 = truth["b1"].numpy().reshape(20, 20, 1)
    frames, _ = _estimate({"signal": sig.numpy(), "b1": b1}, {}, tmp_path)
    err = _median_rel(frames, truth)
    assert err["T1map"] < 0.03 and err["T2map"] < 0.05, err
    # the same data as coefficients on a basis of their own (another dictionary's SVD, rank 12)
    t1, t2, b = (g.flatten() for g in torch.meshgrid(torch.linspace(0.2, 4, 15), torch.linspace(0.01, 0.5, 15),
                                                     torch.tensor([0.7, 1.0, 1.3]), indexing="ij"))
    basis = svd.svd_basis(epg.fisp_mrf(t1, t2, b, **SCHEDULE), 12).to(torch.complex128)
    coeffs = (sig @ basis).numpy()
    coef_maps, prov = _estimate({"signal": coeffs, "b1": b1, "basis": basis.numpy()[:, :, None]}, {}, tmp_path)
    assert prov["SVDRank"] == 12 and "given" in prov["SVDBasis"]
    for key in ("T1map", "T2map", "M0map"):
        rel = np.abs(coef_maps[key] / frames[key] - 1)
        assert np.median(rel) < 0.003 and np.quantile(rel, 0.95) < 0.03, (key, np.median(rel))
    # a complex rotation of that basis (complex atoms of real rank 12): the same inner products,
    # searched as real atoms after a change of basis, the same maps
    gen = torch.Generator().manual_seed(4)
    rotation = torch.linalg.qr(torch.complex(torch.randn(12, 12, dtype=torch.float64, generator=gen),
                                             torch.randn(12, 12, dtype=torch.float64, generator=gen)))[0]
    rotated = basis @ rotation
    rot_maps, rot_prov = _estimate({"signal": (sig @ rotated).numpy(), "b1": b1, "basis": rotated.numpy()[:, :, None]},
                                   {}, tmp_path)
    assert "complex atoms of real rank R" in rot_prov["MatchingImplementation"], rot_prov["MatchingImplementation"]
    assert "real atoms" in prov["MatchingImplementation"] and "complex" not in prov["MatchingImplementation"]
    for key in ("T1map", "T2map", "M0map"):
        np.testing.assert_allclose(rot_maps[key], coef_maps[key], rtol=1e-4)


# ------------------------------------------------------------------------------- the workflow
def _synth(out: Path, *extra) -> Path:
    exe = Path(sys.executable).parent / "bids_qmri-synth"
    cmd = [str(exe), str(out), "--participants", "1", "--sessions", "0", "--resolution", "6",
           "--seed", "1", "--kinds", "mrf", "tb1tfl", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def mrf_run(tmp_path_factory):
    from bids_qmri.workflows.base import mapped_inputs

    root = tmp_path_factory.mktemp("mrf")
    bids = _synth(root / "bids")
    out, work = root / "out", root / "work"
    config = Config(bids_dir=bids, output_dir=out, work_dir=work, methods={"mrf": ("dictmatch",)},
                    nprocs=1, omp_nthreads=1, seed=1, device="cpu", model_dir=root / "models",
                    options={"mrf_grid_steps": 40, "mrf_b1_step": 0.1, "mrf_refine_iterations": 2})
    (sess,) = discover(config)
    init_derivatives(out, bids, extra_ignore=modalities.bidsignore_lines())
    ((modality, item),) = [(m, i) for m, i in mapped_inputs(sess, config) if m.name == "mrf"]
    wf = modality.init_workflow(item, sess, config, "mrf_wf")
    wf.base_dir = str(work)
    wf.run(plugin="Linear")
    from bids_qmri.reports.participant import write_participant_report

    write_participant_report(out, sess.subject, [sess], config)
    return bids, out


@pytest.mark.slow
def test_synthetic_phantom_gm_wm_accuracy(mrf_run):
    bids, out = mrf_run
    anat = out / "sub-01" / "anat"
    gt = bids / "derivatives" / "groundtruth" / "sub-01"
    mask = nib.load(anat / "sub-01_acq-fisp_desc-brain_mask.nii.gz").get_fdata() > 0
    dseg = nib.load(gt / "anat" / "sub-01_acq-fisp_dseg.nii.gz").get_fdata()
    tissue = mask & np.isin(dseg, (1, 2))
    assert tissue.sum() > 300
    for suffix, limit in (("T1map", 0.03), ("T2map", 0.05)):
        est = nib.load(anat / f"sub-01_acq-fisp_desc-dictmatch_{suffix}.nii.gz").get_fdata()
        truth = nib.load(gt / "anat" / f"sub-01_acq-fisp_{suffix}.nii.gz").get_fdata()
        rel = np.median(np.abs(est[tissue] / truth[tissue] - 1))
        assert rel <= limit, (suffix, rel)


@pytest.mark.slow
def test_outputs_sidecars_and_validator(mrf_run):
    bids, out = mrf_run
    anat = out / "sub-01" / "anat"
    side = json.loads((anat / "sub-01_acq-fisp_desc-dictmatch_T1map.json").read_text())
    assert side["Units"] == "s" and side["MRFSequenceType"] == "FISP" and side["NumberOfFrames"] == 1000
    assert len(side["RepetitionTimesExcitation"]) == 1000 and "RepetitionTimeExcitation" not in side
    prov = side["Provenance"]
    assert prov["SVDRank"] == 10 and len(prov["DictionaryHash"]) == 16 and prov["DictionaryGrid"]["T1Steps"] == 40
    assert side["B1Source"] == "TB1TFL" and side["MRFInput"] == "SVD coefficients"
    assert (anat / "sub-01_acq-fisp_desc-ref_MRF.nii.gz").is_file()
    assert (out / "sub-01" / "fmap" / "sub-01_acq-fisp_desc-mrf_TB1map.nii.gz").is_file()
    assert json.loads((anat / "sub-01_acq-fisp_desc-dictmatch_M0map.json").read_text())["Units"] == "arbitrary"
    result = validate_bids(out, derivative=True)
    assert result.ok, result.summary()


@pytest.mark.slow
def test_report_shows_the_maps_and_the_fingerprint_fits(mrf_run):
    _, out = mrf_run
    png = out / "sub-01" / "figures" / "sub-01_acq-fisp_desc-dictmatch_fingerprints.png"
    assert png.is_file() and png.stat().st_size > 10_000
    html = (out / "sub-01.html").read_text()
    assert "<h3>MR fingerprinting</h3>" in html and "figures/sub-01_acq-fisp_desc-dictmatch_fingerprints.png" in html
    assert "sub-01_acq-fisp_desc-dictmatch_T1map" in html


# ------------------------------------------------------------------------------------ in silico
def test_insilico_refinement_is_efficient_and_unbiased(tmp_path):
    from bids_qmri.cli.insilico import main

    import pandas as pd

    assert main(["mrf", str(tmp_path / "ins"), "--snr", "30", "--mc", "30", "--frames", "300",
                 "--grid-steps", "30", "--net-samples", "4000", "--net-epochs", "3"]) == 0
    t = pd.read_csv(tmp_path / "ins" / "mrf_insilico.tsv", sep="\t")
    assert len(t) == 12 and (tmp_path / "ins" / "mrf_insilico.png").stat().st_size > 10_000
    assert set(t.method) == {"dictmatch", "dictmatch+refine", "mrfnet-mse", "mrfnet-crb"}
    assert t.T1_normalised_crb_loss.min() > 0.3  # nothing beats the bound by much (30 draws)
    ref = t[t.method == "dictmatch+refine"]
    grid = t[t.method == "dictmatch"]
    # refinement: near-unbiased and close to the Cramér–Rao bound (normalised CRB loss ≈ 1)
    assert (ref.T1_median_bias_pct.abs() < 1.0).all() and (ref.T2_median_bias_pct.abs() < 2.0).all()
    assert ref.T1_normalised_crb_loss.between(0.3, 2.0).all() and ref.T2_normalised_crb_loss.between(0.3, 2.0).all()
    # grid matching on a coarse grid: far from the bound (quantisation dominates at this SNR)
    assert (grid.T1_normalised_crb_loss > 3).any()


# ------------------------------------------------------------------------------------- mrfnet
def test_mrfnet_trains_on_the_fly_caches_and_recovers_off_grid_fingerprints(tmp_path):
    sig, truth = _fingerprints(400, seed=4, snr=30)
    data = {"signal": sig.numpy(), "b1": truth["b1"].numpy().reshape(20, 20, 1)}
    method = modalities.get("mrf").method("mrfnet")
    assert method.default is False
    cards = {}
    for loss in ("mse", "crb"):
        ctx = EstimateContext(model_dir=tmp_path / "models", seed=3,
                              options={**SMALL, "mrf_net_loss": loss, "mrf_net_samples": 12000, "mrf_net_epochs": 10})
        maps, prov = method.estimate({k: (v.reshape(20, 20, 1, -1) if k == "signal" else v) for k, v in data.items()},
                                     np.ones((20, 20, 1), bool), PROTOCOL, ctx)
        err = _median_rel(maps, truth)
        # a briefly trained network (12 k samples, 10 epochs); measured T1 3.5 / 3.3 %, T2 5.3 / 5.7 %,
        # M0 2.0 / 5.4 % (mse / crb); dictmatch+refine reaches 0.19 / 0.40 / 0.18 % on these data
        assert err["T1map"] < 0.06 and err["T2map"] < 0.09 and err["M0map"] < 0.09, (loss, err)
        card = prov["model_card"]
        assert card["cpu_s"] > 0 and set(card["heldout_median_abs_rel_error"]) >= {"T1", "T2"}
        assert card["loss"] == loss and card["reused"] is False and len(card["sha256"]) == 64
        assert set(card["heldout_normalised_crb_loss"]) == {"logT1", "logT2"}
        assert all(v >= 0.5 for v in card["heldout_normalised_crb_loss"].values())  # no estimator beats the bound
        cards[loss] = card
    assert cards["mse"]["protocol_key"] != cards["crb"]["protocol_key"]
    # the cached model is found again (same schedule, basis, loss and seed): identical maps
    again, prov = method.estimate({k: (v.reshape(20, 20, 1, -1) if k == "signal" else v) for k, v in data.items()},
                                  np.ones((20, 20, 1), bool), PROTOCOL, ctx)
    assert prov["model_card"]["reused"] is True
    np.testing.assert_array_equal(again["T1map"], maps["T1map"])


def test_mrfnet_crb_weights_equal_an_independent_fisher_calculation():
    # The CRB weights of the crb loss (default: the EPG's hand-written forward mode,
    # physics.epg.fisp_mrf_jacobian), AD through physics.crb and forward differences of the float32
    # compressed EPG, against central differences in float64 of the fisp_mrf signal with the
    # Fisher information assembled here, at off-grid samples.
    from bids_qmri.modalities.mrf.net import _unit_sigma_crb

    sched = epg.default_fisp_schedule(100)  # short: forward-mode AD through the EPG loop is slow

    t1, t2, b = (g.flatten() for g in torch.meshgrid(torch.linspace(0.2, 4, 10), torch.linspace(0.01, 0.5, 10),
                                                     torch.tensor([0.7, 1.0, 1.3]), indexing="ij"))
    basis = svd.svd_basis(epg.fisp_mrf(t1, t2, b, **sched), 10).to(torch.complex64)
    x = torch.tensor([[np.log(1.23), np.log(0.083), 0.93], [np.log(0.71), np.log(0.047), 1.17]], dtype=torch.float64)
    weights = _unit_sigma_crb(sched, basis, x, jacobian="differences")
    exact, clean = _unit_sigma_crb(sched, basis, x, return_clean=True)  # the default: exact
    ad = _unit_sigma_crb(sched, basis, x, jacobian="ad")
    # the fingerprints returned with the exact weights are the training fingerprints, bit for bit
    from bids_qmri.modalities.mrf.net import _simulate

    assert torch.equal(clean, _simulate(sched, basis, x))
    b128 = basis.to(torch.complex128)
    for i in range(len(x)):
        def f(th):
            return epg.fisp_mrf(th[0].exp(), th[1].exp(), x[i, 2], n_states=40, **sched).to(torch.complex128) @ b128
        h, cols = 1e-5, []
        for k in range(2):
            e = torch.zeros(2, dtype=torch.float64)
            e[k] = h
            cols.append((f(x[i, :2] + e) - f(x[i, :2] - e)) / (2 * h))
        c0 = f(x[i, :2])
        jac = torch.stack(cols + [c0, 1j * c0], -1)
        independent = torch.linalg.inv((jac.mH @ jac).real).diagonal()[:2]
        torch.testing.assert_close(exact[i], independent, rtol=1e-4, atol=0)
        torch.testing.assert_close(ad[i], independent, rtol=1e-4, atol=0)
        # forward differences (step 1e-3) in float32: within 1 % of the bound (measured <= 0.18 %)
        torch.testing.assert_close(weights[i], independent, rtol=1e-2, atol=0)


def test_fisp_mrf_jacobian_equals_forward_mode_ad_of_fisp_mrf():
    # The hand-written forward mode through the EPG against torch.func.jvp of fisp_mrf (float64),
    # with and without inversion and with the state cap, at off-grid T1/T2/B1; the value is
    # fisp_mrf's bit for bit.
    from torch.func import jvp

    t1 = torch.tensor([1.23, 0.71, 3.3], dtype=torch.float64)
    t2 = torch.tensor([0.083, 0.047, 1.1], dtype=torch.float64)
    b1 = torch.tensor([0.93, 1.17, 1.0], dtype=torch.float64)
    for ti, n_states in ((0.04, None), (None, 12), (0.021, 12)):
        sched = {**epg.default_fisp_schedule(60), "ti": ti}
        sig, jac = epg.fisp_mrf_jacobian(t1, t2, b1, n_states=n_states, inversion_efficiency=0.9, **sched)
        assert jac.shape == (3, 60, 2)

        def f(a, b, n_states=n_states, sched=sched):
            return epg.fisp_mrf(a, b, b1, n_states=n_states, inversion_efficiency=0.9, **sched)

        assert torch.equal(sig, f(t1, t2))
        d1 = jvp(lambda a: f(a, t2), (t1,), (torch.ones_like(t1),))[1]
        d2 = jvp(lambda b: f(t1, b), (t2,), (torch.ones_like(t2),))[1]
        torch.testing.assert_close(jac[..., 0], d1, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(jac[..., 1], d2, rtol=1e-12, atol=1e-14)
        assert d1.abs().max() > 1e-3 and d2.abs().max() > 1e-3  # the derivatives are not trivially zero


def test_bids_qmri_train_mrfnet_installs_a_model_the_app_then_uses(tmp_path, capsys):
    from bids_qmri.cli.train import main

    side = tmp_path / "sub-01_acq-fisp_MRF.json"
    write_json(side, {**PROTOCOL.as_dict(), "RepetitionTimeExcitation": list(PROTOCOL.tr)})
    models = tmp_path / "models"
    assert main(["--modality", "mrf", "--method", "mrfnet", "--loss", "mse", "--sidecar", str(side),
                 "--mrf-grid-steps", "30", "--samples", "3000", "--epochs", "2", "--seed", "5",
                 "--model-dir", str(models)]) == 0
    (weights,) = list(models.glob("mrf/*/mrfnet_mse_*.safetensors"))
    card = json.loads(weights.with_suffix(".json").read_text())
    assert card["loss"] == "mse" and card["training"]["n_train"] == 2700 and card["cpu_s"] > 0
    assert set(card["heldout_median_abs_rel_error"]) >= {"T1", "T2"}
    assert all(v > 0 for v in card["heldout_normalised_crb_loss"].values())
    # the app finds the installed model for frames input at B1 = 1 (no B1 map) on the same grid
    sig, truth = _fingerprints(16, seed=6, snr=50)
    data = {"signal": sig.numpy().reshape(4, 4, 1, -1), "b1": np.full((4, 4, 1), np.nan)}
    ctx = EstimateContext(model_dir=models, seed=9, allow_training=False,
                          options={**SMALL, "mrf_net_loss": "mse"})
    _, prov = modalities.get("mrf").method("mrfnet").estimate(data, np.ones((4, 4, 1), bool), PROTOCOL, ctx)
    assert prov["model_card"]["sha256"] == card["sha256"]
    # a bad sidecar: one line, usage exit
    bad = tmp_path / "bad.json"
    write_json(bad, {"MRFSequenceType": "FISP", "FlipAngle": [10, 20], "RepetitionTimeExcitation": [0.01] * 3,
                     "EchoTime": 0.002, "InversionTime": 0.02})
    with pytest.raises(SystemExit) as exc:
        main(["--modality", "mrf", "--method", "mrfnet", "--sidecar", str(bad), "--out-dir", str(tmp_path / "o")])
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "FlipAngle has 2 values" in err[0]


def test_mrfnet_method_train_uses_the_own_basis_at_b1_1_and_the_crb_loss(monkeypatch):
    from bids_qmri.modalities.mrf import dictionary as mrfdict
    from bids_qmri.modalities.mrf import estimate
    from bids_qmri.modalities.mrf.net import basis_key

    monkeypatch.setattr(estimate, "NET_TRAINING", {"n_samples": 1500, "max_epochs": 1, "patience": 1})
    net, card = modalities.get("mrf").method("mrfnet").train(PROTOCOL, seed=2)
    assert card["loss"] == "crb" and card["training"]["n_train"] == 1350 and net.outputs[0] == "logT1"
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        basis, kept = mrfdict.own_basis(PROTOCOL.schedule(), mrfdict.DictionaryGrid(), [1.0], Path(tmp))
    assert kept >= 0.999 and card["protocol"]["SVDBasisHash"] == basis_key(basis)
