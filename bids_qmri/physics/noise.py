"""Measurement noise at the seed definition of SNR.

The seed papers define SNR against a reference signal level of 0.074 (the mean white-matter
magnitude of their normalised bSSFP data), so the per-channel standard deviation of complex
Gaussian noise is ``σ = 0.074 / (√2 · SNR)`` and the complex noise has total standard deviation
``0.074 / SNR``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["REFERENCE_SIGNAL", "noise_sigma", "add_complex_noise", "add_rician_noise"]

#: Reference signal level of the seed SNR definition.
REFERENCE_SIGNAL = 0.074


def noise_sigma(snr: float | torch.Tensor) -> float | torch.Tensor:
    """Per-channel (real or imaginary) noise standard deviation for a given SNR."""
    return REFERENCE_SIGNAL / (math.sqrt(2.0) * snr)


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.empty((), dtype=dtype).real.dtype if dtype.is_complex else dtype


def add_complex_noise(
    S: torch.Tensor, snr: float | torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Return ``S + σ (n_r + i n_i)`` with independent standard normal ``n_r, n_i``.

    ``S`` may be real or complex; the result is complex. ``snr`` is a float or a tensor that
    broadcasts against ``S`` (e.g. shape ``[..., 1]`` for one SNR per voxel).
    """
    S = torch.as_tensor(S)
    if not (S.dtype.is_complex or S.dtype.is_floating_point):
        S = S.to(torch.get_default_dtype())
    real = _real_dtype(S.dtype)
    sigma = noise_sigma(torch.as_tensor(snr, dtype=real, device=S.device))
    shape = torch.broadcast_shapes(S.shape, sigma.shape)
    n_r = torch.randn(shape, generator=generator, dtype=real, device=S.device)
    n_i = torch.randn(shape, generator=generator, dtype=real, device=S.device)
    return S + sigma * torch.complex(n_r, n_i)


def add_rician_noise(
    S: torch.Tensor, snr: float | torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Magnitude of a noisy complex signal: Rician-distributed, as in magnitude images."""
    return add_complex_noise(S, snr, generator).abs()
