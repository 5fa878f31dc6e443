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

__all__ = ["svd_basis", "basis_from_gram", "rank_for_energy", "compress", "expand"]


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
        basis, sv = _gram_eigen(d.mH @ d)
        basis, sv = basis[:, :rank], sv[:rank]
    else:
        _, s, vh = torch.linalg.svd(d, full_matrices=False)
        basis, sv = vh[:rank].mH, s[:rank]
    basis = _fix_phases(basis).to(out_dtype)
    return (basis, sv.to(basis.real.dtype)) if return_singular_values else basis


def _gram_eigen(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All right singular vectors and singular values (descending) from ``DᴴD`` (complex128)."""
    evals, evecs = torch.linalg.eigh(gram.to(torch.complex128))
    order = torch.argsort(evals, descending=True)
    return evecs[:, order], evals[order].clamp_min(0).sqrt()


def _fix_phases(basis: torch.Tensor) -> torch.Tensor:
    """Each vector's phase fixed: its largest-magnitude entry real positive (reproducible bases)."""
    idx = basis.abs().argmax(dim=0)
    pivot = basis[idx, torch.arange(basis.shape[1])]
    return basis * (pivot.conj() / pivot.abs())


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank whose singular values hold at least ``energy`` (0–1] of ``Σ s²``."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    power = torch.as_tensor(singular_values, dtype=torch.float64) ** 2
    cumulative = torch.cumsum(power, 0) / power.sum().clamp_min(torch.finfo(torch.float64).tiny)
    return min(int(torch.searchsorted(cumulative, torch.tensor(energy - 1e-12, dtype=torch.float64))) + 1,
               power.numel())


def basis_from_gram(gram: torch.Tensor, *, rank: int | None = None, energy: float | None = None):
    """``(basis [Nt, rank], singular values [rank], energy kept)`` from the Gram matrix ``DᴴD``
    ``[Nt, Nt]`` of a dictionary accumulated chunk by chunk (memory ``Nt²`` instead of
    ``Natoms × Nt``). Give ``rank``, or ``energy`` to choose the smallest rank keeping that
    fraction of ``Σ s²``. Phases as :func:`svd_basis`; complex128."""
    if (rank is None) == (energy is None):
        raise ValueError("give rank or energy")
    vecs, sv = _gram_eigen(gram)
    nt = vecs.shape[0]
    if rank is None:
        rank = rank_for_energy(sv, energy)
    if not 1 <= rank <= nt:
        raise ValueError(f"SVD rank must be between 1 and the number of time points {nt}, got {rank}")
    kept = float((sv[:rank] ** 2).sum() / (sv**2).sum().clamp_min(torch.finfo(torch.float64).tiny))
    return _fix_phases(vecs[:, :rank]), sv[:rank], kept


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
