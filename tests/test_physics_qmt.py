"""qMT two-pool model: matrix exponentials vs scipy ODE integration, lineshape vs frequency domain."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad, solve_ivp

from bids_qmri.physics import crb, qmt

D = torch.float64


def short_schedule(n=40):
    s = qmt.default_qmt_schedule()
    idx = torch.linspace(0, s["flip_rad"].numel() - 1, n).round().long()
    return dict(flip_rad=s["flip_rad"][idx], pulse_dur=s["pulse_dur"][idx], tr=s["tr"], inversion_dur=s["inversion_dur"])


# ---- lineshape: time-domain quadrature vs the frequency-domain definition -------------------


def lineshape_G(omega, t2s, kind):
    """Henkelman lineshapes G(ω) (normalised ∫ G dω = 1), written in the frequency domain."""
    if kind == "lorentzian":
        return t2s / math.pi / (1 + (omega * t2s) ** 2)
    if kind == "gaussian":
        return t2s / math.sqrt(2 * math.pi) * math.exp(-0.5 * (omega * t2s) ** 2)
    u0 = 1 / math.sqrt(3)
    f = lambda u: math.sqrt(2 / math.pi) * t2s / abs(3 * u * u - 1) * math.exp(-2 * (omega * t2s / (3 * u * u - 1)) ** 2)  # noqa: E731
    return quad(f, 0, u0, limit=200)[0] + quad(f, u0, 1, limit=200)[0]


def rrf_frequency_domain(omega1, tau, t2s, b0, kind):
    """ω1² (τ/2) ∫ G(ω) sinc²((ω + Δω)τ/2) dω: the lineshape weighted by the pulse power spectrum."""
    dw = 2 * math.pi * b0

    def integrand(w):
        x = (w + dw) * tau / 2
        sinc2 = 1.0 if x == 0 else (math.sin(x) / x) ** 2
        return lineshape_G(w, t2s, kind) * sinc2

    # split where the integrand changes scale: the pulse spectrum (~1/τ) and the line (~1/T2s)
    edges = sorted({-50 / t2s, -10 / t2s, -200 / tau - dw, -dw, 0.0, 200 / tau - dw, 10 / t2s, 50 / t2s})
    total = sum(quad(integrand, a, b, limit=500, epsrel=1e-10)[0] for a, b in zip(edges[:-1], edges[1:]))
    return omega1**2 * tau / 2 * total


@pytest.mark.parametrize("kind", qmt.LINESHAPES)
@pytest.mark.parametrize("tau,t2s,b0", [(0.3e-3, 12e-6, 0.0), (1.0e-3, 8e-6, 150.0), (0.1e-3, 20e-6, -60.0)])
def test_saturation_rate_equals_frequency_domain_integral(kind, tau, t2s, b0):
    omega1 = 2000.0
    ref = rrf_frequency_domain(omega1, tau, t2s, b0, kind)
    got = qmt.saturation_rate(torch.tensor(omega1, dtype=D), torch.tensor(tau, dtype=D),
                              torch.tensor(t2s, dtype=D), torch.tensor(b0, dtype=D), kind).item()
    assert got == pytest.approx(ref, rel=3.3e-5)  # measured ≤ 2.16e-5 over the nine cases


def test_long_pulse_limit_is_henkelman_rate():
    # τ ≫ T2s: Rrf → π ω1² G(Δω) (Lorentzian, analytic), relative error O(T2s/τ)
    omega1, t2s, b0 = 1000.0, 10e-6, 2000.0
    got = qmt.saturation_rate(torch.tensor(omega1, dtype=D), torch.tensor(1.0, dtype=D),
                              torch.tensor(t2s, dtype=D), torch.tensor(b0, dtype=D), "lorentzian").item()
    # measured 9.2e-6 (T2s/τ = 1e-5); bound 1.5×
    assert got == pytest.approx(math.pi * omega1**2 * lineshape_G(2 * math.pi * b0, t2s, "lorentzian"), rel=1.4e-5)


def test_superlorentzian_fid_table():
    # g(0) = 1, magic-angle tail √(2π/3)/x, and a direct quadrature at x = 7
    x = torch.tensor([1e-4, 7.0, 3e5, 1e7], dtype=D)
    g = qmt._superlorentzian_fid(x)
    direct = quad(lambda u: math.exp(-((3 * u * u - 1) ** 2) * 49 / 8), 0, 1, points=[1 / math.sqrt(3)], epsrel=1e-12)[0]
    # measured: |g(1e-4) − 1| 1.0e-9 (the small-x series), g(7) 2.0e-11 relative, tail 6.5e-11
    assert g[0].item() == pytest.approx(1.0, abs=1.5e-9)
    assert g[1].item() == pytest.approx(direct, rel=3e-11)
    assert (g[2:] * x[2:]).numpy() == pytest.approx([math.sqrt(2 * math.pi / 3)] * 2, rel=1e-10)


# ---- propagation: matrix exponential vs explicit ODE integration ----------------------------


def test_pulse_exponential_equals_scipy_expm_for_all_degrees_and_squarings():
    """Our elementwise Taylor exponential vs scipy.linalg.expm (Padé) on pulse generators whose
    norms span every Taylor degree and 0-4 squarings (B1·flip up to 4π, strong saturation)."""
    from scipy.linalg import expm

    rng = np.random.default_rng(1)
    n = 200
    r = lambda lo, hi: torch.from_numpy(rng.uniform(lo, hi, n))  # noqa: E731
    tau = torch.from_numpy(np.exp(rng.uniform(np.log(1e-5), np.log(2e-3), n)))
    omega1 = r(0.0, 4 * math.pi) * torch.logspace(-3, 0, n, dtype=D) / tau
    m0s = r(0.0, 0.3)
    rx = r(1.0, 100.0)
    gen = qmt._pulse_generator(omega1, r(0.0, 2000.0), 1 / r(0.2, 4.0), 1 / r(0.01, 2.0), 2 * math.pi * r(-300, 300),
                               rx * m0s, rx * (1 - m0s), 1 - m0s, m0s) * tau
    norms = gen.abs().sum(1).amax(0)
    assert norms.min() < 0.01 and norms.max() > 8  # lowest degree to several squarings
    # measured max |ours − expm|: 2.1e-14 (float64), 8.1e-7 (float32); bounds 1.5×
    for dtype, atol in ((torch.float64, 3.2e-14), (torch.float32, 1.2e-6)):
        # one call per norm decade, as hybrid_state_signal chunks the train
        ours = torch.cat([qmt._expm_affine(gen[..., i:i + 20].to(dtype)) for i in range(0, n, 20)], -1).double()
        for k in range(n):
            ref = expm(np.vstack([gen[..., k].numpy(), np.zeros(5)]))[:4]
            np.testing.assert_allclose(ours[..., k].numpy(), ref, rtol=0, atol=atol)


def bloch_mcconnell_ode(p, sched, x0, lineshape):
    """Integrate one cycle of the same train with solve_ivp; RHS from the cross product."""
    m0s, t1, t2f, t2s, rx, b0, b1 = p
    m0f = 1 - m0s
    dw = 2 * math.pi * b0

    def rhs_factory(wx, rrf):
        def rhs(_, y):
            m = y[:3]
            dm = np.cross(m, [wx, 0.0, dw])  # γ M × B, γB = (ω1, 0, Δω)
            dm = dm + np.array([-m[0] / t2f, -m[1] / t2f, (m0f - m[2]) / t1 - rx * m0s * m[2] + rx * m0f * y[3]])
            dzs = (m0s - y[3]) / t1 - rrf * y[3] + rx * m0s * m[2] - rx * m0f * y[3]
            return np.append(dm, dzs)
        return rhs

    def run(y, duration, wx=0.0, rrf=0.0):
        sol = solve_ivp(rhs_factory(wx, rrf), (0, duration), y, method="DOP853", rtol=1e-12, atol=1e-14)
        return sol.y[:, -1]

    def rate(w1, tau):
        return qmt.saturation_rate(torch.tensor(w1, dtype=D), torch.tensor(tau, dtype=D),
                                   torch.tensor(t2s, dtype=D), torch.tensor(b0, dtype=D), lineshape).item()

    y = np.array(x0, dtype=float)
    tau_inv = sched["inversion_dur"]
    w1 = b1 * math.pi / tau_inv
    y = run(y, tau_inv, w1, rate(w1, tau_inv))
    echoes = []
    for n, (a, tau) in enumerate(zip(sched["flip_rad"].tolist(), sched["pulse_dur"].tolist())):
        sign = (-1) ** n
        w1 = sign * b1 * a / tau
        y = run(y, tau, w1, rate(w1, tau))
        y = run(y, (sched["tr"] - tau) / 2)
        echoes.append(sign * (y[0] + 1j * y[1]))
        y = run(y, (sched["tr"] - tau) / 2)
    return np.array(echoes), y


@pytest.mark.parametrize("lineshape", ["superlorentzian", "gaussian"])
@pytest.mark.parametrize("p", [(0.15, 1.1, 0.07, 12e-6, 30.0, 25.0, 0.9), (0.05, 1.9, 0.15, 9e-6, 60.0, -80.0, 1.1)])
def test_matrix_exponential_equals_ode_and_state_is_fixed_point(p, lineshape):
    sched = short_schedule(40)
    sig, x = qmt.hybrid_state_signal(*[torch.tensor(v, dtype=D) for v in p], lineshape=lineshape, return_state=True, **sched)
    ode_sig, ode_end = bloch_mcconnell_ode(p, sched, x.numpy(), lineshape)
    # measured ≤ 4.5e-14 (echoes) and ≤ 4.1e-14 (end state) over the four cases on schedule C's cut
    # (previous train: 4.1e-14, 4.2e-14): DOP853 at
    # rtol 1e-12 / atol 1e-14 and round-off; the bound leaves room for other CPUs
    np.testing.assert_allclose(sig.numpy(), ode_sig, atol=1e-13)
    np.testing.assert_allclose(ode_end, x.numpy(), atol=1e-13)  # one more cycle returns to x*
    # the steady state is not trivial: it differs from thermal equilibrium (measured 0.79-0.92)
    assert np.abs(x.numpy() - np.array([0, 0, 1 - p[0], p[0]])).max() > 0.5


def test_single_pool_long_constant_train_reaches_bssfp_steady_state():
    """m0s = 0, very short pulses, constant flip: the end of a 7-s train is analytic bSSFP."""
    n, alpha, tr, t1, t2 = 2000, math.radians(30), 3.5e-3, 1.0, 0.08
    sig = qmt.hybrid_state_signal(
        0.0, t1, t2, 10e-6, 0.0, 0.0, 1.0, flip_rad=torch.full((n,), alpha), pulse_dur=torch.full((n,), 1e-7),
        tr=tr, inversion_dur=1e-7,
    )
    e1, e2 = math.exp(-tr / t1), math.exp(-tr / t2)
    mss = math.sin(alpha) * (1 - e1) / (1 - (e1 - e2) * math.cos(alpha) - e1 * e2) * math.exp(-tr / 2 / t2)
    assert abs(sig[-1]).item() == pytest.approx(mss, rel=1.2e-5)  # measured 7.8e-6


def test_float32_batch_and_default_schedule():
    s = qmt.default_qmt_schedule()
    assert s["flip_rad"].numel() == 1142 and s["tr"] == 3.5e-3
    assert (s["pulse_dur"] < s["tr"]).all()
    assert (s["flip_rad"] / s["pulse_dur"]).max() < 267.5e6 * 25e-6  # RF amplitude < 25 µT
    m0s = torch.tensor([[0.0], [0.1], [0.2]])
    b0 = torch.tensor([0.0, 40.0])
    s32 = qmt.hybrid_state_signal(m0s, 1.2, 0.08, 12e-6, 30.0, b0, 1.0, **s)
    assert s32.shape == (3, 2, 1142) and s32.dtype == torch.complex64
    s64 = qmt.hybrid_state_signal(m0s.double(), 1.2, 0.08, 12e-6, 30.0, b0.double(), 1.0, **s)
    np.testing.assert_allclose(s32.numpy(), s64.numpy(), atol=5.1e-6)  # measured 3.1e-6 (schedule C; previous train 3.4e-6)
    # more semi-solid pool, more saturation transfer: lower free-pool signal energy
    energy = s64.abs().pow(2).sum(-1)[:, 0]
    assert energy[0] > energy[1] > energy[2]


def test_default_schedule_bounds_and_encoding():
    """Seed 003-like train: 100-500 µs pulses, ω1 ≤ 2π·1 kHz, a 500-µs inversion, and T1, m0s and
    T2f identifiable with all 8 parameters free (the previous six-lobe train had full-signal
    √CRB/θ of 0.5 (T1) and 0.5 (m0s) at this WM point)."""
    from bids_qmri.modalities.qmt import simulate

    s = qmt.default_qmt_schedule()
    assert s["inversion_dur"] == 0.5e-3 and torch.unique(s["pulse_dur"]).numel() <= 41  # 10-µs raster
    assert float(s["pulse_dur"].min()) >= 100e-6 - 1e-12 and float(s["pulse_dur"].max()) <= 500e-6 + 1e-12
    assert float((s["flip_rad"] / s["pulse_dur"]).max()) <= 2e3 * math.pi * (1 + 1e-9)
    theta = torch.tensor([0.16, 0.78, 0.08, 12e-6, 30.0, 0.0, 1.0], dtype=D)
    sig, jac = qmt.hybrid_state_jacobian(*theta, **s)
    rel = (simulate.crb_from_jacobian(sig[None], jac[None])[0] / 50.0**2).sqrt() / theta
    assert float(rel[0]) < 0.2 and float(rel[1]) < 0.06 and float(rel[2]) < 0.035  # measured 0.113, 0.043, 0.031 (schedule C; previous train 0.175, 0.048, 0.028)


def test_gradients_for_all_parameters_and_crb():
    sched = short_schedule(8)
    # T2s enters in µs so that gradcheck's finite-difference step (1e-6) is small relative to it
    params = [torch.tensor([v], dtype=D, requires_grad=True) for v in (0.12, 1.3, 0.09, 11.0, 35.0, 20.0, 0.95)]

    def f(m0s, t1, t2f, t2s_us, rx, b0, b1):
        return torch.view_as_real(qmt.hybrid_state_signal(m0s, t1, t2f, t2s_us * 1e-6, rx, b0, b1, **sched))

    assert torch.autograd.gradcheck(f, params)
    # CRB through torch.func (vmap + jacfwd through matrix_exp) is finite and positive
    theta = torch.tensor([[0.12, 1.3, 0.09, 35.0], [0.2, 0.9, 0.06, 20.0]], dtype=D)
    sched60 = short_schedule(60)
    model = lambda th: qmt.hybrid_state_signal(th[..., 0], th[..., 1], th[..., 2], 11e-6, th[..., 3], 0.0, 1.0, **sched60)  # noqa: E731
    bound = crb.crb(model, theta, 0.01)
    assert bound.shape == (2, 4) and torch.isfinite(bound).all() and (bound > 0).all()
    # every batch element, both AD directions and the vmap-free path agree
    torch.testing.assert_close(crb.crb(model, theta, 0.01, mode="reverse"), bound, rtol=1e-7, atol=0)
    torch.testing.assert_close(crb.crb(model, theta, 0.01, mode="jvp"), bound, rtol=1e-7, atol=0)


@pytest.mark.parametrize("lineshape", ["superlorentzian", "gaussian"])
def test_forward_mode_jacobian_equals_autodiff_and_central_differences(lineshape):
    """``hybrid_state_jacobian`` (tangents written out through the recursion) against torch.func
    forward-mode AD of ``hybrid_state_signal`` and against float64 central differences, at random
    off-grid parameters of all 7 physical parameters (two pulse-norm regimes: some pulses need
    squarings, some do not)."""
    sched = short_schedule(40)
    rng = np.random.default_rng(11)
    n = 6
    theta = torch.from_numpy(np.stack([rng.uniform(0.02, 0.3, n), rng.uniform(0.4, 2.5, n), rng.uniform(0.03, 0.2, n),
                                       rng.uniform(7e-6, 16e-6, n), rng.uniform(5.0, 90.0, n),
                                       rng.uniform(-200.0, 200.0, n), rng.uniform(0.6, 1.4, n)], 1))
    sig, jac = qmt.hybrid_state_jacobian(*theta.unbind(-1), lineshape=lineshape, **sched)
    assert jac.shape == (n, 40, 7) and jac.dtype == torch.complex128
    fn = lambda th: qmt.hybrid_state_signal(*th.unbind(-1), lineshape=lineshape, **sched)  # noqa: E731
    np.testing.assert_array_equal(sig.numpy(), fn(theta).numpy())  # the same pass
    ad = crb.jacobian(fn, theta, mode="jvp")
    scale = ad.abs().amax(1, keepdim=True)  # per sample and parameter
    # measured ≤ 6.5e-14 relative to each column's largest entry (schedule C's cut; previous train 1.4e-14)
    assert ((jac - ad).abs() / scale).max() < 1e-12
    steps = torch.tensor([1e-5, 1e-5, 1e-6, 1e-10, 1e-4, 1e-3, 1e-6], dtype=D)
    for k in range(7):
        up, down = theta.clone(), theta.clone()
        up[:, k] += steps[k]
        down[:, k] -= steps[k]
        fd = (fn(up) - fn(down)) / (2 * steps[k])
        # measured ≤ 7.7e-7 on schedule C's cut, 2e-7 on the previous train (truncation O(h²) and
        # round-off O(ε/h) of the differences)
        assert ((jac[..., k] - fd).abs() / scale[..., k]).max() < 2e-6, qmt.JACOBIAN_PARAMETERS[k]


def test_forward_mode_jacobian_float32_and_broadcasting():
    sched = short_schedule(24)
    m0s = torch.tensor([[0.05], [0.2]])
    b0 = torch.tensor([0.0, 60.0])
    s32, j32 = qmt.hybrid_state_jacobian(m0s, 1.1, 0.08, 11e-6, 40.0, b0, 0.95, **sched)
    s64, j64 = qmt.hybrid_state_jacobian(m0s.double(), 1.1, 0.08, 11e-6, 40.0, b0.double(), 0.95, **sched)
    assert j32.shape == (2, 2, 24, 7) and j32.dtype == torch.complex64
    np.testing.assert_allclose(s32.numpy(), s64.numpy(), atol=5e-6)
    rel = (j32.to(torch.complex128) - j64).abs() / j64.abs().amax(-2, keepdim=True)
    assert rel.max() < 1e-3  # float32 round-off through the recursion (measured 4.5e-5 on schedule C's cut)
