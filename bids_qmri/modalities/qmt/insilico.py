"""Seed 003's bias / variance analysis of an estimator (§2.7, Eq. 2–5; Figs. 4–8).

``noise_realisations(net, data, snr_max, n_noise)``: estimates ``[n_noise, S, P]`` of every
test sample under ``n_noise`` complex Gaussian noise draws at ``SNR_max = |M0|/σ`` (random M0
phase per draw). ``decompose(estimates, truth, crb)``: per sample and parameter the bias (Eq. 2),
the standard deviation and ``std/√CRB``, and the CRB-normalised loss split into its bias part
``(θ̄ − θ)²/CRB`` and its variance part ``Σ(θ̂ − θ̄)²/(N·CRB)`` (Eq. 4; their sum is the mean
loss over the draws exactly, Eq. 5).
"""

from __future__ import annotations

import math

import torch

from . import simulate
from .net import features
from .training import OUT_INDEX

__all__ = ["noise_realisations", "decompose"]


def noise_realisations(net, data: dict, snr_max: float, n_noise: int = 300, *, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(int(seed))
    c = data["coeffs"].to(torch.complex128)
    s = len(c)
    out = []
    sigma = simulate.NOISE_SIGMA
    with torch.no_grad():
        for _ in range(n_noise):
            m0 = torch.polar(torch.full((s,), snr_max * sigma, dtype=torch.float64),
                             2 * math.pi * torch.rand(s, generator=gen, dtype=torch.float64))
            noise = torch.complex(torch.randn(c.shape, generator=gen, dtype=torch.float64),
                                  torch.randn(c.shape, generator=gen, dtype=torch.float64))
            out.append(net(features(c * m0[:, None] + sigma * noise)).double())
    return torch.stack(out)


def decompose(estimates: torch.Tensor, truth: torch.Tensor, crb: torch.Tensor) -> dict[str, torch.Tensor]:
    """``estimates [N, S, P]``, ``truth [S, P]``, ``crb [S, P]`` -> per-sample ``[S, P]`` tensors."""
    mean = estimates.mean(0)
    var = ((estimates - mean) ** 2).mean(0)
    bias = mean - truth
    return {"bias": bias, "std": var.sqrt(), "std_over_sqrt_crb": (var / crb).sqrt(),
            "loss_bias": bias**2 / crb, "loss_variance": var / crb,
            "loss": ((estimates - truth) ** 2 / crb).mean(0)}


def crb_at(data: dict, snr_max: float) -> torch.Tensor:
    """CRB ``[S, 3]`` of the network outputs at ``SNR_max`` (|M0| = SNR_max·σ)."""
    return data["crb_unit"][:, OUT_INDEX] / snr_max**2
