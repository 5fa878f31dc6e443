"""Noise-conditioned pc-bSSFP networks (issue 18): the noise level η = σ_F/‖F‖ as one more input.

Checked against independent truth: the configurations' noise σ against the empirical spread of
simulated noise, the widened net against the net it starts from (equal outputs for any η), the
background estimator against the known noise of a simulated volume, and old files against their
own outputs before and after the change.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bids_qmri.modalities.bssfp.estimate import estimate_bssfp, estimate_noise_sigma
from bids_qmri.modalities.bssfp.net import (
    NOISE_INPUT_SCALE,
    BSSFPNet,
    add_noise_input,
    configuration_noise_sigma,
    input_names,
    noise_level,
    widen_for_noise_input,
)
from bids_qmri.modalities.bssfp.training import (
    TrainConfig,
    parameter_ranges,
    sample_parameters,
    simulate_signal,
    signal_to_features,
    train_bssfp_net,
)
from bids_qmri.nets.io import load_net, save_net
from bids_qmri.physics.bssfp import configurations, remove_receiver_phase, seed_protocol
from bids_qmri.physics.noise import add_complex_noise, noise_sigma


def _random_net(kind, noise_input=False, seed=0):
    torch.manual_seed(seed)
    net = BSSFPNet(kind, parameter_ranges("brain", kind, 0.0048), log_outputs=("T1", "T2"), noise_input=noise_input)
    with torch.no_grad():
        net.in_mean.normal_(0, 0.3)
        net.in_std.uniform_(0.1, 2.0)
    return net


@pytest.mark.parametrize("npc", [12, 6, 4])
def test_configuration_noise_sigma_matches_simulated_noise(npc):
    """F's per-channel noise σ is σ_S/√Npc: the empirical spread of F±1 of pure-noise draws."""
    p = seed_protocol(npc)
    g = torch.Generator().manual_seed(1)
    noise = add_complex_noise(torch.zeros(200_000, npc, dtype=torch.complex128), 10.0, g)
    f = configurations(noise, p.phase_increments_rad())
    expected = configuration_noise_sigma(noise_sigma(10.0), npc)
    for order in (0, 1, 2):
        for part in (f[:, order].real, f[:, order].imag):
            assert abs(float(part.std()) / expected - 1) < 0.01


def test_noise_level_is_sigma_over_norm_and_zero_without_noise():
    f = torch.tensor([[3 + 0j, 4j, 0], [0, 0, 0]], dtype=torch.complex128)
    eta = noise_level(f, 0.5)
    assert torch.allclose(eta, torch.tensor([0.1, 0.0], dtype=torch.float64))
    assert torch.equal(noise_level(f, 0.0), torch.zeros(2, dtype=torch.float64))
    x = add_noise_input(torch.ones(2, 6), eta.float())
    assert x.shape == (2, 7) and torch.equal(x[:, -1], eta.float())


@pytest.mark.parametrize("kind", ["magnitude", "complex"])
def test_widened_net_equals_its_start_for_any_noise_level(kind):
    start = _random_net(kind)
    net = BSSFPNet(kind, start.ranges, log_outputs=start.log_outputs, noise_input=True)
    widen_for_noise_input(net, start, eta_mean=0.02, eta_std=0.01)
    x = torch.randn(1000, start.n_in) * start.in_std + start.in_mean
    with torch.no_grad():
        y0 = start(x)
        for eta in (0.0, 0.05, 10.0):
            assert torch.allclose(net(add_noise_input(x, eta)), y0, rtol=1e-6, atol=0), eta
    assert net.in_mean[-1] == pytest.approx(0.02) and net.in_std[-1] == pytest.approx(0.01)
    with pytest.raises(ValueError, match="noise-conditioned"):
        widen_for_noise_input(start, start)


@pytest.mark.parametrize("noise_input", [False, True])
def test_files_record_the_noise_input(tmp_path, noise_input):
    """A file without the flag (every file written before it) loads as a 6-input net and gives the
    same numbers; a noise-conditioned file loads with its 7th input."""
    net = _random_net("complex", noise_input=noise_input, seed=3)
    path = save_net(net, tmp_path / "net.safetensors")
    back = load_net(path)
    assert back.noise_input is noise_input and back.n_in == 6 + noise_input and back.n_features == 6
    assert ("noise_input" in back.config()) is noise_input
    x = torch.randn(50, back.n_in)
    with torch.no_grad():
        assert torch.equal(back(x), net.eval()(x))
    assert input_names("complex", noise_input)[-1] == ("eta = sigma_F / ||F||" if noise_input else "B1")


def test_old_config_without_the_key_builds_a_net_without_noise_input():
    config = _random_net("magnitude").config()
    assert "noise_input" not in config
    net = BSSFPNet.from_config(config)
    assert not net.noise_input and net.n_in == 4


def test_training_features_carry_each_samples_noise_level():
    """η of training features = σ_F(SNR)/‖F_noisy‖ per sample, 0 for the noise-free ones."""
    p = seed_protocol(6)
    g = torch.Generator().manual_seed(0)
    par = sample_parameters("brain", 400, g, tr=p.tr, with_b0=True)
    s = simulate_signal(par, p)
    snr = torch.full((400,), 12.0, dtype=torch.float64)
    snr[::2] = math.inf
    noisy = add_complex_noise(s, snr.unsqueeze(-1), g)
    x = signal_to_features(noisy, par["B1"], p, "complex", signal_sigma=noise_sigma(snr))
    f = configurations(remove_receiver_phase(noisy), p.phase_increments_rad())
    expected = configuration_noise_sigma(noise_sigma(12.0), 6) / f.abs().pow(2).sum(-1).sqrt()
    assert x.shape == (400, 7)
    assert torch.equal(x[::2, -1], torch.zeros(200, dtype=x.dtype))
    assert torch.allclose(x[1::2, -1], expected[1::2])
    assert torch.equal(x[:, :6], signal_to_features(noisy, par["B1"], p, "complex"))


def test_noise_input_needs_training_noise():
    with pytest.raises(ValueError, match="noise_input needs training noise"):
        TrainConfig(method="svnn", noise_input=True)


def test_fine_tune_from_a_net_without_noise_input(tmp_path):
    """--init-from a plain net: the card records the noise input, and the fine-tuned net reads η
    (its η weights left zero, it could not)."""
    p = seed_protocol(12)
    base, _ = train_bssfp_net(p, TrainConfig(method="svnn", distribution="brain", n_samples=2000, max_epochs=1,
                                             batch_size=64, seed=0, progress=False))
    start = save_net(base, tmp_path / "start.safetensors")
    net, card = train_bssfp_net(p, TrainConfig(method="svnn", distribution="brain", n_samples=2000, max_epochs=2,
                                               batch_size=64, lr=1e-3, seed=1, progress=False, snr_range=(5, 100),
                                               noise_free_fraction=0.5, noise_input=True, init_from=str(start)))
    assert net.noise_input and card["architecture"]["noise_input"] is True
    assert card["architecture"]["inputs"][-1] == "eta = sigma_F / ||F||"
    assert card["training"]["init_from"]["file"] == "start.safetensors"
    assert net.net[0].weight[:, -1].abs().max() > 0
    x = torch.randn(100, 4) * base.in_std + base.in_mean
    with torch.no_grad():
        assert not torch.allclose(net(add_noise_input(x, 0.0)), net(add_noise_input(x, 0.1)))
    # a conditioned net cannot start a plain one
    cond = save_net(net, tmp_path / "cond.safetensors")
    with pytest.raises(ValueError, match="cannot initialise one without"):
        train_bssfp_net(p, TrainConfig(method="svnn", distribution="brain", n_samples=500, max_epochs=1,
                                       progress=False, init_from=str(cond)))


def _head_volume(sigma_signal, npc=12, shape=(40, 40, 12), seed=0):
    """A 'head' (brain ellipsoid + a bright scalp shell) in pure complex noise; configurations as the
    workflow computes them (receiver phase removed)."""
    p = seed_protocol(npc)
    g = torch.Generator().manual_seed(seed)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = np.sqrt(zz**2 + yy**2 + (xx * 1.5) ** 2)
    brain, scalp = r < 0.6, (r >= 0.65) & (r < 0.8)
    n = int(np.prod(shape))
    t1 = torch.where(torch.as_tensor(scalp.ravel()), 0.4, 1.0).double()
    t2 = torch.where(torch.as_tensor(scalp.ravel()), 0.07, 0.08).double()
    m0 = torch.as_tensor((brain | scalp).ravel() * 1.0)
    b0 = torch.empty(n, dtype=torch.float64).uniform_(-50, 50, generator=g)
    from bids_qmri.physics.bssfp import bssfp_signal

    s = bssfp_signal(t1, t2, m0, torch.ones(n, dtype=torch.float64), b0, tr=p.tr, te=p.te, flip_rad=p.flip_rad,
                     phase_increments_rad=p.phase_increments_rad())
    s = s + sigma_signal * torch.complex(torch.randn(s.shape, generator=g, dtype=torch.float64),
                                         torch.randn(s.shape, generator=g, dtype=torch.float64))
    f = configurations(remove_receiver_phase(s), p.phase_increments_rad()).reshape(*shape, 3).numpy()
    return f, brain, p


@pytest.mark.parametrize("snr", [10.0, 25.0])
def test_background_estimate_of_a_simulated_head(snr):
    sigma = noise_sigma(snr)
    f, brain, p = _head_volume(sigma)
    est, info = estimate_noise_sigma(f, brain)
    assert abs(est / configuration_noise_sigma(sigma, p.npc) - 1) < 0.03, (est, info)
    assert info["voxels_used"] > 1000


def test_background_estimate_refuses_without_background():
    f, brain, _ = _head_volume(0.001, shape=(12, 12, 8))
    est, info = estimate_noise_sigma(f, np.ones_like(brain))
    assert est is None and "background voxels" in info["reason"]


def test_estimate_bssfp_passes_the_noise_level(tmp_path, monkeypatch):
    """A noise-conditioned net gets η = σ/‖F‖ per voxel; without σ it runs at η = 0 and says so."""
    import bids_qmri.modalities.bssfp.models as models

    p = seed_protocol(12)
    net = _random_net("complex", noise_input=True, seed=5)
    card = {"b1_range": [0.6, 1.4], "parameter_ranges": {k: list(v) for k, v in net.ranges.items()}}
    monkeypatch.setattr(models, "get_model", lambda *a, **k: (net, card))
    g = torch.Generator().manual_seed(0)
    par = sample_parameters("uniform", 50, g, tr=p.tr, with_b0=True)
    F = configurations(remove_receiver_phase(simulate_signal(par, p)), p.phase_increments_rad()).numpy() * 0.3
    b1 = par["B1"].numpy()
    with_sigma, prov = estimate_bssfp("svnncomplex", F, b1, p, noise_sigma=0.002, range_check=False)
    eta = 0.002 / np.linalg.norm(F, axis=1)
    assert prov["noise_input"]["sigma_configurations"] == 0.002 and prov["noise_input"]["scale"] == NOISE_INPUT_SCALE
    assert prov["noise_input"]["eta_median"] == pytest.approx(float(np.median(eta)), rel=1e-5)
    f = F / np.linalg.norm(F, axis=1, keepdims=True)
    from bids_qmri.modalities.bssfp.net import bssfp_features

    x = add_noise_input(bssfp_features(torch.as_tensor(f).to(torch.complex64), torch.as_tensor(b1).float(), "complex"),
                        torch.as_tensor(NOISE_INPUT_SCALE * eta).float())
    with torch.no_grad():
        direct = net(x).numpy()
    assert np.allclose(with_sigma["T1map"], direct[:, 0], rtol=1e-5)
    without, prov0 = estimate_bssfp("svnncomplex", F, b1, p, range_check=False)
    assert prov0["noise_input"]["sigma_configurations"] is None and "warnings" not in prov0
    zero, _ = estimate_bssfp("svnncomplex", F, b1, p, noise_sigma=0.0, range_check=False)
    assert np.array_equal(zero["T1map"], without["T1map"])  # not given = noise-free
    assert not np.allclose(without["T1map"], with_sigma["T1map"])


def test_background_estimate_on_the_synthetic_dataset(tmp_path):
    """The estimator against the synthetic data's known noise (σ = 0.074/(√2·SNR) per channel of the
    phase cycles, so σ/√Npc on the configurations): the configurations as the workflow computes them
    without denoising and Gibbs removal (both lower the noise they leave: measured at SNR 25, 4 mm,
    Gibbs removal ×0.64 in the background, MP-PCA ×0.90 there; TRAINING.md)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from bids_qmri.preproc.complexdata import load_complex
    from bids_qmri.preproc.configurations import compute_configurations, remove_gibbs
    from bids_qmri.preproc.mask import brain_mask

    snr = 15.0
    exe = Path(sys.executable).parent / "bids_qmri-synth"
    cmd = [str(exe) if exe.exists() else "bids_qmri-synth", str(tmp_path / "bids"), "--participants", "1",
           "--sessions", "0", "--resolution", "4", "--seed", "2", "--kinds", "bssfp", "--snr", str(snr)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    stem = next((tmp_path / "bids").glob("sub-01/anat/*_part-mag_bSSFP.nii.gz"))
    files = {"mag": stem, "phase": Path(str(stem).replace("part-mag", "part-phase"))}
    data, _, header, _ = load_complex(files, 12)
    zooms = header.get_zooms()[:3]
    F = compute_configurations(data, [math.degrees(v) for v in seed_protocol(12).phase_increments_rad()])
    mask = brain_mask(np.abs(data).mean(-1), zooms)
    truth = configuration_noise_sigma(noise_sigma(snr), 12)
    est, info = estimate_noise_sigma(F, mask)
    assert abs(est / truth - 1) < 0.02, (est, truth, info)
    smoothed, _ = estimate_noise_sigma(remove_gibbs(F, zooms, num_processes=1), mask)
    assert 0.5 * truth < smoothed < 0.8 * truth  # Gibbs removal interpolates: less noise per voxel


@pytest.mark.parametrize("method", ["svnn", "svnncomplex"])
def test_nets_without_noise_input_ignore_the_noise_level(method):
    """Files written before the noise input (the seed set) load as before and give the same maps
    whatever noise level the caller passes; their provenance has no noise_input."""
    p = seed_protocol(12)
    g = torch.Generator().manual_seed(4)
    par = sample_parameters("uniform", 100, g, tr=p.tr, with_b0=method == "svnncomplex")
    F = configurations(remove_receiver_phase(simulate_signal(par, p)), p.phase_increments_rad()).numpy()
    b1 = par["B1"].numpy()
    plain, prov = estimate_bssfp(method, F, b1, p, allow_training=False, model_set="seed", range_check=False)
    told, _ = estimate_bssfp(method, F, b1, p, allow_training=False, model_set="seed", range_check=False,
                             noise_sigma=0.01)
    assert "noise_input" not in prov and prov["model_card"]["architecture"].get("noise_input") is None
    for key in plain:
        assert np.array_equal(plain[key], told[key])


def test_contract_estimate_measures_the_noise_or_warns(monkeypatch):
    """The workflow's estimate measures σ in the background and records it; without a background the
    map's sidecar gets a warning."""
    import bids_qmri.modalities.bssfp.models as models
    from bids_qmri.modalities.bssfp.estimate import estimate

    net = _random_net("complex", noise_input=True, seed=6)
    card = {"b1_range": [0.6, 1.4], "parameter_ranges": {k: list(v) for k, v in net.ranges.items()}}
    monkeypatch.setattr(models, "get_model", lambda *a, **k: (net, card))
    sigma = noise_sigma(20.0)
    f, brain, p = _head_volume(sigma)

    class Context:
        model_dir, seed, allow_training, device, options = None, 0, False, "cpu", {}

    data = {"configurations": f, "b1": np.ones(brain.shape)}
    _, prov = estimate("svnncomplex", data, brain, p, Context())
    got = prov["noise_input"]["sigma_configurations"]
    assert abs(got / configuration_noise_sigma(sigma, 12) - 1) < 0.03 and "warnings" not in prov
    assert prov["noise_input"]["estimate"]["voxels_used"] > 1000
    _, prov = estimate("svnncomplex", data, np.ones_like(brain), p, Context())
    assert prov["noise_input"]["sigma_configurations"] is None
    assert any("noise level could not be measured" in w for w in prov["warnings"])
