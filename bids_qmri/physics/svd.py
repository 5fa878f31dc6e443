"""Temporal SVD compression of fingerprint dictionaries (McGivney et al. 2014, seed 002).

``svd_basis`` returns the first ``rank`` right singular vectors ``V_r`` ``[Nt, rank]`` of the
dictionary ``D`` ``[Natoms, Nt]`` (complex). ``compress(s, V_r) = s V_r`` gives the coefficients
and ``expand(c, V_r) = c V_rᴴ`` the projection back to time. The singular vectors' arbitrary
phases are fixed (largest entry real positive) so bases are reproducible, and — as in seed 002 —
``compress`` by default rotates every signal so that its first coefficient is real and
non-negative (removing the unknown M0 phase).
"""

from __future__ import annotations

import torch

__all__ = ["svd_basis", "compress", "expand"]


def svd_basis(dictionary: torch.Tensor, rank: int, *, return_singular_values: bool = False):
    """Rank-``rank`` temporal basis ``[Nt, rank]`` of a dictionary ``[..., Nt]`` (leading dims are atoms)."""
    d = torch.as_tensor(dictionary)
    nt = d.shape[-1]
    if not 1 <= rank <= nt:
        raise ValueError(f"SVD rank must be between 1 and the number of time points {nt}, got {rank}")
    out_dtype = d.dtype if d.dtype.is_complex else (torch.complex128 if d.dtype == torch.float64 else torch.complex64)
    d = d.reshape(-1, nt).to(torch.complex128)
    if d.shape[0] > nt:
        # Many atoms: eigen-decompose the small Gram matrix DᴴD (float64) instead of D itself.
        evals, evecs = torch.linalg.eigh(d.mH @ d)
        order = torch.argsort(evals, descending=True)[:rank]
        basis = evecs[:, order]
        sv = evals[order].clamp_min(0).sqrt()
    else:
        _, s, vh = torch.linalg.svd(d, full_matrices=False)
        basis, sv = vh[:rank].mH, s[:rank]
    # Fix each vector's phase: its largest-magnitude entry real positive.
    idx = basis.abs().argmax(dim=0)
    pivot = basis[idx, torch.arange(rank)]
    basis = basis * (pivot.conj() / pivot.abs())
    basis = basis.to(out_dtype)
    return (basis, sv.to(basis.real.dtype)) if return_singular_values else basis


def compress(signal: torch.Tensor, basis: torch.Tensor, *, real_first: bool = True) -> torch.Tensor:
    """Coefficients ``[..., rank]`` of signals ``[..., Nt]``; first coefficient made real if asked."""
    basis = torch.as_tensor(basis)
    signal = torch.as_tensor(signal).to(basis.dtype)
    coeffs = signal @ basis
    if real_first:
        first = coeffs[..., :1]
        mag = first.abs()
        phase = torch.where(mag > 0, first.conj() / mag.clamp_min(torch.finfo(mag.dtype).tiny), torch.ones_like(first))
        coeffs = coeffs * phase
    return coeffs


def expand(coeffs: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Time-domain signals ``[..., Nt]`` from coefficients ``[..., rank]``."""
    basis = torch.as_tensor(basis)
    return torch.as_tensor(coeffs).to(basis.dtype) @ basis.mH
