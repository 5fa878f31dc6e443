"""Mono-exponential relaxometry models (seed 004).

``inversion_recovery`` is the three-parameter Look-Locker / IR model ``|A(1 − B e^{−TI/T1})|`` and
``t2_decay`` the T2-preparation model ``|A e^{−TE/T2}|`` (``inversion_recovery(..., signed=True)``
drops the modulus, for polarity-restored fitting). Parameters have shape ``[...]``; the
time points ``ti``/``te`` (seconds) have shape ``[N]`` and the signal has shape ``[..., N]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["inversion_recovery", "t2_decay"]


def _times(t: torch.Tensor | Sequence[float] | float, like: torch.Tensor) -> torch.Tensor:
    """Time points as a 1-D tensor in the dtype/device of the parameters."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(-1)


def _params(*params: torch.Tensor | float) -> list[torch.Tensor]:
    """Promote parameters to tensors of one floating dtype (float32 unless one is float64)."""
    tensors = [torch.as_tensor(p) for p in params]
    dtype = torch.get_default_dtype()
    for p in tensors:
        if p.dtype == torch.float64:
            dtype = torch.float64
    return [p.to(dtype) for p in tensors]


def inversion_recovery(
    a: torch.Tensor | float,
    b: torch.Tensor | float,
    t1: torch.Tensor | float,
    ti: torch.Tensor | Sequence[float],
    *,
    signed: bool = False,
) -> torch.Tensor:
    """``|A (1 − B e^{−TI/T1})|`` -> ``[..., N]`` for inversion times ``ti`` ``[N]`` in seconds.

    ``signed=True`` returns ``A (1 − B e^{−TI/T1})`` without the modulus: the real-valued model
    of phase-sensitive (or polarity-restored) IR data, smooth through the null.
    """
    a, b, t1 = _params(a, b, t1)
    ti = _times(ti, t1)
    s = a[..., None] * (1.0 - b[..., None] * torch.exp(-ti / t1[..., None]))
    return s if signed else s.abs()


def t2_decay(
    a: torch.Tensor | float, t2: torch.Tensor | float, te: torch.Tensor | Sequence[float]
) -> torch.Tensor:
    """``|A e^{−TE/T2}|`` -> ``[..., N]`` for echo / preparation times ``te`` ``[N]`` in seconds."""
    a, t2 = _params(a, t2)
    te = _times(te, t2)
    return (a[..., None] * torch.exp(-te / t2[..., None])).abs()
