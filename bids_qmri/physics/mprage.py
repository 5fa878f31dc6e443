"""MPRAGE signal from the periodic steady state of the longitudinal magnetisation.

One preparation period of length ``tr_prep`` (the MPRAGE "TR", inversion to inversion) is:
inversion (``Mz → −η Mz``, η = ``inversion_efficiency``), free recovery to the first readout pulse,
``n_readout`` pulses of flip ``α·B1`` every ``echo_spacing`` (each followed by free recovery for one
echo spacing, transverse magnetisation assumed spoiled), then free recovery until the next
inversion. ``ti`` is the time from the inversion to the readout pulse that samples the centre of
k-space (index ``centre_index``, default ``n_readout // 2``; linear ordering), as on Siemens
scanners; pass ``ti_reference="first"`` for TI measured to the first readout pulse.

Every step is an affine map ``Mz → a·Mz + b``; their composition over one period is again affine,
so the periodic steady state is ``Mz* = b/(1 − a)`` in closed form. The readout train is composed
with the geometric series written in ``expm1``/``log1p`` form so that it stays accurate in float32
when ``echo_spacing ≪ T1`` and α is small.

The signal is ``M0 · sin(α·B1) · Mz⁻_c`` (``Mz⁻_c``: just before the centre pulse), multiplied by
``exp(−TE/T2*)`` when ``t2star`` is given, and returned as a magnitude (scanner images are
magnitude) unless ``magnitude=False``.
"""

from __future__ import annotations

import math

import torch

from .relaxation import _params

__all__ = ["mprage_signal", "default_mprage_protocol"]


def default_mprage_protocol() -> dict:
    """Seed-002-like 3D MPRAGE: TR 2130 ms, TI 900 ms, flip 8°, 176 partitions, 7 ms spacing."""
    return {
        "ti": 0.900,
        "tr_prep": 2.130,
        "echo_spacing": 0.007,
        "flip_rad": math.radians(8.0),
        "n_readout": 176,
    }


def _affine_then(a1, b1, a2, b2):
    """Compose ``x → a1 x + b1`` followed by ``x → a2 x + b2``."""
    return a2 * a1, a2 * b1 + b2


def _relax(t, r1, m0):
    """Free recovery for time ``t``: ``Mz → E Mz + M0 (1 − E)``."""
    e = torch.exp(-t * r1)
    return e, -m0 * torch.expm1(-t * r1)


def _train(n, cos_a, log_cos_a, esp, r1, m0):
    """``n`` × (pulse, recovery for ``esp``) composed in closed form.

    Per step ``Mz → q Mz + c`` with ``q = cos α · E``, ``c = M0 (1 − E)``; after ``n`` steps
    ``a = qⁿ`` and ``b = c (1 − qⁿ)/(1 − q)``, with ``1 − q = (1 − cos α) + cos α (1 − E)`` and
    ``1 − qⁿ = −expm1(n log q)`` evaluated without cancellation.
    """
    if n == 0:
        one = torch.ones_like(r1 * cos_a)
        return one, torch.zeros_like(one)
    one_minus_e = -torch.expm1(-esp * r1)
    c = m0 * one_minus_e
    log_q = log_cos_a - esp * r1
    one_minus_qn = -torch.expm1(n * log_q)
    one_minus_q = (1.0 - cos_a) + cos_a * one_minus_e
    return torch.exp(n * log_q), c * one_minus_qn / one_minus_q


def mprage_signal(
    t1: torch.Tensor | float,
    m0: torch.Tensor | float,
    b1: torch.Tensor | float,
    *,
    ti: float,
    tr_prep: float,
    echo_spacing: float,
    flip_rad: float,
    n_readout: int,
    centre_index: int | None = None,
    ti_reference: str = "centre",
    inversion_efficiency: float = 1.0,
    te: float = 0.0,
    t2star: torch.Tensor | float | None = None,
    magnitude: bool = True,
) -> torch.Tensor:
    """Steady-state MPRAGE signal at the centre of k-space, shape ``broadcast(t1, m0, b1)``."""
    t1, m0, b1 = _params(t1, m0, b1)
    n_readout = int(n_readout)
    if n_readout < 1:
        raise ValueError(f"MPRAGE needs at least one readout pulse, got n_readout={n_readout}")
    centre = n_readout // 2 if centre_index is None else int(centre_index)
    if not 0 <= centre < n_readout:
        raise ValueError(f"centre_index {centre} outside the readout train of {n_readout} pulses")
    if ti_reference == "centre":
        t_first = ti - centre * echo_spacing
    elif ti_reference == "first":
        t_first = ti
    else:
        raise ValueError(f"ti_reference must be 'centre' or 'first', got {ti_reference!r}")
    t_after = tr_prep - t_first - (n_readout - 1) * echo_spacing
    if t_first < 0 or t_after < 0:
        raise ValueError(
            f"MPRAGE timing does not fit: TI={ti} s, {n_readout} pulses every {echo_spacing} s "
            f"need 0 ≤ first pulse and last pulse ≤ TR={tr_prep} s"
        )
    r1 = 1.0 / t1
    one = torch.ones_like(r1)  # magnetisation in units of M0; scaled by m0 at the end
    alpha = flip_rad * b1
    cos_a = torch.cos(alpha)
    # log cos α = log1p(−2 sin²(α/2)): accurate for small flips.
    log_cos_a = torch.log1p(-2.0 * torch.sin(alpha / 2) ** 2)

    # One period starting just before the centre pulse: pulses centre..last−1 (each followed by
    # one echo spacing), the last pulse, recovery to the inversion, inversion, recovery to the
    # first pulse, pulses 0..centre−1 (each followed by one echo spacing).
    a, b = _train(n_readout - 1 - centre, cos_a, log_cos_a, echo_spacing, r1, one)
    a, b = _affine_then(a, b, cos_a, torch.zeros_like(b))
    a, b = _affine_then(a, b, *_relax(t_after, r1, one))
    a, b = _affine_then(a, b, -inversion_efficiency * one, torch.zeros_like(b))
    a, b = _affine_then(a, b, *_relax(t_first, r1, one))
    a, b = _affine_then(a, b, *_train(centre, cos_a, log_cos_a, echo_spacing, r1, one))
    mz_centre = b / (1.0 - a)

    signal = m0 * torch.sin(alpha) * mz_centre
    if t2star is not None and te > 0:
        (t2star,) = _params(t2star)
        signal = signal * torch.exp(-te / t2star.to(signal.dtype))
    return signal.abs() if magnitude else signal
