"""CRB by autodiff against finite differences, analytic Jacobians and a Monte Carlo NLLS fit."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import least_squares

from bids_qmri.physics import crb, relaxation

TE = torch.tensor([0.01, 0.02, 0.04, 0.08, 0.16, 0.32], dtype=torch.float64)  # seed 004 T2 prep
TI = torch.linspace(0.14, 0.94, 31, dtype=torch.float64)  # seed 004, 31 TIs


def t2_model(theta):
    return relaxation.t2_decay(theta[..., 0], theta[..., 1], TE)


def ir_model(theta):
    return relaxation.inversion_recovery(theta[..., 0], theta[..., 1], theta[..., 2], TI)


def test_t2_jacobian_and_fisher_analytic():
    theta = torch.tensor([[1.0, 0.08], [0.6, 0.05]], dtype=torch.float64)
    sigma = 0.02
    f = crb.fisher_information(t2_model, theta, sigma)
    a, t2 = theta[:, 0:1], theta[:, 1:2]
    e = torch.exp(-TE / t2)
    j = torch.stack([e, a * TE / t2**2 * e], dim=-1)  # ∂S/∂A, ∂S/∂T2 by hand
    torch.testing.assert_close(f, j.mT @ j / sigma**2)
    torch.testing.assert_close(crb.crb(t2_model, theta, sigma), torch.linalg.inv(j.mT @ j / sigma**2).diagonal(dim1=-2, dim2=-1))


@pytest.mark.parametrize("mode", ["forward", "reverse", "jvp"])
def test_ir_fisher_equals_finite_differences(mode):
    theta = torch.tensor([[1.0, 1.9, 0.9], [0.7, 1.7, 1.5], [1.2, 2.0, 0.4]], dtype=torch.float64)
    f = crb.fisher_information(ir_model, theta, 0.01, mode=mode)
    cols = []
    for k in range(3):
        step = torch.zeros_like(theta)
        step[:, k] = 1e-6 * theta[:, k]  # relative central difference per parameter
        cols.append((ir_model(theta + step) - ir_model(theta - step)) / (2 * step[:, k:k + 1]))
    j_fd = torch.stack(cols, dim=-1)
    torch.testing.assert_close(f, j_fd.mT @ j_fd / 0.01**2, rtol=1e-6, atol=0)


def test_complex_model_uses_real_part_of_jhj():
    w = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)

    def model(theta):  # complex rotation: amplitude and frequency
        return theta[..., 0:1] * torch.exp(1j * theta[..., 1:2] * w)

    theta = torch.tensor([2.0, 0.3], dtype=torch.float64)
    f = crb.fisher_information(model, theta, 0.5)
    # by hand: |∂S/∂a|² = 1, |∂S/∂ω|² = a² w², Re(conj(∂S/∂a) ∂S/∂ω) = 0
    expected = torch.tensor([[4.0, 0.0], [0.0, 4.0 * (w**2).sum()]], dtype=torch.float64) / 0.25
    torch.testing.assert_close(f, expected)


def test_monte_carlo_nlls_variance_approaches_crb():
    """An NLLS fit of the T2 decay at high SNR is efficient: variance ≈ CRB, CRB-loss ≈ 1."""
    truth = np.array([1.0, 0.08])
    sigma = 0.01
    rng = np.random.default_rng(42)
    clean = truth[0] * np.exp(-TE.numpy() / truth[1])
    fits = []
    for _ in range(2000):
        y = clean + sigma * rng.normal(size=clean.shape)
        r = least_squares(lambda p: p[0] * np.exp(-TE.numpy() / p[1]) - y, x0=[0.9, 0.1], x_scale=[1, 0.1])
        fits.append(r.x)
    fits = np.array(fits)
    bound = crb.crb(t2_model, torch.tensor(truth), sigma).numpy()
    ratio = fits.var(axis=0) / bound
    # variance / CRB measured 1.035 and 1.062 at seed 42 (0.98-1.06 over seeds 0-2); bound 1.5×
    # the largest deviation
    assert np.all(np.abs(ratio - 1) < 0.093), ratio
    loss = crb.crb_weighted_loss(torch.from_numpy(fits), torch.from_numpy(truth), torch.from_numpy(bound))
    assert loss.item() == pytest.approx(1.0, abs=0.075)  # measured 1.049 (0.989-0.993 seeds 0-2)
    # a deliberately noisier estimator is detected as inefficient (measured 1.55; 1.48-1.55)
    worse = fits + math.sqrt(bound[1]) * rng.normal(size=fits.shape) * np.array([0, 1])
    assert crb.crb_weighted_loss(torch.from_numpy(worse), torch.from_numpy(truth), torch.from_numpy(bound)) > 1.4


def test_sigma_per_sample_broadcasts():
    theta = torch.tensor([[1.0, 0.08], [1.0, 0.08]], dtype=torch.float64)
    c = crb.crb(t2_model, theta, torch.tensor([0.01, 0.02], dtype=torch.float64))
    torch.testing.assert_close(c[1], 4 * c[0])
