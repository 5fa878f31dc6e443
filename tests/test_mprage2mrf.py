"""mprage2mrf (seed 002): the seven U-Nets (shapes, tanh range, bottleneck width), the rescale
table round trip, safe loading (safetensors + card checksum), the phantom training pairs against
a direct FISP-EPG simulation at the voxels' own (off-grid) T1/T2, the coefficient convention
through the MRF matcher against the phantom's truth, a tiny training run on the generic loop, and
the estimate on a T1w grid (maps, Warnings for another protocol)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bids_qmri.modalities.base import EstimateContext
from bids_qmri.modalities.mprage2mrf import protocol as mp
from bids_qmri.modalities.mprage2mrf.simulate import mrf_target_basis, simulate_pair, slices_of
from bids_qmri.modalities.mprage2mrf.training import Mprage2MRFTrainConfig, masked_mse, train_on_slices
from bids_qmri.modalities.mprage2mrf.unet import (
    COMPONENTS,
    MPRAGE2MRFNet,
    UNet2D,
    channels_to_coefficients,
    coefficients_to_channels,
)
from bids_qmri.models.registry import ModelFileError, load_model, save_model

PROTOCOL = mp.synthetic_protocol()


@pytest.fixture(scope="module")
def pair():
    return simulate_pair(7, protocol=PROTOCOL, resolution_mm=6.0)


def _tiny_net(seed=0):
    torch.manual_seed(seed)
    schedule, basis = mrf_target_basis()
    net = MPRAGE2MRFNet(base=4, depth=2, dropout=0.0, n_frames=basis.shape[0])
    net.set_basis(basis)
    return net


# ------------------------------------------------------------------------------------ network
def test_unet_shapes_range_and_seed_widths():
    net = MPRAGE2MRFNet(base=16, depth=4)
    assert len(net.nets) == 7 == len(COMPONENTS)
    assert net.nets[0].bottleneck.conv2.out_channels == 256  # 16 filters doubling to 256 (seed 002)
    assert net.nets[0].down[0].conv1.out_channels == 16
    net.eval()
    with torch.no_grad():
        y = net(torch.rand(2, 1, 32, 48) * 5 - 2)
    assert y.shape == (2, 7, 32, 48)
    assert float(y.abs().max()) <= 1.0
    # the seven networks are independent: a gradient of one output reaches only its own network
    net.train()
    net(torch.rand(2, 1, 16, 16))[:, 3].sum().backward()
    touched = [any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in u.parameters()) for u in net.nets]
    assert touched == [i == 3 for i in range(7)]


def test_unet_one_network_is_a_function_of_the_slice():
    u = UNet2D(base=4, depth=2, dropout=0.0).eval()
    x = torch.rand(3, 1, 16, 20)
    with torch.no_grad():
        torch.testing.assert_close(u(x)[1:2], u(x[1:2]))  # slices are independent in eval mode


def test_rescale_table_round_trip():
    net = MPRAGE2MRFNet(base=2, depth=1)
    lo = torch.tensor([0.0, -3.09, -1.83, -2.22, -1.21, -1.95, -1.16])  # seed 002 Table 2
    hi = torch.tensor([10.35, 0.65, 1.88, 1.36, 1.54, 0.90, 1.30])
    net.set_table(lo, hi)
    ends = net.to_coefficients(torch.stack([-torch.ones(7), torch.ones(7)])[:, :, None, None])
    torch.testing.assert_close(ends[0, :, 0, 0], lo)
    torch.testing.assert_close(ends[1, :, 0, 0], hi)
    y = torch.rand(4, 7, 5, 6) * 2 - 1
    torch.testing.assert_close(net.to_network(net.to_coefficients(y)), y, atol=1e-6, rtol=0)
    assert net.table()["SV1_real"] == [0.0, 10.35]
    with pytest.raises(ValueError, match="max > min"):
        net.set_table(hi, lo)


def test_channels_coefficients_round_trip():
    c = torch.randn(5, 4, dtype=torch.complex64)
    c[:, 0] = c[:, 0].abs()  # SV1 real after phase renormalisation
    ch = coefficients_to_channels(c)
    assert ch.shape == (5, 7)
    torch.testing.assert_close(ch[:, 2], c[:, 1].imag)
    torch.testing.assert_close(channels_to_coefficients(ch), c)


def test_weights_load_safely_with_table_and_basis(tmp_path):
    net = _tiny_net()
    net.set_table(torch.arange(7.0) - 3, torch.arange(7.0) + 1)
    save_model(net, {"name": "t"}, tmp_path, "m", origin="test")
    again, card = load_model(tmp_path / "m.safetensors")
    assert isinstance(again, MPRAGE2MRFNet) and card["sha256"]
    torch.testing.assert_close(again.table_min, net.table_min)
    torch.testing.assert_close(again.basis(), net.basis())
    x = torch.rand(1, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(again(x), net.eval()(x))
    raw = (tmp_path / "m.safetensors").read_bytes()
    assert b"pickle" not in raw.lower()
    (tmp_path / "m.safetensors").write_bytes(raw[:-8] + b"\0" * 8)
    with pytest.raises(ModelFileError, match="checksum"):
        load_model(tmp_path / "m.safetensors")


def test_evaluation_refuses_seeds_of_any_link_of_a_continuation(tmp_path):
    """``eval_mprage2mrf.py`` judges held-out phantoms only: a continued model's card holds its
    start's training record, and seeds of either are refused (a one-line parser error)."""
    import argparse
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from eval_mprage2mrf import held_out_model

    start = {"train_seeds": [0, 1], "val_seeds": [500]}
    card = {"name": "t", "training": {"train_seeds": [1000, 1001], "val_seeds": [1500],
                                      "init_from": {"file": "s.safetensors", "previous_training": start}}}
    save_model(_tiny_net(), card, tmp_path, "m", origin="test")
    parser = argparse.ArgumentParser()
    for seeds in ([1, 9000], [500], [1001], [1500]):
        with pytest.raises(SystemExit):
            held_out_model(parser, tmp_path / "m.safetensors", seeds)
    assert held_out_model(parser, tmp_path / "m.safetensors", [9000, 9001])[2]["training"]["train_seeds"] == [1000, 1001]


# ----------------------------------------------------------------------------------- protocol
def test_protocol_from_sidecar_and_problems():
    meta = {"InversionTime": 0.9, "RepetitionTimePreparation": 2.13, "FlipAngle": 8.0,
            "RepetitionTimeExcitation": 0.007, "NumberOfReadouts": 176}
    p = mp.MPRAGEProtocol.from_dict(meta)
    assert p == PROTOCOL and p.key() == PROTOCOL.key() and p.slug().startswith("mprage_")
    assert mp.MPRAGEProtocol.from_dict(json.loads(json.dumps(p.as_dict()))) == p
    other = mp.MPRAGEProtocol.from_dict({**meta, "InversionTime": 1.1})
    assert other.key() != p.key()
    assert p.differences(other) == ["InversionTime 1.1 (model trained at 0.9)"]
    assert "missing" in mp.protocol_problem({**meta, "InversionTime": None})[0]
    assert "milliseconds" in mp.protocol_problem({**meta, "RepetitionTimePreparation": 2130})[0]
    assert "does not fit" in mp.protocol_problem({**meta, "NumberOfReadouts": 400})[0]


# ------------------------------------------------------------------------------ training pairs
def test_pair_matches_direct_epg_at_off_grid_values(pair):
    """The target coefficients of brain voxels equal the direct FISP-EPG fingerprint at the
    voxel's own T1/T2 (B1 = 1) compressed on the first four SVs, up to scale and phase."""
    from bids_qmri.physics import epg

    assert pair.mprage.max() == pytest.approx(1.0) and pair.mprage.min() >= 0
    assert not pair.mprage[~pair.brain].any() and not pair.target[~pair.brain].any()
    c = channels_to_coefficients(torch.from_numpy(pair.target[pair.brain])).to(torch.complex128)
    assert float(c[:, 0].real.max()) == pytest.approx(1.0)  # divided by the brain maximum of SV1
    rng = np.random.default_rng(0)
    pick = rng.choice(int(pair.brain.sum()), 40, replace=False)
    schedule, basis = mrf_target_basis()
    t1 = torch.from_numpy(pair.t1[pair.brain][pick].astype(np.float64))
    t2 = torch.from_numpy(pair.t2[pair.brain][pick].astype(np.float64))
    direct = epg.fisp_mrf(t1, t2, torch.ones_like(t1), n_states=None, **schedule) @ basis.to(torch.complex128)
    cos = (c[pick].conj() * direct).sum(-1).abs() / (c[pick].norm(dim=-1) * direct.norm(dim=-1))
    assert float(cos.min()) > 0.999


def test_bias_corrected_pair_loses_the_b1_shading_and_keeps_the_targets(pair):
    """``bias_correct`` N4-corrects the MPRAGE as the anatomy does to the workflow's T1w: in WM-like
    voxels the intensity follows the B1 field far less; brain and targets are unchanged."""
    corrected = simulate_pair(7, protocol=PROTOCOL, resolution_mm=6.0, bias_correct=True)
    assert np.array_equal(corrected.brain, pair.brain) and np.array_equal(corrected.target, pair.target)
    wm = pair.brain & (pair.t1 < np.percentile(pair.t1[pair.brain], 30))
    raw_r = np.corrcoef(pair.mprage[wm], pair.b1[wm])[0, 1]
    n4_r = np.corrcoef(corrected.mprage[wm], corrected.b1[wm])[0, 1]
    assert raw_r > 0.4 and n4_r < 0.5 * raw_r


def test_slices_and_masked_loss(pair):
    x, y, m = slices_of(pair, 4)
    assert x.shape[1] == 1 and y.shape[1] == 7 and x.shape[-2] % 4 == 0 and x.shape[-1] % 4 == 0
    assert bool((m.sum((1, 2)) >= 20).all())
    # the loss is the sum of the seven per-network MSEs over brain pixels
    pred = y + 0.5 * m[:, None]
    assert float(masked_mse(pred, y, m)) == pytest.approx(7 * 0.25)
    assert float(masked_mse(y + 9 * (~m[:, None]), y, m)) == 0.0


def test_tiny_training_sets_table_and_learns(pair):
    data = slices_of(pair, 4)
    net = _tiny_net()
    cfg = Mprage2MRFTrainConfig(epochs=4, patience=4, batch_size=4, lr=3e-3, progress=False)
    result, _ = train_on_slices(net, data, data, cfg)
    x, y, m = data
    flat = y.permute(1, 0, 2, 3)[m[None].expand(7, -1, -1, -1)].view(7, -1)
    yt = net.to_network(flat.T).T
    varies = (flat.max(1).values - flat.min(1).values) > 1e-3
    assert bool(varies[[0, 1, 3, 5]].all())  # the real parts of SV1-4
    # the table spans the training targets: their extremes map to the ends of tanh's range
    torch.testing.assert_close(yt.min(1).values[varies], -torch.ones(int(varies.sum())), atol=1e-4, rtol=0)
    torch.testing.assert_close(yt.max(1).values[varies], torch.ones(int(varies.sum())), atol=1e-4, rtol=0)
    # constant components (noise-free FISP imaginary parts: zero once SV1 is real) sit mid-range
    assert float(yt[~varies].abs().sum()) < 1e-3 * max(1, yt[~varies].numel())
    losses = [h["val_loss"] for h in result.history]
    assert result.best_loss < 0.7 * losses[0]


def test_population_option_draws_the_same_participant_with_other_tissue_values(pair):
    """``population='healthy'`` (training and evaluation's ``--population``): the same seed gives the
    same head and mask; the brain's tissue values come from the healthy cohort's spread, so the
    pure-GM T1 lies within 4 of its between-subject SDs (3.5 % of 1.4 s) plus the within-head
    field of the Table 1 mean; an unknown population is refused by the training config."""
    from bids_qmri.synth import phantom as ph

    healthy = simulate_pair(7, protocol=PROTOCOL, resolution_mm=6.0, population="healthy")
    assert np.array_equal(healthy.brain, pair.brain)
    assert not np.allclose(healthy.t1, pair.t1)
    rng = np.random.default_rng(np.random.SeedSequence([7, 2002]))
    gm = ph.make_phantom(rng, 6.0, population="healthy").fractions["GM"] > 0.9
    mu, sd = ph.TISSUE_PARAMETERS["GM"]["T1"]
    assert abs(float(np.median(healthy.t1[gm])) - mu) < 4 * 0.035 * mu + 2 * sd * (1 - ph.BETWEEN_FRACTION) ** 0.5
    with pytest.raises(ValueError, match="unknown phantom population 'elderly'"):
        Mprage2MRFTrainConfig(population="elderly")
    with pytest.raises(ValueError, match="unknown phantom population 'elderly'"):
        Mprage2MRFTrainConfig(population="healthy+elderly")
    assert Mprage2MRFTrainConfig().populations() == [ph.DEFAULT_POPULATION]
    assert Mprage2MRFTrainConfig(population="healthy+seed004").populations() == ["healthy", "seed004"]


def test_long_t2_loss_weight_counts_csf_rich_voxels_more(pair):
    """``long_t2_weight`` (off by default): the weight map is W exactly where the true T2 reaches
    the threshold (checked against the phantom's T2 on the kept slices), and the loss is the
    weighted mean of the squared errors (two-level analytic value); weights of 1 are the plain loss."""
    from bids_qmri.modalities.mprage2mrf.simulate import long_t2_weights
    from bids_qmri.modalities.mprage2mrf.training import pairs_to_slices

    x, y, m = slices_of(pair, 4)
    w = long_t2_weights(pair, 4, 3.0, 0.2)
    assert w.shape == m.shape and set(torch.unique(w).tolist()) <= {1.0, 3.0}
    kept = [z for z in range(pair.brain.shape[2]) if pair.brain[..., z].sum() >= 20]
    long_brain = pair.brain[..., kept] & (pair.t2[..., kept] >= 0.2)
    n_long, n_brain = int(long_brain.sum()), int(pair.brain[..., kept].sum())
    assert 0 < n_long < n_brain // 4
    assert int(((w == 3) & m).sum()) == n_long
    # errors a on long-T2 brain pixels, b on the others: 7 (3 nL a^2 + nS b^2) / (3 nL + nS)
    a, b = 0.4, 0.1
    long_px = (w == 3)[:, None]
    pred = y + torch.where(long_px, a, b) * m[:, None]
    n_short = n_brain - n_long
    expected = 7 * (3 * n_long * a**2 + n_short * b**2) / (3 * n_long + n_short)
    assert float(masked_mse(pred, y, m, w)) == pytest.approx(expected, rel=1e-5)
    assert float(masked_mse(pred, y, m, torch.ones_like(w))) == pytest.approx(float(masked_mse(pred, y, m)), rel=1e-6)
    assert float(masked_mse(pred, y, m, w)) > float(masked_mse(pred, y, m))
    # the config: off by default (three stacks), on gives the map as a fourth; bad values refused
    assert len(pairs_to_slices([pair], 4, Mprage2MRFTrainConfig())) == 3
    four = pairs_to_slices([pair], 4, Mprage2MRFTrainConfig(long_t2_weight=3.0))
    assert len(four) == 4 and torch.equal(four[3], w)
    with pytest.raises(ValueError, match="long-T2 loss weight must be >= 1"):
        Mprage2MRFTrainConfig(long_t2_weight=0.5)
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        Mprage2MRFTrainConfig(lr_schedule="linear")


def test_train_options_reach_the_config(monkeypatch):
    """``bids_qmri-train --method mprage2mrf --lr-schedule cosine --keep last
    --mprage2mrf-long-t2-weight 3`` configures the run; the defaults are seed 002's."""
    from bids_qmri.cli import train as cli
    from bids_qmri.modalities.mprage2mrf import training

    seen = []

    def fake(protocol, cfg):
        seen.append(cfg)
        raise ValueError("stop here")

    monkeypatch.setattr(training, "train_mprage2mrf", fake)
    for extra in (["--lr-schedule", "cosine", "--keep", "last", "--mprage2mrf-long-t2-weight", "3"], []):
        with pytest.raises(SystemExit):
            cli.main(["--method", "mprage2mrf", "--out-dir", "unused", *extra])
    assert (seen[0].lr_schedule, seen[0].keep, seen[0].long_t2_weight) == ("cosine", "last", 3.0)
    assert (seen[1].lr_schedule, seen[1].keep, seen[1].long_t2_weight) == ("constant", "best", 1.0)


def test_tiny_training_with_long_t2_weights_and_cosine_learns(pair):
    from bids_qmri.modalities.mprage2mrf.training import pairs_to_slices

    cfg = Mprage2MRFTrainConfig(epochs=4, patience=4, batch_size=4, lr=3e-3, progress=False,
                                lr_schedule="cosine", long_t2_weight=3.0)
    data = pairs_to_slices([pair], 4, cfg)
    net = _tiny_net()
    result, settings = train_on_slices(net, data, data, cfg)
    assert settings.lr_schedule == "cosine"
    losses = [h["val_loss"] for h in result.history]
    assert result.best_loss < 0.7 * losses[0]


# --------------------------------------------------------------------------- matching, estimate
def _mrf_protocol():
    from bids_qmri.modalities.mrf.protocol import MRFProtocol

    schedule, _ = mrf_target_basis()
    return MRFProtocol(tuple(float(v) for v in schedule["flip_rad"].rad2deg()), tuple(float(v) for v in schedule["tr"]),
                       float(schedule["te"]), float(schedule["ti"]))


def test_true_coefficients_through_the_matcher_give_the_phantom_t1_t2(pair, tmp_path):
    """The coefficient convention (first four SVs, SV1 rotated real, volume scale) is what the MRF
    matcher needs: a perfect synthesis matched at B1 = 1 recovers the phantom's own T1/T2."""
    from bids_qmri.modalities.mprage2mrf.estimate import match_coefficients

    _, basis = mrf_target_basis()
    coeffs = channels_to_coefficients(torch.from_numpy(pair.target)).numpy()
    ctx = EstimateContext(model_dir=tmp_path, options={"mprage2mrf_grid_steps": 40})
    maps, prov = match_coefficients(coeffs, pair.brain, basis.to(torch.complex64), _mrf_protocol(), ctx)
    assert prov["Refinement"] is False and prov["SVDRank"] == 4
    core = pair.brain & (pair.t1 > 0.6) & (pair.t1 < 2.0)  # GM and WM (the 40-step grid's cells are ~10 %)
    for name, truth in (("T1map", pair.t1), ("T2map", pair.t2)):
        rel = np.abs(maps[name][core] / truth[core] - 1)
        assert np.median(rel) < 0.06, (name, np.median(rel))
    assert np.isnan(maps["T1map"][~pair.brain]).all()


@pytest.fixture(scope="module")
def t1w_only(tmp_path_factory):
    """A one-participant synthetic dataset with a T1w and nothing else, and a tiny model installed
    for its MPRAGE protocol as a user model (``--model-dir``)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from bids_qmri.models.registry import cache_dir

    root = tmp_path_factory.mktemp("m2m")
    exe = Path(sys.executable).parent / "bids_qmri-synth"
    proc = subprocess.run([str(exe), str(root / "bids"), "--participants", "1", "--sessions", "0", "--resolution", "6",
                           "--seed", "3", "--kinds", "t1w"], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    net = _tiny_net(1)
    net.set_table(torch.tensor([0.0, -0.6, -1e-3, -0.3, -1e-3, -0.2, -1e-3]),
                  torch.tensor([1.0, 0.2, 1e-3, 0.3, 1e-3, 0.2, 1e-3]))
    save_model(net, {"name": "tiny", "mrf_protocol": _mrf_protocol().as_dict(), "components": list(COMPONENTS),
                     "training_data": "untrained (test)"},
               cache_dir(root / "models", "mprage2mrf", PROTOCOL), f"mprage2mrf_{PROTOCOL.slug()}", origin="test")
    return root


@pytest.mark.slow
def test_participant_without_mrf_gets_mprage2mrf_maps(t1w_only):
    import nibabel as nib

    from bids_qmri.bids.derivatives import init_derivatives
    from bids_qmri.bids.discovery import discover
    from bids_qmri.config import Config
    from bids_qmri.workflows.base import init_participant_wf, mapped_inputs

    root = t1w_only
    out = root / "out"
    config = Config(bids_dir=root / "bids", output_dir=out, work_dir=root / "work",
                    methods={"mprage2mrf": ("mprage2mrf",)}, nprocs=1, omp_nthreads=1, seed=1, device="cpu",
                    model_dir=root / "models", options={"mprage2mrf_grid_steps": 30})
    (sess,) = discover(config)
    assert not sess.inputs["mrf"] and len(sess.inputs["mprage2mrf"]) == 1
    ((modality, item),) = mapped_inputs(sess, config)
    # the participant workflow hands the anatomy's T1w and brain mask to the workflow's inputnode
    pwf = init_participant_wf(sess, config)
    edges = {(u.name, v.name) for u, v in pwf._graph.edges()}
    assert ("anat_wf", f"mprage2mrf_{item.acq}_wf") in edges
    # run the mapping workflow alone on the raw T1w and the phantom's brain mask
    init_derivatives(out, root / "bids")
    gt = root / "bids" / "derivatives" / "groundtruth" / "sub-01" / "anat"
    t1w = item.files[0]
    img = nib.load(t1w)
    mask_path = root / "mask.nii.gz"
    dseg = nib.load(gt / f"sub-01_acq-{item.acq}_dseg.nii.gz").get_fdata()
    nib.save(nib.Nifti1Image(np.isin(dseg, (1, 2, 3)).astype(np.uint8), img.affine), mask_path)
    wf = modality.init_workflow(item, sess, config, "m2m_wf")
    wf.base_dir = str(root / "work")
    wf.get_node("inputnode").inputs.t1w_preproc = str(t1w)
    wf.get_node("inputnode").inputs.t1w_mask = str(mask_path)
    wf.run(plugin="Linear")
    anat = out / "sub-01" / "anat"
    for suffix in ("T1map", "T2map"):
        path = anat / f"sub-01_acq-{item.acq}_desc-mprage2mrf_{suffix}.nii.gz"
        m = nib.load(path)
        assert m.shape == img.shape and np.allclose(m.affine, img.affine)  # on the T1w grid
        v = m.get_fdata()
        brain = np.asarray(nib.load(mask_path).dataobj) > 0
        assert np.isfinite(v).all() and (v[brain] > 0).mean() > 0.95 and not v[~brain].any()
        side = json.loads(path.with_suffix("").with_suffix(".json").read_text())
        assert side["Units"] == "s" and side["InversionTime"] == PROTOCOL.ti
        assert side["ModelCard"]["training_data"] == "untrained (test)" and side["ModelCard"]["sha256"]
        assert "Warnings" not in side
    assert (anat / f"sub-01_acq-{item.acq}_desc-ref_T1w.nii.gz").is_file()
    # the participant report shows the maps (generic: it reads the output folder)
    from bids_qmri.reports.participant import write_participant_report

    html = write_participant_report(out, sess.subject, [sess], config).read_text()
    assert f"sub-01_acq-{item.acq}_desc-mprage2mrf_T1map" in html


def test_other_protocol_falls_back_to_the_bundled_model_with_warnings(t1w_only, monkeypatch, tmp_path):
    from bids_qmri.models import registry
    from bids_qmri.modalities.mprage2mrf.estimate import load_model_for

    # the tiny user model stands in for the bundled one of the synthetic protocol
    monkeypatch.setattr(registry, "BUNDLED_DIR", t1w_only / "models")
    monkeypatch.setattr(registry, "bundled_dir", lambda m, model_set=None: registry.cache_dir(t1w_only / "models", m, PROTOCOL))
    other = mp.MPRAGEProtocol(1.1, 2.5, 0.007, 9.0)
    net, card, warnings = load_model_for(other, EstimateContext(model_dir=tmp_path))
    assert isinstance(net, MPRAGE2MRFNet) and len(warnings) == 1
    assert "InversionTime 1.1 (model trained at 0.9)" in warnings[0] and "FlipAngle 9" in warnings[0]
    net, card, warnings = load_model_for(PROTOCOL, EstimateContext(model_dir=tmp_path))
    assert warnings == []


def test_bundled_model_for_the_synthetic_protocol():
    from bids_qmri.modalities.mprage2mrf.estimate import load_model_for

    net, card, warnings = load_model_for(PROTOCOL, EstimateContext(model_dir=None))
    assert warnings == [] and card["origin"] == "bundled" and card["mprage_protocol"] == PROTOCOL.as_dict()
    # three continuations of the first bundled model (seeds 0-11): healthy phantoms 1000-1023, then
    # healthy and seed004 phantoms alternating, 2000-2015, then alternating again, 3000-3019, with a
    # cosine rate and the long-T2 loss weight (TRAINING.md); evaluation seeds 9000+ are outside all
    t = card["training"]
    assert t["train_seeds"] == list(range(3000, 3020)) and t["val_seeds"] == list(range(3500, 3506))
    assert (t["population"], t["lr_schedule"], t["long_t2_weight"]) == ("healthy+seed004", "cosine", 3.0)
    second = t["init_from"]["previous_training"]
    assert second["train_seeds"] == list(range(2000, 2016)) and second["population"] == "healthy+seed004"
    first = second["init_from"]["previous_training"]
    assert first["train_seeds"] == list(range(1000, 1024)) and first["population"] == "healthy"
    assert first["init_from"]["previous_training"]["train_seeds"] == list(range(12))
    assert card["validation_loss"] < 0.2
    _, basis = mrf_target_basis()
    torch.testing.assert_close(net.basis(), basis.to(torch.complex64))
    assert net.table()["SV1_real"][1] == 1.0  # SV1 divided by its brain maximum
    assert card["mrf_protocol_key"] == _mrf_protocol().key()
