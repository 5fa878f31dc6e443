"""Batched Levenberg–Marquardt / damped Newton (bids_qmri.fitting.lm) against scipy, row by row.

The test problem is deliberately not a relaxometry model (the solver is generic): a Gaussian peak
on a linear baseline, ``a·exp(−(t − μ)²/(2w²)) + c``, 4 parameters drawn off any grid.
"""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import least_squares, minimize

from bids_qmri.fitting.lm import LMResult, damped_newton, levenberg_marquardt

T = torch.linspace(-3.0, 3.0, 25, dtype=torch.float64)


def peak(x: torch.Tensor) -> torch.Tensor:
    a, mu, w, c = (x[:, i : i + 1] for i in range(4))
    return a * torch.exp(-((T - mu) ** 2) / (2 * w * w)) + c


def peak_jacobian(x: torch.Tensor) -> torch.Tensor:
    a, mu, w, c = (x[:, i : i + 1] for i in range(4))
    e = torch.exp(-((T - mu) ** 2) / (2 * w * w))
    return torch.stack([e, a * e * (T - mu) / w**2, a * e * (T - mu) ** 2 / w**3, torch.ones_like(e)], dim=-1)


def np_peak(p, t):
    return p[0] * np.exp(-((t - p[1]) ** 2) / (2 * p[2] ** 2)) + p[3]


def np_peak_jac(p, t):
    e = np.exp(-((t - p[1]) ** 2) / (2 * p[2] ** 2))
    return np.stack([e, p[0] * e * (t - p[1]) / p[2] ** 2, p[0] * e * (t - p[1]) ** 2 / p[2] ** 3, np.ones_like(e)], -1)


def problems(n: int, seed: int, noise: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)  # noqa: E731
    truth = torch.stack([u(0.5, 2.0), u(-1.0, 1.0), u(0.4, 1.2), u(-0.3, 0.3)], dim=-1)
    y = peak(truth) + noise * torch.randn(n, T.numel(), generator=g, dtype=torch.float64)
    # Starts: a rough moment estimate, as a user would write (not the truth).
    base = y[:, [0, -1]].mean(-1)
    a0 = y.amax(-1) - base
    mu0 = T[y.argmax(-1)]
    x0 = torch.stack([a0, mu0, torch.full_like(a0, 0.8), base], dim=-1)
    return truth, y, x0


def scipy_rows(y: torch.Tensor, x0: torch.Tensor, **bounds) -> np.ndarray:
    t = T.numpy()
    out = []
    for yi, xi in zip(y.numpy(), x0.numpy()):
        r = least_squares(lambda p: np_peak(p, t) - yi, xi, jac=lambda p: np_peak_jac(p, t),
                          xtol=1e-15, ftol=1e-15, gtol=1e-15, **bounds)
        out.append(r.x)
    return np.array(out)


def test_matches_scipy_least_squares_row_by_row():
    _, y, x0 = problems(60, seed=1)
    res = levenberg_marquardt(lambda x: peak(x) - y, x0, jacobian=peak_jacobian, ftol=1e-14, xtol=1e-14)
    assert isinstance(res, LMResult)
    assert res.x.shape == (60, 4) and res.cost.shape == (60,) and res.iterations.dtype == torch.int64
    assert bool(res.converged.all())
    ref = scipy_rows(y, x0, method="lm")
    np.testing.assert_allclose(res.x.numpy(), ref, rtol=1e-7, atol=1e-9)
    ref_cost = 0.5 * ((peak(torch.from_numpy(ref)) - y) ** 2).sum(-1)
    np.testing.assert_allclose(res.cost.numpy(), ref_cost.numpy(), rtol=1e-10)


def test_autograd_and_normal_equations_paths_agree_and_recover_noise_free_truth():
    truth, _, x0 = problems(40, seed=2)
    y = peak(truth)  # noise-free: the truth is the unique zero-cost solution
    analytic = levenberg_marquardt(lambda x: peak(x) - y, x0, jacobian=peak_jacobian)
    auto = levenberg_marquardt(lambda x: peak(x) - y, x0)  # jacfwd

    def normal_equations(x, r, rows):
        j = peak_jacobian(x)
        return j.mT @ j, (j.mT @ r[..., None])[..., 0]

    ne = levenberg_marquardt(lambda x, rows: peak(x) - y[rows], x0, normal_equations=normal_equations, rows=True)
    for res in (analytic, auto, ne):
        assert bool(res.converged.all())
        np.testing.assert_allclose(res.x.numpy(), truth.numpy(), rtol=1e-8, atol=1e-10)
    np.testing.assert_array_equal(analytic.iterations.numpy(), ne.iterations.numpy())


def test_bounds_are_respected_and_match_scipy_trf():
    truth, y, x0 = problems(40, seed=3)
    # Baseline c ≥ 0.1 and width ≤ 0.9: binding for many rows (true c ∈ [−0.3, 0.3], w ∈ [0.4, 1.2]).
    lower = torch.tensor([0.0, -5.0, 0.1, 0.1], dtype=torch.float64)
    upper = torch.tensor([10.0, 5.0, 0.9, 10.0], dtype=torch.float64)
    x0c = torch.minimum(torch.maximum(x0, lower + 1e-3), upper - 1e-3)
    res = levenberg_marquardt(lambda x: peak(x) - y, x0c, jacobian=peak_jacobian, lower=lower, upper=upper,
                              ftol=1e-15, xtol=1e-15, max_iter=300)
    assert bool(((res.x >= lower) & (res.x <= upper)).all())
    on_bound = ((res.x == lower) | (res.x == upper)).any(-1)
    assert on_bound.sum() >= 10, "the bounds must actually bind for the test to mean anything"
    assert bool(res.converged.all())
    ref = scipy_rows(y, x0c, method="trf", bounds=(lower.numpy(), upper.numpy()))
    np.testing.assert_allclose(res.x.numpy(), ref, rtol=1e-6, atol=1e-7)


def test_non_finite_rows_are_isolated():
    truth, y, x0 = problems(30, seed=4)
    clean = levenberg_marquardt(lambda x: peak(x) - y, x0, jacobian=peak_jacobian)
    y_bad, x0_bad = y.clone(), x0.clone()
    y_bad[3, 5] = math.nan  # NaN data
    x0_bad[7, 2] = math.inf  # non-finite start
    y_bad[11] = 1e308  # residual overflows to inf in the cost
    res = levenberg_marquardt(lambda x: peak(x) - y_bad, x0_bad, jacobian=peak_jacobian)
    bad = torch.zeros(30, dtype=torch.bool)
    bad[[3, 7, 11]] = True
    assert not bool(res.converged[bad].any())
    assert bool(res.converged[~bad].all())
    # The other rows are bit-for-bit what they are without the bad rows.
    assert torch.equal(res.x[~bad], clean.x[~bad])
    assert torch.equal(res.iterations[~bad], clean.iterations[~bad])


def test_each_row_has_its_own_damping():
    _, y, x0 = problems(20, seed=5)
    alone = levenberg_marquardt(lambda x: peak(x) - y, x0, jacobian=peak_jacobian)
    # One row with a terrible start (needs many rejected/accepted steps).
    x0_hard = x0.clone()
    x0_hard[0] = torch.tensor([0.01, 2.9, 3.0, 1.0], dtype=torch.float64)
    res = levenberg_marquardt(lambda x: peak(x) - y, x0_hard, jacobian=peak_jacobian)
    assert res.iterations[0] > alone.iterations[1:].max()
    assert torch.equal(res.iterations[1:], alone.iterations[1:])
    assert torch.equal(res.x[1:], alone.x[1:])


def test_max_iter_flags_not_converged():
    _, y, x0 = problems(10, seed=6)
    res = levenberg_marquardt(lambda x: peak(x) - y, x0, jacobian=peak_jacobian, max_iter=1)
    assert not bool(res.converged.any())
    assert bool((res.iterations == 1).all())


def test_float32_stays_float32():
    truth, _, x0 = problems(16, seed=7)
    y = peak(truth).float()
    res = levenberg_marquardt(lambda x: peak(x.double()).float() - y, x0.float(),
                              jacobian=lambda x: peak_jacobian(x.double()).float())
    assert res.x.dtype == torch.float32 and res.cost.dtype == torch.float32
    assert res.x.device == x0.device
    assert bool(res.converged.all())
    np.testing.assert_allclose(res.x.numpy(), truth.numpy(), rtol=2e-3, atol=2e-4)


def test_damped_newton_on_a_non_least_squares_objective_matches_scipy():
    # Cauchy (Lorentzian) negative log-likelihood: not a sum of squares, Hessian indefinite away
    # from the optimum — the damping must cope.
    truth, y, x0 = problems(25, seed=8, noise=0.1)

    def objective(x):
        return torch.log1p(((peak(x) - y) / 0.1) ** 2).sum(-1)

    res = damped_newton(objective, x0, ftol=1e-15, xtol=1e-13, max_iter=200)
    assert bool(res.converged.all())
    t = T.numpy()
    for i in range(25):
        f = lambda p: np.log1p(((np_peak(p, t) - y[i].numpy()) / 0.1) ** 2).sum()  # noqa: E731
        ref = minimize(f, res.x[i].numpy() + 1e-3, method="BFGS", options={"gtol": 1e-10})
        assert f(res.x[i].numpy()) <= ref.fun + 1e-9
        np.testing.assert_allclose(res.x[i].numpy(), ref.x, rtol=1e-4, atol=1e-5)


def test_damped_newton_equals_lm_on_least_squares():
    _, y, x0 = problems(20, seed=9)
    lm = levenberg_marquardt(lambda x: peak(x) - y, x0, jacobian=peak_jacobian, ftol=1e-14, xtol=1e-14)
    newton = damped_newton(lambda x: 0.5 * ((peak(x) - y) ** 2).sum(-1), x0, ftol=1e-14, xtol=1e-14)
    assert bool(newton.converged.all())
    np.testing.assert_allclose(newton.x.numpy(), lm.x.numpy(), rtol=1e-7, atol=1e-9)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        levenberg_marquardt(lambda x: x, torch.zeros(3))
    with pytest.raises(ValueError):
        levenberg_marquardt(lambda x: x, torch.zeros(3, 1), jacobian=lambda x: x, normal_equations=lambda x, r, i: x)
