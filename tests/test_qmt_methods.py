"""qMT methods (seed 003): training-set simulator (parameters, fingerprints, CRB), networks, NLLS.

Short schedules (a subsample of the default train) keep the exact physics cheap; truth comes from
direct per-sample ``hybrid_state_signal`` calls, central finite differences in float64 and
``scipy.stats.truncnorm``.
"""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from bids_qmri.physics import qmt, svd
from bids_qmri.modalities.qmt import simulate

D = torch.float64


def short_schedule(n=48):
    s = qmt.default_qmt_schedule()
    idx = torch.linspace(0, s["flip_rad"].numel() - 1, n).round().long()
    return dict(flip_rad=s["flip_rad"][idx], pulse_dur=s["pulse_dur"][idx], tr=s["tr"], inversion_dur=s["inversion_dur"])


@pytest.fixture(scope="module")
def schedule_and_basis():
    sched = short_schedule()
    gen = torch.Generator().manual_seed(5)
    theta = simulate.sample_parameters(256, sched["tr"], gen)
    sig = qmt.hybrid_state_signal(*theta.unbind(-1), **sched)
    return sched, svd.svd_basis(sig, 24).to(torch.complex128)


def test_parameter_distributions_are_the_truncated_gaussians():
    gen = torch.Generator().manual_seed(0)
    tr = 3.5e-3
    th = simulate.sample_parameters(40_000, tr, gen).numpy()
    for i, name in enumerate(("m0s", "T1", "T2s", "Rx", "B1")):
        mean, sd, lo, hi = simulate.DISTRIBUTIONS[name]
        col = th[:, simulate.PARAMETERS.index(name)]
        assert col.min() >= lo and col.max() <= hi
        truth = stats.truncnorm((lo - mean) / sd, (hi - mean) / sd, loc=mean, scale=sd)
        assert abs(col.mean() - truth.mean()) < 4 * truth.std() / math.sqrt(len(col)), name
        assert abs(col.std() - truth.std()) < 0.02 * truth.std(), name
    t1, t2f, b0 = th[:, 1], th[:, 2], th[:, 5]
    assert (t2f <= t1).all() and t2f.min() >= simulate.DISTRIBUTIONS["T2f"][2]
    assert abs(b0).max() <= 1 / tr and abs(b0.mean()) < 0.02 / tr and abs(b0.std() - 1 / tr / math.sqrt(3)) < 0.01 / tr


def test_simulated_set_equals_direct_signal_calls(schedule_and_basis):
    sched, basis = schedule_and_basis
    out = simulate.simulate_set(5, sched, basis, seed=3, chunk=2, log=None)
    for k in range(5):
        direct = qmt.hybrid_state_signal(*[float(v) for v in out["theta"][k]], **{
            **sched, "flip_rad": sched["flip_rad"], "pulse_dur": sched["pulse_dur"]})
        want = (direct.to(torch.complex128) @ basis).numpy()
        got = out["coeffs"][k].numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def _fd_crb(theta, sched, basis):
    """Independent CRB: central differences in float64, explicit [J, c, i·c] Fisher, numpy inverse."""
    theta = np.asarray(theta, dtype=np.float64)
    steps = np.array([1e-4, 1e-4, 1e-5, 1e-8, 1e-3, 1e-2, 1e-5])
    u = basis.numpy()

    def c(p):
        return qmt.hybrid_state_signal(*[torch.tensor(v, dtype=D) for v in p], **sched).numpy() @ u

    c0 = c(theta)
    cols = []
    for k, h in enumerate(steps):
        e = np.zeros(7)
        e[k] = h
        cols.append((c(theta + e) - c(theta - e)) / (2 * h))
    j = np.stack(cols + [c0, 1j * c0], 1)
    fisher = (j.conj().T @ j).real
    return np.diag(np.linalg.inv(fisher))[:7]


def test_crb_matches_finite_difference_fisher(schedule_and_basis):
    sched, basis = schedule_and_basis
    theta = torch.tensor([[0.13, 1.37, 0.083, 11.3e-6, 37.1, 23.0, 0.91],
                          [0.21, 0.83, 0.061, 13.7e-6, 52.3, -71.0, 1.17],
                          [0.07, 2.11, 0.147, 9.1e-6, 28.4, 101.0, 0.77]], dtype=D)
    want = np.stack([_fd_crb(t, sched, basis) for t in theta])
    # float32 (production) loses ~1e-2 on this short, ill-conditioned schedule (cond ~1e9)
    for dtype, rtol in ((torch.float64, 1e-4), (torch.float32, 5e-2)):
        c, j = simulate.coefficient_jacobian(theta, sched, basis, dtype=dtype)
        got = simulate.crb_from_jacobian(c, j).numpy()
        np.testing.assert_allclose(got, want, rtol=rtol)
    # scaling law used for every epoch's M0 and noise: CRB(σ, M0) = CRB(1, 1)·σ²/|M0|²
    m0 = torch.tensor([0.3 * np.exp(1j), 0.7j, -0.5], dtype=torch.complex128)
    scaled = simulate.crb_from_jacobian(c, j, sigma=0.01, m0=m0).numpy()
    np.testing.assert_allclose(scaled, got * 1e-4 / np.abs(m0.numpy())[:, None] ** 2, rtol=1e-6)


def test_prior_informed_bound_is_the_linear_gaussian_posterior_covariance():
    """``prior_informed_bound`` = diag((F + P)⁻¹) against independent truth: for a linear-Gaussian model
    y = A θ + σ n with θ ~ N(0, P⁻¹), the posterior-mean estimate (ridge least squares, numpy lstsq
    on the augmented system) has error covariance exactly (F + P)⁻¹ (Monte Carlo); with one
    parameter's prior only, the Schur identity B_k = 1/(1/CRB_k + p_k); with none, the CRB."""
    gen = torch.Generator().manual_seed(11)
    n_s, r = 2, 6
    c = torch.complex(torch.randn(n_s, r, generator=gen, dtype=D), torch.randn(n_s, r, generator=gen, dtype=D))
    jac = torch.complex(torch.randn(n_s, r, 7, generator=gen, dtype=D), torch.randn(n_s, r, 7, generator=gen, dtype=D))
    sigma, m0 = 0.3, 0.8 * np.exp(0.4j)
    prec = torch.tensor([2.0, 0.5, 4.0, 1.0, 3.0, 0.7, 1.5, 0.9, 1.2], dtype=D)
    fisher = simulate.fisher_from_jacobian(c, jac, sigma, torch.tensor(m0))
    got = simulate.prior_informed_bound(fisher, prec).numpy()
    rng = np.random.default_rng(0)
    for i in range(n_s):
        cols = np.concatenate([m0 * jac[i].numpy(), c[i].numpy()[:, None], 1j * c[i].numpy()[:, None]], 1)
        a = np.concatenate([cols.real, cols.imag])  # [2R, 9]: the real model of the complex coefficients
        theta = rng.standard_normal((40_000, 9)) / np.sqrt(prec.numpy())
        y = theta @ a.T + sigma * rng.standard_normal((40_000, 2 * r))
        aug = np.concatenate([a / sigma, np.diag(np.sqrt(prec.numpy()))])
        rhs = np.concatenate([y.T / sigma, np.zeros((9, 40_000))])
        post_mean = np.linalg.lstsq(aug, rhs, rcond=None)[0].T
        mc = ((post_mean - theta) ** 2).mean(0)[:7]
        np.testing.assert_allclose(got[i], mc, rtol=0.04)  # 40 000 draws: 1 SD of a variance is 0.7 %
    crb = simulate.crb_from_jacobian(c, jac, sigma, torch.tensor(m0))
    np.testing.assert_allclose(simulate.prior_informed_bound(fisher, torch.zeros(9, dtype=D)), crb, rtol=1e-10)
    for k in range(7):
        one = torch.zeros(9, dtype=D)
        one[k] = prec[k]
        bk = simulate.prior_informed_bound(fisher, one)[:, k]
        np.testing.assert_allclose(bk, 1 / (1 / crb[:, k] + prec[k]), rtol=1e-8)


def _design_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "scripts" / "design_qmt_schedule.py"
    spec = importlib.util.spec_from_file_location("design_qmt_schedule", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, path


def test_design_efficiency_objective_is_the_prior_informed_ratio():
    """``scripts/design_qmt_schedule.py --objective efficiency`` (issue 16) scores √(B/CRB) from
    ``bounds_at``: against analytic truth on the bundled schedule's exact Jacobian, with the prior of
    target k only, B_k = 1/(1/CRB_k + p_k) and the linearised Bayes variance (BFB)_kk = CRB_k/(1 + p_k
    CRB_k)², so std/√CRB = B_k/CRB_k; with the full prior BFB ≤ B ≤ CRB; the SAR-like energy of a
    constant train is n α²/τ; a bad option combination is a one-line error."""
    import subprocess
    import sys

    mod, path = _design_script()
    sched = qmt.default_qmt_schedule()
    theta = simulate.sample_parameters(3, sched["tr"], torch.Generator().manual_seed(4))
    full = mod.bounds_at(theta, sched)
    assert (full["bayes"] <= full["b"] * (1 + 1e-9)).all() and (full["b"] < full["crb"]).all()
    prec = simulate.prior_precision(sched["tr"], n=20_000)
    for k in range(3):
        one = torch.zeros(9, dtype=D)
        one[k] = prec[k]
        r = mod.bounds_at(theta, sched, precision=one)
        np.testing.assert_allclose(r["crb"], full["crb"], rtol=1e-9)
        expect = 1 / (1 + prec[k] * r["crb"][:, k])
        np.testing.assert_allclose(r["b"][:, k] / r["crb"][:, k], expect, rtol=1e-6)
        np.testing.assert_allclose((r["bayes"][:, k] / r["crb"][:, k]).sqrt(), expect, rtol=1e-6)
    const = qmt.schedule_from_knots([30.0] * 4, [300.0] * 4)
    n = len(const["flip_rad"])
    np.testing.assert_allclose(mod.sar(const), n * math.radians(30.0) ** 2 / 300e-6, rtol=1e-9)
    proc = subprocess.run([sys.executable, str(path), "0", "1", "--objective", "efficiency", "--rank", "13"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "drop --rank" in proc.stderr.strip().splitlines()[-1]


def test_design_searches_from_a_start_the_constraints_reject(tmp_path):
    """``design_qmt_schedule.py --knots`` (issue 16, more knots): the previous train's knots (before
    schedule C) have a lower T1/T2f efficiency than the bundled C, so ``--hold-efficiency`` rejects
    them; the script says so in one line, keeps searching (none here: 0 CPU-s) and still writes the
    knots instead of failing."""
    import json
    import subprocess
    import sys

    _, path = _design_script()
    prev = {"flip_deg": [63.8, 56.7, 13.1, 2.0, 2.4, 1.7, 76.2, 180.0, 80.3, 14.8, 74.3, 22.8, 8.1, 19.4, 4.6],
            "duration_us": [220.0, 126.0, 296.0, 362.0, 455.0, 204.0, 479.0, 471.0, 312.0, 151.0, 170.0, 315.0,
                            428.0, 100.0, 125.0]}
    (tmp_path / "prev.json").write_text(json.dumps(prev))
    proc = subprocess.run([sys.executable, str(path), "0", "1", "--objective", "efficiency", "--draws", "8",
                           "--hold-efficiency", "--knots", str(tmp_path / "prev.json"), "--out", str(tmp_path / "o.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "start rejected by the constraints" in proc.stdout
    assert "full signal (efficiency) rejected by the constraints" in proc.stdout
    out = json.loads((tmp_path / "o.json").read_text())
    assert out["flip_deg"] == prev["flip_deg"] and out["iterations"] == 0 and out["score"] is None


def test_prior_bound_at_scales_the_sets_fisher_matrix(schedule_and_basis):
    """``insilico.prior_bound_at``: the set's ``fisher_unit`` scaled to SNR_max; without a prior it is
    the CRB of the set (``crb_unit / SNR²``, computed separately), with one it is smaller."""
    from bids_qmri.modalities.qmt.insilico import crb_at, prior_bound_at

    sched, basis = schedule_and_basis
    data = simulate.simulate_set(4, sched, basis, seed=2, with_fisher=True, log=None)
    assert data["fisher_unit"].shape == (4, 9, 9)
    for snr in (10.0, 50.0):
        np.testing.assert_allclose(prior_bound_at(data, snr, torch.zeros(9, dtype=D)), crb_at(data, snr), rtol=1e-6)
        with_prior = prior_bound_at(data, snr, simulate.prior_precision(sched["tr"], n=10_000))
        assert (with_prior < crb_at(data, snr)).all()


def test_prior_precision_is_the_training_distributions_variance():
    tr = 3.5e-3
    p = simulate.prior_precision(tr, n=100_000).numpy()
    for name in ("m0s", "T1", "T2s", "Rx", "B1"):
        mean, sd, lo, hi = simulate.DISTRIBUTIONS[name]
        var = stats.truncnorm((lo - mean) / sd, (hi - mean) / sd, loc=mean, scale=sd).var()
        np.testing.assert_allclose(1 / p[simulate.PARAMETERS.index(name)], var, rtol=0.03, err_msg=name)
    np.testing.assert_allclose(1 / p[5], (2 / tr) ** 2 / 12, rtol=0.02)  # B0 uniform on ±1/TR
    assert (p[7:] == 0).all()  # M0: the nets see unit-norm coefficients, so its prior is flat


def test_widened_distributions_sets_and_cache(schedule_and_basis, tmp_path):
    """Issue 16's wider training distribution: SD and truncation limits × factor about the mean,
    clipped to the physical limits; the sampler follows it; sets record it and the cache keys it;
    a bad factor is a one-line error."""
    tr = 3.5e-3
    wide = {"m0s": 2, "T2s": 2, "Rx": 1.5}
    d = simulate.widened_distributions(wide)
    assert d["m0s"] == (0.12, 0.16, 0.0, 0.8) and d["T1"] == simulate.DISTRIBUTIONS["T1"]  # 0.88 clipped to 0.8
    assert d["T2s"] == pytest.approx((12e-6, 6e-6, 2e-6, 28e-6)) and d["Rx"] == pytest.approx((44, 30, 0, 203))
    th = simulate.sample_parameters(40_000, tr, torch.Generator().manual_seed(0), widen=wide).numpy()
    for name in ("m0s", "T2s", "Rx", "T1"):
        mean, sd, lo, hi = d[name]
        col = th[:, simulate.PARAMETERS.index(name)]
        truth = stats.truncnorm((lo - mean) / sd, (hi - mean) / sd, loc=mean, scale=sd)
        assert col.min() >= lo and col.max() <= hi
        assert abs(col.std() - truth.std()) < 0.02 * truth.std(), name
    for bad in ({"B0": 2}, {"m0s": 0.5}, {"m0s": "x"}, {"T3": 2}):
        with pytest.raises(ValueError, match="give factors in") as exc:
            simulate.check_widen(bad)
        assert "\n" not in str(exc.value)
    sched, basis = schedule_and_basis
    plain = simulate.cached_set(tmp_path, 4, sched, basis, seed=1, log=None)
    widened = simulate.cached_set(tmp_path, 4, sched, basis, seed=1, widen=wide, log=None)
    assert len(list(tmp_path.glob("qmt-trainset-*.pt"))) == 2
    assert torch.equal(plain["widen"], torch.ones(4, 7, dtype=D))
    assert widened["widen"].tolist() == [[2.0, 1.0, 1.0, 2.0, 1.5, 1.0, 1.0]] * 4
    from bids_qmri.modalities.qmt.training import widen_record

    mixed = {"theta": torch.zeros(6, 7), "widen": torch.cat([torch.ones(2, 7), widened["widen"]])}
    rec = sorted(widen_record(mixed), key=lambda r: r["samples"])
    assert rec[0] == {"factors": {}, "samples": 2, "distributions": {}}
    assert rec[1]["factors"] == {"m0s": 2.0, "T2s": 2.0, "Rx": 1.5} and rec[1]["samples"] == 4


def test_effective_directions_give_the_crb_and_fisher_basis_keeps_it(schedule_and_basis):
    """Issue 16's information-keeping basis. Schur complement: with one target k, ``1/‖G_k‖²`` of its
    effective direction is the full-signal CRB of θ_k (all other 8 unknowns free), and G_k is
    orthogonal (real inner product) to every nuisance column. ``fisher_basis`` is orthonormal, its
    CRBs are never below the full signal's (data processing) and on independent draws they are below
    a plain SVD basis of the same rank and atoms; the Procrustes rotation leaves its span unchanged."""
    sched, _ = schedule_and_basis
    eye = torch.eye(sched["flip_rad"].numel(), dtype=torch.complex128)
    atoms = simulate.sample_parameters(128, sched["tr"], torch.Generator().manual_seed(7))
    test = simulate.sample_parameters(64, sched["tr"], torch.Generator().manual_seed(8))
    s, j = simulate.coefficient_jacobian(atoms, sched, eye, dtype=D)
    st, jt = simulate.coefficient_jacobian(test, sched, eye, dtype=D)
    full = simulate.crb_from_jacobian(st, jt)
    for k in range(3):
        g = simulate.effective_directions(st, jt, targets=(k,))[:, 0]
        np.testing.assert_allclose((1 / g.abs().pow(2).sum(-1)).numpy(), full[:, k].numpy(), rtol=1e-6)
        cols = torch.cat([jt[..., [i for i in range(7) if i != k]], st[..., None], 1j * st[..., None]], -1)
        cos = (g.conj()[:, None, :] @ cols).real[:, 0] / (g.norm(dim=-1)[:, None] * cols.norm(dim=1))
        assert cos.abs().max() < 1e-8
    rank = 6
    plain = svd.svd_basis(s, rank).to(torch.complex128)
    u = simulate.fisher_basis(s, j, rank)
    rotated = simulate.fisher_basis(s, j, rank, reference=plain)
    torch.testing.assert_close(u.mH @ u, torch.eye(rank, dtype=torch.complex128), atol=1e-12, rtol=0)
    torch.testing.assert_close(rotated @ rotated.mH, u @ u.mH, atol=1e-10, rtol=0)
    assert (rotated - plain).norm() < (u - plain).norm()

    def crb(b):
        return simulate.crb_from_jacobian(st @ b, (jt.transpose(-1, -2) @ b).transpose(-1, -2))[:, :3]

    assert (crb(u) >= full[:, :3] * (1 - 1e-6)).all()
    # median CRB ratio plain / fisher_basis: measured 6.79 (m0s), 7.37 (T1), 2.52 (T2f) on 2026-12-04 on
    # the 48-TR cut of schedule C (issue 16; on the previous train 16.9, 20.9, 1.97) (deterministic:
    # fixed draws, float64); the bounds are ~1.5x below
    gain = (crb(plain) / crb(u)).median(0).values
    assert (gain > torch.tensor([4.5, 4.9, 1.68], dtype=D)).all(), gain


# ---- networks ---------------------------------------------------------------------------------


class _Proto:
    """Minimal protocol object for on-the-fly training on the short schedule."""

    def __init__(self, sched):
        self.sched = sched

    def schedule(self):
        return self.sched

    def key(self):
        return "test"

    def as_dict(self):
        return {"test": True}


@pytest.fixture(scope="module")
def tiny_sets(schedule_and_basis):
    sched, basis = schedule_and_basis
    return (simulate.simulate_set(384, sched, basis, seed=21, chunk=192, log=None),
            simulate.simulate_set(128, sched, basis, seed=22, chunk=128, log=None))


def test_residual_mlp_architecture_and_safetensors_round_trip(tmp_path):
    from bids_qmri.models.registry import load_model, save_model
    from bids_qmri.modalities.qmt.net import ResidualMLP, features

    net = ResidualMLP(25)
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(linears) == 14 == net.n_layers and len(norms) == 13  # all but the output layer
    c = torch.randn(7, 13, dtype=torch.complex128)
    x = features(c)
    # unit norm, first coefficient real: invariant to the complex scale M0
    np.testing.assert_allclose(x.norm(dim=1).numpy(), 1, rtol=1e-6)
    np.testing.assert_allclose(features(c * (0.3 - 0.8j)).numpy(), x.numpy(), atol=1e-6)
    save_model(net, {"method": "qmtnet"}, tmp_path, "m", origin="test")
    back, card = load_model(tmp_path / "m.safetensors")
    torch.testing.assert_close(back(x), net.eval()(x))


def test_log_outputs_are_exp_of_standardised_log_and_survive_a_round_trip(tmp_path):
    """With the output layer zeroed the net returns the training statistics' centre: the geometric
    mean for a log output, the arithmetic mean for a linear one; the choice is kept in the config."""
    from bids_qmri.models.registry import load_model, save_model
    from bids_qmri.modalities.qmt.net import ResidualMLP

    gen = torch.Generator().manual_seed(3)
    targets = torch.rand(200, 3, generator=gen, dtype=torch.float64) * torch.tensor([0.3, 3.0, 0.5]) + 0.01
    net = ResidualMLP(25, log_outputs=("T2f", "T1"))
    assert net.log_outputs == ("T1", "T2f")  # in output order
    net.set_output_stats(targets.float())
    torch.nn.init.zeros_(net.out.weight)
    torch.nn.init.zeros_(net.out.bias)
    want = torch.stack([targets[:, 0].mean(), targets[:, 1].log().mean().exp(), targets[:, 2].log().mean().exp()])
    got = net.eval()(torch.randn(4, 25)).double()
    torch.testing.assert_close(got, want.expand(4, 3), rtol=1e-5, atol=1e-7)
    torch.nn.init.normal_(net.out.weight)
    save_model(net, {"method": "qmtnet"}, tmp_path, "m", origin="test")
    back, _ = load_model(tmp_path / "m.safetensors")
    x = torch.randn(5, 25)
    assert back.log_outputs == ("T1", "T2f") and bool((back(x)[:, 1:] > 0).all())
    torch.testing.assert_close(back(x), net(x))
    u = net.parameterised(x)  # what the losses see: log θ for the log outputs
    torch.testing.assert_close(torch.cat([u[:, :1], u[:, 1:].exp()], 1), net(x))
    with pytest.raises(ValueError, match="not outputs"):
        ResidualMLP(25, log_outputs=("B1",))


@pytest.mark.parametrize("method", ["qmtnet", "qmtnetmse"])
def test_training_learns_and_is_reproducible(tiny_sets, schedule_and_basis, method):
    """Each net beats the best constant estimator (the training mean) on its own held-out loss;
    the same seed gives identical weights."""
    from bids_qmri.modalities.qmt.training import OUT_INDEX, evaluate, train_qmtnet

    train_set, val_set = tiny_sets
    proto = _Proto(schedule_and_basis[0])
    kw = dict(train_set=train_set, val_set=val_set, max_epochs=30, batch_size=64, lr=3e-3, width=32, seed=4)
    net, card = train_qmtnet(method, proto, **kw)
    const = _Constant(train_set)
    if method == "qmtnet":  # CRB-normalised error, one noise draw over the training SNR range
        got = evaluate(net, val_set, snr_max=None, seed=9)["normalised_crb_loss"]
        ref = evaluate(const, val_set, snr_max=None, seed=9)["normalised_crb_loss"]
        # seeded, so deterministic on one thread; measured 0.194 x on schedule C's 48-TR cut (2026-12-04),
        # 0.05-0.22 x over training seeds 4-8: the bound sits above that spread, so a change of CPU or BLAS
        # rounding cannot flip it, while a net that learns nothing reads ~1
        assert got < 0.3 * ref
    else:  # squared error of (m0s, log T1, log T2f) in units of the training SD (the MSE twin's loss)
        def param(d):
            return torch.where(net.is_log, d["theta"][:, OUT_INDEX].float().log(), d["theta"][:, OUT_INDEX].float())

        u_train, u_val = param(train_set), param(val_set)
        ref = float((((u_train.mean(0) - u_val) / u_train.std(0)) ** 2).mean())
        got_t2f = evaluate(net, val_set, snr_max=None, seed=9)["mean_abs_error_T2f"]
        ref_t2f = evaluate(const, val_set, snr_max=None, seed=9)["mean_abs_error_T2f"]
        # seeded, so deterministic; measured 0.974 x ref and T2f 0.968 x the constant's mean |error| on
        # the 48-TR cut of schedule C (2026-12-04; the previous seed 003-like train: 0.995 x and 0.945 x,
        # linear outputs 0.982 x; 0.95 x on the six-lobe schedule): m0s and T1 are weakly encoded by 48
        # strided pulses and this tiny net barely learns them. Over training seeds 4-8 (one thread) 0.91-0.974 x
        # and 0.935-0.985 x: the bounds sit above that spread (rounding on another CPU moves less than a seed)
        assert card["validation_loss"] < 0.99 * ref and got_t2f < 0.99 * ref_t2f
    net2, _ = train_qmtnet(method, proto, **kw)
    for a, b in zip(net.state_dict().values(), net2.state_dict().values()):
        assert torch.equal(a, b)


def test_init_from_starts_at_the_saved_net_and_records_it(tiny_sets, schedule_and_basis, tmp_path):
    """``init_from`` (``scripts/train_qmt_bundled.py --init-from``, ``bids_qmri-train --modality qmt
    --init-from``): training starts from the file's weights and output statistics (an epoch at a
    learning rate of 1e-12 leaves them equal to the file, where a fresh net of the same seed differs),
    the card records the file's sha256 and its training (the whole chain), and a net of the other
    loss or another width is refused in one line."""
    from bids_qmri.modalities.qmt.training import train_qmtnet
    from bids_qmri.models.registry import save_model, sha256_file

    train_set, val_set = tiny_sets
    proto = _Proto(schedule_and_basis[0])
    kw = dict(val_set=val_set, batch_size=64, width=32, seed=4)
    net, card = train_qmtnet("qmtnet", proto, train_set=train_set, max_epochs=3, lr=3e-3, **kw)
    card.pop("history")
    w = save_model(net, card, tmp_path, "start", origin="test")
    # another training set (other output statistics) and another seed: only the file can make them equal
    other = {k: v[: len(v) // 2] if torch.is_tensor(v) and v.ndim else v for k, v in train_set.items()}
    tiny = dict(train_set=other, max_epochs=1, lr=1e-12, **{**kw, "seed": 7})
    cont, card2 = train_qmtnet("qmtnet", proto, init_from=w, **tiny)
    fresh, _ = train_qmtnet("qmtnet", proto, **tiny)
    for name, a in net.state_dict().items():
        torch.testing.assert_close(cont.state_dict()[name], a, rtol=0, atol=1e-8, msg=name)
    assert not torch.allclose(fresh.out.weight, net.out.weight, atol=1e-3)
    assert not torch.allclose(fresh.out_mean, net.out_mean)  # the statistics of `other`, not the file's
    init = card2["training"]["init_from"]
    assert init["file"] == "start.safetensors" and init["sha256"] == sha256_file(w)
    assert init["previous_training"]["max_epochs"] == 3 and "init_from" not in init["previous_training"]
    card2.pop("history")
    w2 = save_model(cont, card2, tmp_path / "second", "more", origin="test")
    _, card3 = train_qmtnet("qmtnet", proto, init_from=w2, **tiny)
    assert card3["training"]["init_from"]["previous_training"]["init_from"]["sha256"] == sha256_file(w)
    with pytest.raises(ValueError, match="qmtnet network cannot initialise qmtnetmse"):
        train_qmtnet("qmtnetmse", proto, init_from=w, **tiny)
    with pytest.raises(ValueError, match="cannot initialise qmtnet"):
        train_qmtnet("qmtnet", proto, init_from=w, **{**tiny, "width": 64})


class _Constant(torch.nn.Module):
    def __init__(self, data):
        super().__init__()
        from bids_qmri.modalities.qmt.training import OUT_INDEX

        self.value = data["theta"][:, OUT_INDEX].float().mean(0)

    def forward(self, x):
        return self.value.expand(len(x), -1)


# ---- NLLS -------------------------------------------------------------------------------------


def test_nls_recovers_truth_and_matches_scipy(schedule_and_basis):
    """Noise-free, off-grid voxel (B1 from the 'map'): our batched LM from a network-like start
    (m0s, T1, T2f 10-15 % off, the rest at the training means) reaches the truth, and so does
    scipy's least_squares on the same residual from the same start, with the same cost."""
    from scipy.optimize import least_squares

    from bids_qmri.modalities.qmt import nls

    sched, basis = schedule_and_basis
    truth = torch.tensor([[0.21, 0.83, 0.061, 13.7e-6, 52.3, 9.0, 1.17]], dtype=D)
    m0 = torch.tensor([0.9j])
    y = simulate.fingerprints(truth, sched, basis, dtype=D) * m0[:, None]
    start = truth[:, :3] * torch.tensor([1.1, 0.85, 1.15], dtype=D)
    # 100 iterations: on the 48-TR cut of the seed 003-like schedule LM needs 41-100 from this start
    out = nls.fit_nls(y, sched, basis, b1=truth[:, 6], x_net=start, n_grid_starts=0, dtype=D, max_iter=100)
    assert bool(out["converged"][0])
    for i, k in enumerate(simulate.PARAMETERS):
        np.testing.assert_allclose(float(out[k][0]), float(truth[0, i]), rtol=1e-5, err_msg=k)
    np.testing.assert_allclose(complex(out["M0"][0]), 0.9j, atol=1e-6)

    # scipy: the same 8 unknowns (B1 fixed) in the same units, finite-difference Jacobian
    u = basis.numpy()
    scale = np.array([1, 1, 1, 1e6, 1, 1])

    def resid(p):
        th = np.concatenate([p[:6] / scale, [float(truth[0, 6])]])
        c = qmt.hybrid_state_signal(*[torch.tensor(v, dtype=D) for v in th], **sched).numpy() @ u
        r = (p[6] + 1j * p[7]) * c - y[0].numpy()
        return np.concatenate([r.real, r.imag])

    means = np.array([0.12, 1.6, 0.1, 12.0, 44.0, 0.0])
    p0 = np.concatenate([start[0].numpy(), means[3:]])

    th0 = torch.tensor(np.concatenate([p0 / scale, [float(truth[0, 6])]]))[None]
    m0_start, _ = nls._best_m0(simulate.fingerprints(th0, sched, basis, dtype=D), y)
    # the same box as ours (unbounded, scipy's trf left the physical range on schedule C's 48-TR cut)
    box = np.array([nls.BOUNDS[k] for k in simulate.PARAMETERS[:6]]) * scale[:, None]
    box[5] = [-1 / sched["tr"], 1 / sched["tr"]]
    sol = least_squares(resid, np.concatenate([p0, [m0_start.real.item(), m0_start.imag.item()]]),
                        bounds=(np.r_[box[:, 0], -np.inf, -np.inf], np.r_[box[:, 1], np.inf, np.inf]),
                        x_scale="jac", xtol=1e-12, ftol=1e-12, gtol=1e-12)
    np.testing.assert_allclose(sol.x[:6] / scale, truth[0, :6].numpy(), rtol=1e-4)
    assert float(out["cost"][0]) <= 0.5 * float(np.sum(sol.fun**2)) + 1e-20


def test_nls_takes_a_start_of_all_seven_parameters(schedule_and_basis):
    """``x_net`` with 7 columns is the whole start (the in-silico local-MLE study starts at the
    truth): noise-free data fitted from the truth stay there after one LM step, while the same
    m0s, T1, T2f with the nuisances at the training means are still far off after one step."""
    from bids_qmri.modalities.qmt import nls

    sched, basis = schedule_and_basis
    truth = torch.tensor([[0.17, 1.21, 0.073, 9.1e-6, 31.0, -40.0, 0.83]], dtype=D)
    y = simulate.fingerprints(truth, sched, basis, dtype=D) * torch.tensor([0.4 - 0.3j])[:, None]
    whole = nls.fit_nls(y, sched, basis, x_net=truth, n_grid_starts=0, dtype=D, max_iter=1)
    for i, k in enumerate(simulate.PARAMETERS):
        np.testing.assert_allclose(float(whole[k][0]), float(truth[0, i]), rtol=1e-6, err_msg=k)
    assert float(whole["cost"][0]) < 1e-20
    three = nls.fit_nls(y, sched, basis, x_net=truth[:, :3], n_grid_starts=0, dtype=D, max_iter=1)
    assert float(three["cost"][0]) > 1e6 * max(float(whole["cost"][0]), 1e-30)


def test_shipped_synthetic_basis_is_what_the_construction_gives(tmp_path, monkeypatch):
    """The shipped qMT basis (what keys the bundled nets on every machine) equals the basis built from
    scratch here (float32 physics: the last bits may differ between CPUs, hence the tolerance; a stale
    file for another schedule would differ at O(0.1)); another schedule does not get it."""
    from bids_qmri.physics import qmt
    from bids_qmri.synth import dataset

    schedule = qmt.default_qmt_schedule()
    shipped, _ = dataset.qmt_basis()
    assert shipped.shape == (len(schedule["flip_rad"]), dataset.QMT_RANK)
    assert torch.equal(shipped, dataset._shipped_qmt_basis(schedule, dataset.QMT_RANK))  # qmt_basis uses the file
    monkeypatch.setenv("BIDS_QMRI_SYNTH_CACHE", str(tmp_path))  # no earlier build from the disk cache
    fresh, _ = dataset.qmt_basis_for(schedule, dataset.QMT_RANK, shipped=False)  # ~15 CPU-s
    assert float((fresh - shipped).abs().max()) < 1e-4
    other = dict(schedule, flip_rad=schedule["flip_rad"] * 1.01)
    assert dataset._shipped_qmt_basis(other, dataset.QMT_RANK) is None
    assert dataset._shipped_qmt_basis(schedule, dataset.QMT_RANK - 1) is None


def test_bundled_models_are_found_for_the_synthetic_schedule():
    from bids_qmri.modalities.qmt.protocol import QMTProtocol
    from bids_qmri.models.registry import get_model
    from bids_qmri.synth.dataset import _degrees, qmt_basis

    basis, s = qmt_basis()
    meta = {"FlipAngle": _degrees(s["flip_rad"]), "RFPulseDuration": [round(float(t), 10) for t in s["pulse_dur"]],
            "RepetitionTimeExcitation": s["tr"], "InversionPulseDuration": s["inversion_dur"]}
    proto = QMTProtocol.from_dict(meta, basis=basis)
    for method, loss in (("qmtnet", "crb"), ("qmtnetmse", "mse")):
        net, card = get_model("qmt", method, proto, model_dir=None, trainer=None, allow_training=False)
        assert card["method"] == method and card["loss"] == loss and card["protocol_key"] == proto.key()
        assert net.n_layers == 14
        # on-the-fly training (estimate.NET_TRAINING) draws its training set as the bundled nets' was drawn
        from bids_qmri.modalities.qmt.estimate import NET_TRAINING

        widen = card["training_distributions"].get("widen", [{"factors": {}, "samples": 1}])
        assert [w["factors"] for w in widen] == [simulate.check_widen(NET_TRAINING.get("widen"))], method


def test_bias_variance_decomposition_identities():
    """Gaussian estimates with known bias b and SD s: bias, std/√CRB and the loss split (Eq. 4–5)."""
    from bids_qmri.modalities.qmt.insilico import decompose

    gen = torch.Generator().manual_seed(0)
    truth = torch.tensor([[0.1, 1.2, 0.08], [0.2, 0.8, 0.05]], dtype=D)
    crb = torch.tensor([[1e-4, 4e-2, 1e-4], [4e-4, 1e-2, 4e-5]], dtype=D)
    b = torch.tensor([[0.01, -0.1, 0.0], [0.0, 0.05, -0.005]], dtype=D)
    s = crb.sqrt() * torch.tensor([1.0, 1.5, 0.8], dtype=D)
    est = truth + b + s * torch.randn(20000, 2, 3, generator=gen, dtype=D)
    out = decompose(est, truth, crb)
    tol = 4 * s / math.sqrt(20000)
    assert ((out["bias"] - b).abs() < tol).all()
    np.testing.assert_allclose(out["std_over_sqrt_crb"].numpy(), (s / crb.sqrt()).numpy(), rtol=0.02)
    torch.testing.assert_close(out["loss_bias"] + out["loss_variance"], out["loss"])  # Eq. 5, exact


def test_grid_test_set_is_seed003_dataset2(schedule_and_basis):
    """Seed 003 test dataset #2: a regular 2-D slice, every other parameter at the training mean
    (B0 = 0); its fingerprints and CRBs are the direct signal and the finite-difference Fisher's."""
    from bids_qmri.modalities.qmt.insilico import GRID_SLICES, grid_theta

    means = {k: v[0] for k, v in simulate.DISTRIBUTIONS.items()} | {"B0": 0.0}
    for name, axes in GRID_SLICES.items():
        theta = grid_theta(name, 4)
        assert theta.shape == (16, 7)
        varied = [simulate.PARAMETERS.index(a[0]) for a in axes]
        for j, k in enumerate(simulate.PARAMETERS):
            if j not in varied:
                assert (theta[:, j] == means[k]).all(), k
        for j, (_, lo, hi) in zip(varied, axes):
            np.testing.assert_allclose(np.unique(theta[:, j].numpy()), np.linspace(lo, hi, 4))
        assert (theta[:, 2] <= theta[:, 1]).all()  # T2f <= T1
    sched, basis = schedule_and_basis
    theta = grid_theta("T1_T2f", 2)
    out = simulate.set_from_theta(theta, sched, basis, chunk=3, log=None)
    for k in (0, 3):
        want = qmt.hybrid_state_signal(*[float(v) for v in theta[k]], **sched).to(torch.complex128) @ basis
        np.testing.assert_allclose(out["coeffs"][k].numpy(), want.numpy(), rtol=0,
                                   atol=2e-5 * float(want.abs().max()))
        np.testing.assert_allclose(out["crb_unit"][k].numpy()[:3], _fd_crb(theta[k].numpy(), sched, basis)[:3],
                                   rtol=0.02)


def test_summarise_quartiles_and_lowest_crb_quarter():
    """``summarise``: median and quartiles of std/√CRB over all samples, and the median over the
    quarter of samples with the lowest CRB, against numpy on a constructed case."""
    from bids_qmri.modalities.qmt.insilico import summarise

    gen = torch.Generator().manual_seed(1)
    s = 40
    crb = torch.rand(s, 3, generator=gen, dtype=D) + 0.01
    ratio = torch.rand(s, 3, generator=gen, dtype=D)
    bias = torch.randn(s, 3, generator=gen, dtype=D)
    o = {"std_over_sqrt_crb": ratio, "bias": bias, "loss_bias": bias**2 / crb, "loss_variance": ratio**2}
    row = summarise(o, crb, prefix="x_")
    for i, k in enumerate(("m0s", "T1", "T2f")):
        r, c = ratio[:, i].numpy(), crb[:, i].numpy()
        low = np.argsort(c)[:10]  # the 10 lowest CRBs of 40
        assert row[f"x_median_std_over_sqrt_crb_lowcrb_{k}"] == float(torch.tensor(r[low]).median())
        assert row[f"x_median_std_over_sqrt_crb_{k}"] == float(torch.tensor(r).median())
        np.testing.assert_allclose(row[f"x_q25_std_over_sqrt_crb_{k}"], np.quantile(r, 0.25))
        np.testing.assert_allclose(row[f"x_q75_std_over_sqrt_crb_{k}"], np.quantile(r, 0.75))
        np.testing.assert_allclose(row[f"x_mean_abs_bias_{k}"], np.abs(bias[:, i].numpy()).mean())


def test_insilico_cli_writes_tables_and_figure(tmp_path, capsys):
    import pandas as pd

    from bids_qmri.cli.insilico import main

    assert main(["qmt", str(tmp_path / "ins"), "--test-samples", "3", "--noise", "8", "--snr", "50", "100",
                 "--grid", "2"]) == 0
    t = pd.read_csv(tmp_path / "ins" / "qmt_insilico.tsv", sep="\t")
    assert sorted(t.model) == ["qmtnet", "qmtnet", "qmtnetmse", "qmtnetmse"]
    np.testing.assert_allclose(t.loss, t.loss_bias + t.loss_variance, rtol=1e-5)
    np.testing.assert_allclose(t.loss, sum(t[f"loss_{p}_{k}"] for p in ("bias", "variance")
                                          for k in ("m0s", "T1", "T2f")) / 3, rtol=1e-5)
    g = pd.read_csv(tmp_path / "ins" / "qmt_insilico_grid.tsv", sep="\t")
    assert len(g) == 2 * 2 * 2 * 4  # models x SNRs x slices x 2x2 points
    t1t2 = g[(g.slice == "T1_T2f") & (g.model == "qmtnet") & (g.snr_max == 50)]
    np.testing.assert_allclose(sorted(t1t2.T2f), [0.02, 0.02, 0.2, 0.2])
    np.testing.assert_allclose(t.grid_T1_T2f_mean_abs_bias_T2f[(t.model == "qmtnet") & (t.snr_max == 50)],
                               t1t2.bias_T2f.abs().mean(), rtol=1e-5)
    with pytest.raises(SystemExit) as e:
        main(["qmt", str(tmp_path / "bad"), "--grid", "1"])
    assert e.value.code == 2 and "--grid" in capsys.readouterr().err.strip().splitlines()[-1]
    with pytest.raises(SystemExit) as e:
        main(["qmt", str(tmp_path / "bad"), "--test-samples", "0"])
    assert e.value.code == 2 and "--test-samples >= 1" in capsys.readouterr().err.strip().splitlines()[-1]
    # the prior-informed bound B <= CRB per sample, so every quartile of std/sqrt(B) is >= that of std/sqrt(CRB)
    for q in ("q25", "median", "q75"):
        for k in ("m0s", "T1", "T2f"):
            assert (t[f"{q}_std_over_sqrt_pib_{k}"] >= t[f"{q}_std_over_sqrt_crb_{k}"] * (1 - 1e-9)).all()
    curves = pd.read_csv(tmp_path / "ins" / "qmt_insilico_curves.tsv", sep="\t")
    assert set(curves.model) == {"qmtnet", "qmtnetmse"} and curves.epoch.max() > 1
    assert (tmp_path / "ins" / "qmt_insilico.png").stat().st_size > 10_000


def test_insilico_evaluates_any_named_nets(tmp_path):
    """``models=`` (candidate weights, e.g. a net trained on a wider prior) is measured under its own
    name on the same draws: a copy of the bundled qmtnet gives the bundled net's numbers exactly."""
    import pandas as pd

    from bids_qmri.models.registry import get_model
    from bids_qmri.modalities.qmt.insilico import run_qmt_insilico
    from bids_qmri.modalities.qmt.protocol import synthetic_protocol

    proto, _ = synthetic_protocol()
    net, card = get_model("qmt", "qmtnet", proto, model_dir=None, trainer=None, allow_training=False)
    models = {"qmtnet": (net, card), "candidate": (net, {})}
    run_qmt_insilico(tmp_path, n_test=3, n_noise=4, snrs=(50.0,), n_grid=0, models=models)
    t = pd.read_csv(tmp_path / "qmt_insilico.tsv", sep="\t").set_index("model")
    assert list(t.index) == ["qmtnet", "candidate"]
    pd.testing.assert_series_equal(t.loc["qmtnet"], t.loc["candidate"], check_names=False)
    assert (tmp_path / "qmt_insilico.png").is_file()


def test_training_set_is_cached_once(schedule_and_basis, tmp_path, monkeypatch):
    sched, basis = schedule_and_basis
    first = simulate.cached_set(tmp_path, 4, sched, basis, seed=1, log=None)
    monkeypatch.setattr(simulate, "simulate_set", lambda *a, **k: pytest.fail("recomputed a cached set"))
    again = simulate.cached_set(tmp_path, 4, sched, basis, seed=1, log=None)
    for k in ("theta", "coeffs", "crb_unit"):
        assert torch.equal(first[k], again[k])
    assert len(list(tmp_path.glob("qmt-trainset-*.pt"))) == 1


# ---- bids_qmri-train --modality qmt ----------------------------------------------------------


def _train_args(*extra, **shared):
    """``bids_qmri-train``'s namespace with the qMT options parsed and the shared ones set."""
    import argparse

    from bids_qmri.modalities.qmt.cli import add_train_arguments

    p = argparse.ArgumentParser(prog="bids_qmri-train")
    add_train_arguments(p)
    args = p.parse_args(list(extra))
    base = dict(method="qmtnet", sidecar=None, samples=None, epochs=None, patience=None, batch_size=None, lr=None,
                lr_schedule=None, init_from=None, seed=0, threads=1)
    args.__dict__.update({**base, **shared})
    return p, args


def test_train_cli_writes_loadable_weights_and_card(tmp_path):
    """The qMT hook of bids_qmri-train on the synthetic schedule, from simulation and from saved
    set parts: the weights load with their card and give 3 finite outputs per voxel."""
    from bids_qmri.modalities.qmt.cli import train_from_args
    from bids_qmri.modalities.qmt.protocol import synthetic_protocol
    from bids_qmri.modalities.qmt.net import features
    from bids_qmri.models.registry import load_model, model_stem, save_model

    parser, args = _train_args("--qmt-val-samples", "8", samples=24, epochs=1, batch_size=16)
    protocol, net, card = train_from_args(args, parser)
    want, basis = synthetic_protocol()
    assert protocol.key() == want.key() and card["method"] == "qmtnet" and card["loss"] == "crb"
    assert card["training"]["n_train"] == 24 and card["training"]["epochs_run"] == 1
    weights = save_model(net, card, tmp_path, model_stem("qmtnet", protocol), origin="test")
    back, back_card = load_model(weights)
    assert back_card["protocol_key"] == protocol.key() and back_card["cpu_s"]["training"] >= 0
    y = simulate.fingerprints(simulate.sample_parameters(4, 3.5e-3, torch.Generator().manual_seed(0)),
                              protocol.schedule(), basis)
    with torch.no_grad():
        out = back(features(y))
    assert out.shape == (4, 3) and torch.isfinite(out).all()
    # precomputed parts (scripts/simulate_qmt_set.py): concatenated, the last samples held out
    for k in range(2):
        torch.save(simulate.simulate_set(10, protocol.schedule(), basis, seed=k, log=None), tmp_path / f"p{k}.pt")
    parser, args = _train_args("--qmt-train-set", str(tmp_path / "p0.pt"), str(tmp_path / "p1.pt"),
                               "--qmt-val-samples", "5", method="qmtnetmse", epochs=1)
    _, _, card = train_from_args(args, parser)
    assert card["loss"] == "mse" and (card["training"]["n_train"], card["training"]["n_val"]) == (15, 5)


def test_train_cli_bad_input_is_one_line(tmp_path, capsys):
    from bids_qmri.modalities.qmt.cli import train_from_args

    bad = tmp_path / "qmt.json"
    bad.write_text('{"FlipAngle": [10, 20], "RFPulseDuration": [0.001], "RepetitionTimeExcitation": 0.0035}')
    (tmp_path / "junk.pt").write_text("not a tensor file")
    for extra, shared, text in (((), {"sidecar": bad}, "FlipAngle has 2 values"),
                                (("--qmt-basis", str(tmp_path / "b.tsv")), {}, "--qmt-basis needs --sidecar"),
                                (("--qmt-train-set", str(tmp_path / "junk.pt")), {}, "not a qMT training-set file"),
                                ((), {"samples": 16, "init_from": tmp_path / "none.safetensors"},
                                 "model card cannot be read"),
                                (("--qmt-widen", "B1=0.5"), {"samples": 16}, "--qmt-widen B1=0.5: give factors in"),
                                (("--qmt-widen", "m0s=2", "--qmt-train-set", str(tmp_path / "junk.pt")), {},
                                 "--qmt-widen applies to a simulated set")):
        parser, args = _train_args(*extra, **shared)
        with pytest.raises(SystemExit) as exc:
            train_from_args(args, parser)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert text in err and err.count("\n") == 1


def test_train_command_for_qmt(tmp_path):
    """``bids_qmri-train --modality qmt --method qmtnet`` end to end (needs the qMT methods'
    declarations, which make the method names known to the command)."""
    from bids_qmri import modalities as registry
    from bids_qmri.cli.train import main
    from bids_qmri.models.registry import load_model

    if not any(m.name == "qmtnet" and m.train for m in registry.get("qmt").methods):
        pytest.skip("the qMT Method declarations (qmtnet with train=) are not in this tree")
    rc = main(["--modality", "qmt", "--method", "qmtnet", "--samples", "16", "--qmt-val-samples", "8", "--epochs", "1",
               "--out-dir", str(tmp_path)])
    assert rc == 0
    (weights,) = tmp_path.glob("qmtnet_*.safetensors")
    _, card = load_model(weights)
    assert card["method"] == "qmtnet" and card["training"]["epochs_run"] == 1
