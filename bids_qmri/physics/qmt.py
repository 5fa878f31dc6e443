"""Hybrid-state quantitative magnetisation transfer: Henkelman two-pool model (seed 003).

Pools: free water ``(Mx, My, Mz_f)`` of size ``m0f = 1 − m0s`` and semi-solid ``Mz_s`` of size
``m0s`` (total M0 = 1; a complex M0 scaling is applied by the caller). Both pools share the
apparent ``T1`` (seed 003); exchange ``dMz_f/dt ∋ −Rx·m0s·Mz_f + Rx·m0f·Mz_s`` (and the opposite for
``Mz_s``) keeps the equilibrium ``(m0f, m0s)``.

Bloch–McConnell equations (rotating frame, γ > 0: ``dM/dt = γ M × B``), ``Δω = 2π·b0_hz``,
RF along ±x with ``ω1 = B1·α/τ`` for a rectangular pulse of flip ``α`` and duration ``τ``::

    dMx/dt   = −Mx/T2f + Δω·My
    dMy/dt   = −Δω·Mx − My/T2f + ω1·Mz_f
    dMz_f/dt = −ω1·My + (m0f − Mz_f)/T1 − Rx·m0s·Mz_f + Rx·m0f·Mz_s
    dMz_s/dt = (m0s − Mz_s)/T1 − Rrf·Mz_s + Rx·m0s·Mz_f − Rx·m0f·Mz_s

The semi-solid pool is saturated during each pulse at the rate
``Rrf = ω1² ∫₀^τ (1 − s/τ) g(s) cos(Δω s) ds`` where ``g`` is the lineshape's free-induction
decay (``g(t) = ∫ G(ω) e^{iωt} dω``): the mean saturation rate of a rectangular pulse in the
linear-response limit, i.e. the lineshape ``G`` weighted by the pulse's power spectrum
(``Rrf = ω1² (τ/2) ∫ G(ω) sinc²((ω+Δω)τ/2) dω``; for ``τ ≫ T2s`` it tends to Henkelman's
``π ω1² G(Δω)``). It is finite on resonance even for the super-Lorentzian, whose ``G(0)`` diverges.
Lineshapes (``T2s``): super-Lorentzian ``g = ∫₀¹ exp(−(3u²−1)² t²/(8 T2s²)) du``, Gaussian
``g = exp(−t²/(2 T2s²))``, Lorentzian ``g = exp(−t/T2s)``.

Sequence (one cycle, repeated): a rectangular inversion pulse (flip π·B1, ``inversion_dur``), then
``Nt`` TRs, each: pulse ``n`` (flip ``α_n``, duration ``τ_n``, sign alternating ``(−1)ⁿ`` as in
balanced SSFP), free precession ``(TR − τ_n)/2``, echo, free precession ``(TR − τ_n)/2``. The
echo is ``(−1)ⁿ (Mx + i·My)`` (RF sign demodulated). Pulses are propagated with the exact matrix
exponential of the 5×5 affine generator (Taylor series with scaling and squaring, truncation error
below the dtype's resolution, evaluated elementwise over voxels and TRs: see ``_expm_affine``);
free precession in closed form (transverse rotation/decay; longitudinal
``e^{−t/T1}(I + K(1 − e^{−Rx t})/Rx)`` with the exchange matrix ``K``, whose eigenvalues are 0
and −Rx). The magnetisation is inverted once per cycle, so the free pool follows an anti-periodic
transient; the cycle's affine map ``x → C x + c`` is solved for its fixed point
``x* = (I − C)⁻¹ c`` (a 4×4 linear solve, no iteration to convergence) and the echoes are read
from the same pass (the rows of the map from the cycle start to each echo, applied to ``x*``).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from scipy.integrate import quad

from .relaxation import _params

__all__ = ["hybrid_state_signal", "hybrid_state_jacobian", "JACOBIAN_PARAMETERS", "default_qmt_schedule", "schedule_from_knots",
           "SCHEDULE_KNOTS",
           "saturation_rate", "LINESHAPES"]

LINESHAPES = ("superlorentzian", "gaussian", "lorentzian")

# Super-Lorentzian FID g(x), x = t/T2s, tabulated on a log grid with its log-derivative and
# evaluated by cubic Hermite interpolation (C¹, so gradients are smooth).
_SL_LOG_X = (math.log(1e-3), math.log(1e6), 1400)
_SL_TAIL = math.sqrt(2 * math.pi / 3)  # g(x) → √(2π/3)/x for x → ∞ (magic-angle tail)
_U0 = 1.0 / math.sqrt(3.0)


@functools.lru_cache(maxsize=1)
def _superlorentzian_table() -> tuple[np.ndarray, np.ndarray]:
    lo, hi, n = _SL_LOG_X
    values, slopes = np.empty(n), np.empty(n)
    for i, q in enumerate(np.linspace(lo, hi, n)):
        x = math.exp(q)
        # u = u0 + w/x: (3u² − 1)·x = 6u0·w + 3w²/x, an O(1)-wide peak in w at any x.
        w_lo, w_hi = max(-_U0 * x, -60.0), min((1 - _U0) * x, 60.0)

        def qq(w, x=x):
            return (6 * _U0 * w + 3 * w * w / x) ** 2

        kw = dict(epsabs=0.0, epsrel=1e-12, limit=200)
        g = sum(quad(lambda w: math.exp(-qq(w) / 8), a, b, **kw)[0] for a, b in ((w_lo, 0), (0, w_hi)))
        d = sum(quad(lambda w: -qq(w) / 4 * math.exp(-qq(w) / 8), a, b, **kw)[0] for a, b in ((w_lo, 0), (0, w_hi)))
        values[i], slopes[i] = g / x, d / x  # slopes: dg/d(ln x)
    return values, slopes


def _superlorentzian_fid(x: torch.Tensor) -> torch.Tensor:
    values, slopes = _superlorentzian_table()
    lo, hi, n = _SL_LOG_X
    step = (hi - lo) / (n - 1)
    v = torch.as_tensor(values, dtype=x.dtype, device=x.device)
    s = torch.as_tensor(slopes, dtype=x.dtype, device=x.device) * step
    q = torch.log(x.clamp(min=math.exp(lo), max=math.exp(hi)))
    pos = (q - lo) / step
    i = pos.detach().floor().clamp(0, n - 2).long()
    t = pos - i
    h00, h10 = (1 + 2 * t) * (1 - t) ** 2, t * (1 - t) ** 2
    h01, h11 = t * t * (3 - 2 * t), t * t * (t - 1)
    mid = h00 * v[i] + h10 * s[i] + h01 * v[i + 1] + h11 * s[i + 1]
    small = 1.0 - x * x / 10.0  # g ≈ 1 − ⟨(3u²−1)²⟩x²/8, ⟨·⟩ = 4/5
    large = _SL_TAIL / x.clamp(min=1.0)
    return torch.where(x < math.exp(lo), small, torch.where(x > math.exp(hi), large, mid))


def _fid(x: torch.Tensor, lineshape: str) -> torch.Tensor:
    if lineshape == "superlorentzian":
        return _superlorentzian_fid(x)
    if lineshape == "gaussian":
        return torch.exp(-0.5 * x * x)
    if lineshape == "lorentzian":
        return torch.exp(-x)
    raise ValueError(f"lineshape must be one of {LINESHAPES}, got {lineshape!r}")


@functools.lru_cache(maxsize=4)
def _gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(n)


def saturation_rate(
    omega1: torch.Tensor,
    tau: torch.Tensor,
    t2s: torch.Tensor,
    b0_hz: torch.Tensor,
    lineshape: str = "superlorentzian",
    *,
    n_nodes: int = 96,
) -> torch.Tensor:
    """Mean semi-solid saturation rate (1/s) of a rectangular pulse ``ω1`` (rad/s), ``τ`` (s).

    ``ω1² ∫₀^τ (1 − s/τ) g(s/T2s) cos(2π·b0·s) ds`` by Gauss–Legendre quadrature in ``ln s`` over
    ``[10⁻³·T2s, τ]`` (the integrand spans T2s ≪ τ) plus the analytic piece below ``10⁻³·T2s``.
    All arguments broadcast.
    """
    omega1, tau, t2s, b0_hz = torch.broadcast_tensors(*_params(omega1, tau, t2s, b0_hz))
    nodes, weights = (torch.as_tensor(a, dtype=tau.dtype) for a in _gauss_legendre(n_nodes))
    s0 = torch.minimum(1e-3 * t2s, tau)
    log_lo, log_hi = torch.log(s0)[..., None], torch.log(tau)[..., None]
    half = 0.5 * (log_hi - log_lo)
    s = torch.exp(log_lo + half * (nodes + 1))
    integrand = (1 - s / tau[..., None]) * _fid(s / t2s[..., None], lineshape)
    integrand = integrand * torch.cos(2 * math.pi * b0_hz[..., None] * s) * s
    body = (half * weights * integrand).sum(-1)
    head = s0 * (1 - 0.5 * s0 / tau)  # g ≈ 1 and cos ≈ 1 for s < 10⁻³ T2s
    return omega1**2 * (body + head)


#: Knots of the synthetic dataset's schedule: flip angles (degrees) and pulse durations (µs), each
#: spread evenly over the cycle and joined by monotone cubic (PCHIP) interpolation. Chosen with
#: ``scripts/design_qmt_schedule.py --objective efficiency --max-sar 1.25 --max-crb-growth 1.15
#: --hold-efficiency`` (issue 16, candidate C: the predicted std/√CRB of a prior-using estimator, with
#: the CRBs of T1 and T2f held), started from the previous knots (flips 63.8, 56.7, 13.1, 2.0, 2.4, 1.7,
#: 76.2, 180, 80.3, 14.8, 74.3, 22.8, 8.1, 19.4, 4.6°; durations 220, 126, 296, 362, 455, 204, 479,
#: 471, 312, 151, 170, 315, 428, 100, 125 µs; a search on the Cramér–Rao bounds). SAR-like Σα²/τ 0.70×
#: the previous train's; models/bundled/qmt/TRAINING.md.
SCHEDULE_KNOTS = (
    (5.9, 32.7, 8.0, 4.8, 1.0, 1.2, 31.6, 180.0, 11.0, 44.7, 158.7, 40.2, 1.4, 11.0, 1.2),
    (500.0, 500.0, 500.0, 362.0, 229.0, 441.0, 270.0, 446.0, 240.0, 500.0, 145.0, 100.0, 119.0, 100.0, 115.0),
)
#: Bounds of the schedule (those of seed 003's group's optimal-control example, MRIgeneralizedBloch.jl
#: ``docs/src/OCT.jl``): pulse durations 100-500 µs, RF amplitude ω1 ≤ 2π·1 kHz (23.5 µT).
PULSE_DUR_RANGE = (100e-6, 500e-6)
PULSE_DUR_RASTER = 10e-6
OMEGA1_MAX = 2e3 * math.pi


def schedule_from_knots(flip_deg, pulse_dur_us, *, n_tr: int = 1142, tr: float = 3.5e-3,
                        inversion_dur: float = 0.5e-3) -> dict:
    """A smooth hybrid-state train: flip angles and pulse durations by PCHIP through evenly spaced
    knots (degrees, µs), durations clipped to ``PULSE_DUR_RANGE`` on a ``PULSE_DUR_RASTER`` grid and flips to ``ω1 ≤ OMEGA1_MAX``.
    Returns ``dict(flip_rad=[n_tr], pulse_dur=[n_tr], tr, inversion_dur)`` (float64)."""
    from scipy.interpolate import PchipInterpolator

    t = np.linspace(0.0, 1.0, n_tr)
    flip = PchipInterpolator(np.linspace(0, 1, len(flip_deg)), np.asarray(flip_deg, float))(t)
    dur = PchipInterpolator(np.linspace(0, 1, len(pulse_dur_us)), np.asarray(pulse_dur_us, float))(t) * 1e-6
    # on a 10-µs raster (as a scanner's): the saturation integral is computed once per distinct duration
    dur = np.round(np.clip(dur, *PULSE_DUR_RANGE) / PULSE_DUR_RASTER) * PULSE_DUR_RASTER
    flip = np.minimum(np.radians(np.clip(flip, 0.5, 180.0)), OMEGA1_MAX * dur)
    return {"flip_rad": torch.from_numpy(flip), "pulse_dur": torch.from_numpy(dur), "tr": tr,
            "inversion_dur": inversion_dur}


def default_qmt_schedule() -> dict:
    """The synthetic dataset's hybrid-state qMT train, built like seed 003's (its ref. 38; the train
    itself is not published in the seed): a 4-s cycle of 1142 TRs of 3.5 ms after a 500-µs
    rectangular inversion, with a smooth flip-angle train and pulse durations of 100-500 µs.

    Low flip angles after the inversion keep the magnetisation near the z axis, where it recovers
    with T1 (the hybrid state's T1 encoding); lobes of high flip angle at short and long pulses
    saturate the semi-solid pool differently (∝ α²/τ), which encodes m0s, T2s and Rx; T2f comes from
    the high-flip balanced segments. ``SCHEDULE_KNOTS`` via :func:`schedule_from_knots`.
    The previous train (six half-sine lobes of 45-170° at fixed 0.25-1 ms pulses, 1-ms inversion)
    encoded T1 and m0s poorly: full-signal √CRB/T1 ≈ 0.5-1.3 at SNR_max 50 against ≈ 0.07-0.17 now.
    Returns ``dict(flip_rad=[Nt], pulse_dur=[Nt], tr=float, inversion_dur=float)`` (float64).
    """
    return schedule_from_knots(*SCHEDULE_KNOTS)


# Affine maps ``x → A x + a`` of the state ``x = (Mx, My, Mz_f, Mz_s)`` are stored as their top four
# rows ``[A | a]`` with the batch *last*, ``[4, 5, ..., B]``: products of many 4×5 blocks are then
# a few broadcast multiply-adds over long contiguous vectors: ~5× faster per product than batched
# 5×5 ``bmm``, and a pulse exponential 4-7× faster than ``torch.linalg.matrix_exp`` (float32, 8k
# maps per operation; benchmarks/bench_physics.py). The implicit last row of a map is
# ``(0, 0, 0, 0, λ)`` with a Python constant ``λ``: 1 for propagators, 0 for generators and their
# powers, ``c₀`` for the polynomial blocks of the Taylor series.

#: Taylor scaling and squaring per dtype: (θ, truncation tolerance, max squarings). Each step is
#: scaled by 2^−s to ‖X‖∞ ≤ θ (s per element, capped at s_max); the degree is the smallest in
#: ``_TAYLOR`` whose truncation bound ν^(m+1)/(m+1)! is below the tolerance for the largest scaled
#: norm ν (the largest degree under vmap, where values are not concrete). Pulses are exact up to
#: ‖X‖∞ = θ·2^s_max (B1·flip of ~10π rad); the default schedule needs s ≤ 2.
_EXPM = {torch.float32: (2.0, 1e-8, 4), torch.float64: (2.0, 1e-16, 4)}
#: (degree m, Paterson–Stockmeyer block p), cheapest first; (m + 1) is a multiple of p.
_TAYLOR = ((5, 2), (8, 3), (11, 4), (15, 4), (19, 4), (23, 4))


def _concrete_max(t: torch.Tensor, default: float) -> float:
    """``t.max()`` as a number, or ``default`` under ``torch.func.vmap`` (values are not concrete)."""
    try:
        return float(t.max())
    except RuntimeError:
        return default


def _last_column(lam: float, x: torch.Tensor) -> torch.Tensor:
    """``λ·e₄`` shaped to broadcast over the 5 columns of ``[R, 5, ...]`` maps like ``x``."""
    e = torch.zeros(5, dtype=x.dtype)
    e[4] = lam
    return e.reshape(1, 5, *([1] * (x.dim() - 2)))


def _mul(a: torch.Tensor, b: torch.Tensor, lam_b: float, plus: torch.Tensor | None = None) -> torch.Tensor:
    """Top rows of ``[[A, a], [0, ·]] @ [[B, b], [0, λ_b]]`` for ``[R, 5, ...]`` @ ``[4, 5, ...]``
    (``+ plus`` if given, fused into the first product)."""
    top = a[:, 0, None] * b[0][None] if plus is None else torch.addcmul(plus, a[:, 0, None], b[0][None])
    for k in range(1, 4):  # a 4-term sum of [R, 5, ...] products (no 4× larger temporary)
        top = torch.addcmul(top, a[:, k, None], b[k][None])
    if lam_b:
        top = torch.addcmul(top, a[:, 4, None], _last_column(lam_b, top))
    return top


def _expm_affine(x: torch.Tensor, dx: torch.Tensor | None = None):
    """``exp`` of generators ``[4, 5, ...]`` (implicit last row 0): propagators ``[4, 5, ...]``.

    Taylor series of degree m by Paterson–Stockmeyer (p + (m+1)/p − 2 products) after scaling by
    2^−s per element, then s squarings (masked per element, so that it also runs under vmap).
    With ``dx`` (tangents ``[4, 5, ..., P, B]`` of generators ``[4, 5, ..., B]``) also returns the
    tangents of the propagators: the same series with every product ``AB`` differentiated as
    ``dA·B + A·dB`` (forward mode by hand; s is piecewise constant, so it carries no tangent).
    """
    theta, tol, s_max = _EXPM[x.dtype]
    with torch.no_grad():
        norm = x.detach().abs().sum(1).amax(0)  # ∞-norm (rows of the 5×5 affine generator)
        s = torch.ceil(torch.log2(norm.clamp_min(1e-30) / theta)).clamp(0, s_max)
        nu = _concrete_max(norm * torch.exp2(-s), theta)
    m, p = next((m, p) for m, p in _TAYLOR if nu ** (m + 1) / math.factorial(m + 1) <= tol or m == _TAYLOR[-1][0])
    x = x * torch.exp2(-s)
    coef = [1.0 / math.factorial(k) for k in range(m + 1)]
    powers = [None, x]
    for _ in range(2, p + 1):
        powers.append(_mul(powers[-1], x, 0.0))

    eye = torch.eye(4, 5, dtype=x.dtype).reshape(4, 5, *([1] * (x.dim() - 2)))

    def block(j):  # Σ_{i<p} c_{jp+i} X^i: a map with λ = c_{jp}
        out = torch.add(coef[j * p] * eye, x, alpha=coef[j * p + 1])
        for i in range(2, p):
            out = torch.add(out, powers[i], alpha=coef[j * p + i])
        return out

    n_blocks = (m + 1) // p
    if dx is not None:
        return _expm_affine_tangent(x, dx, s, powers, coef, p, n_blocks, block)
    result, lam = block(n_blocks - 1), coef[(n_blocks - 1) * p]
    for j in range(n_blocks - 2, -1, -1):
        result, lam = _mul(powers[p], result, lam, plus=block(j)), coef[j * p]
    for k in range(int(_concrete_max(s, s_max))):
        result = torch.where(s > k, _mul(result, result, 1.0), result)
    return result


def _expm_affine_tangent(x, dx, s, powers, coef, p, n_blocks, block):
    """The value and tangent passes of :func:`_expm_affine` (scaled ``x``, its powers, the blocks)."""
    u = lambda t: t.unsqueeze(-2)  # noqa: E731  value [..., B] against tangents [..., P, B]
    dx = dx * u(torch.exp2(-s))
    dpowers = [None, dx]
    for k in range(2, p + 1):  # d(X^k) = d(X^{k−1})·X + X^{k−1}·dX
        dpowers.append(_mul(dpowers[-1], u(x), 0.0, plus=_mul(u(powers[k - 1]), dx, 0.0)))

    def dblock(j):
        out = dx * coef[j * p + 1]
        for i in range(2, p):
            out = torch.add(out, dpowers[i], alpha=coef[j * p + i])
        return out

    result, dresult, lam = block(n_blocks - 1), dblock(n_blocks - 1), coef[(n_blocks - 1) * p]
    for j in range(n_blocks - 2, -1, -1):
        dresult = _mul(u(powers[p]), dresult, 0.0, plus=_mul(dpowers[p], u(result), lam, plus=dblock(j)))
        result, lam = _mul(powers[p], result, lam, plus=block(j)), coef[j * p]
    for k in range(int(s.max())):
        dresult = torch.where(u(s) > k, _mul(dresult, u(result), 1.0, plus=_mul(u(result), dresult, 0.0)), dresult)
        result = torch.where(s > k, _mul(result, result, 1.0), result)
    return result, dresult


def _pulse_generator(omega1, rrf, r1, r2f, dw, kf, ks, m0f, m0s):
    """Affine generator ``[4, 5, ...]`` of the Bloch–McConnell equations during a pulse."""
    return _generator_from_entries(omega1, rrf, r1, r2f, dw, kf, ks, r1 * m0f, r1 * m0s)


def _generator_from_entries(omega1, rrf, r1, r2f, dw, kf, ks, cf, cs):
    """The generator with the recovery column ``(cf, cs) = R1·(m0f, m0s)`` given: linear in all its
    arguments, so the same function builds a generator's tangent from the entries' tangents."""
    zero = torch.zeros(torch.broadcast_shapes(*(t.shape for t in (omega1, rrf, r1, r2f, dw, kf, ks, cf, cs))),
                       dtype=omega1.dtype)
    z = lambda t: t.expand_as(zero)  # noqa: E731
    rows = [
        [z(-r2f), z(dw), zero, zero, zero],
        [z(-dw), z(-r2f), z(omega1), zero, zero],
        [zero, z(-omega1), z(-r1 - kf), z(ks), z(cf)],
        [zero, zero, z(kf), z(-r1 - ks - rrf), z(cs)],
    ]
    return torch.stack([torch.stack(r) for r in rows])


def _exchange_fraction(rx, t):
    """``(1 − e^{−Rx t})/Rx`` with its series near Rx = 0."""
    rxt = rx * t
    safe_rx = torch.where(rxt > 1e-6, rx, torch.ones_like(rx))
    return torch.where(rxt > 1e-6, -torch.expm1(-safe_rx * t) / safe_rx, t * (1 - 0.5 * rxt))


def _exchange_fraction_drx(rx, t):
    """``∂/∂Rx`` of :func:`_exchange_fraction`: ``(t e^{−Rx t} − frac)/Rx``, or its Taylor series
    ``−t² Σ_{k≥1} k (−u)^{k−1}/(k+1)!`` (u = Rx t) where the difference cancels (u < 0.5)."""
    u = rx * t
    safe_rx = torch.where(u >= 0.5, rx, torch.ones_like(rx))
    direct = (t * torch.exp(-safe_rx * t) - _exchange_fraction(safe_rx, t)) / safe_rx
    series = torch.zeros_like(u)
    for k in range(16, 0, -1):  # Horner; the k = 17 term is below 1e-16 for u < 0.5
        series = series * (-u) + k / math.factorial(k + 1)
    return torch.where(u >= 0.5, direct, -t * t * series)


def _free_precession(t, r1, r2f, dw, rx, kf, ks, m0f, m0s):
    """Closed-form free precession for time ``t``: the coefficients of its block structure.

    Transverse rotation/decay ``e^{−t/T2f}(cos, sin)``; longitudinal ``e^{−t/T1}(I + K(1 − e^{−Rx t})/Rx)``
    with the exchange matrix ``K`` (eigenvalues 0 and −Rx) and the offset that keeps equilibrium.
    """
    decay = torch.exp(-t * r2f)
    e1 = torch.exp(-t * r1)
    frac = _exchange_fraction(rx, t)
    l11, l12 = e1 * (1 - frac * kf), e1 * frac * ks
    l21, l22 = e1 * frac * kf, e1 * (1 - frac * ks)
    o1 = m0f - (l11 * m0f + l12 * m0s)
    o2 = m0s - (l21 * m0f + l22 * m0s)
    return decay * torch.cos(dw * t), decay * torch.sin(dw * t), l11, l12, l21, l22, o1, o2


def _free_precession_tangent(t, coeffs, par, dpar):
    """Tangents ``[T, P, B]`` of the :func:`_free_precession` coefficients ``coeffs`` (each
    ``[T, B]``), by the chain rule through their closed forms; ``dpar`` holds the tangents
    ``[1, P, B]`` of ``par``'s entries (``r1, r2f, dw, rx, kf, ks, m0f, m0s``)."""
    u = lambda v: v.unsqueeze(-2)  # noqa: E731
    dc, ds, l11, l12, l21, l22, _, _ = (u(c) for c in coeffs)
    t = u(t)
    r1, rx, kf, ks, m0f, m0s = (u(par[k]) for k in ("r1", "rx", "kf", "ks", "m0f", "m0s"))
    d = dpar
    d_dc = -t * (d["r2f"] * dc + d["dw"] * ds)
    d_ds = -t * (d["r2f"] * ds - d["dw"] * dc)
    e1 = torch.exp(-t * r1)
    de1 = -t * e1 * d["r1"]
    frac = _exchange_fraction(rx, t)
    dfrac = _exchange_fraction_drx(rx, t) * d["rx"]
    dl11 = de1 * (1 - frac * kf) - e1 * (dfrac * kf + frac * d["kf"])
    dl12 = de1 * frac * ks + e1 * (dfrac * ks + frac * d["ks"])
    dl21 = de1 * frac * kf + e1 * (dfrac * kf + frac * d["kf"])
    dl22 = de1 * (1 - frac * ks) - e1 * (dfrac * ks + frac * d["ks"])
    do1 = d["m0f"] * (1 - l11) - dl11 * m0f - dl12 * m0s - l12 * d["m0s"]
    do2 = d["m0s"] * (1 - l22) - dl21 * m0f - l21 * d["m0f"] - dl22 * m0s
    return d_dc, d_ds, dl11, dl12, dl21, dl22, do1, do2


def _apply_free(h, x: torch.Tensor, lam: float) -> torch.Tensor:
    """Free precession ``h`` (from :func:`_free_precession`) after the map ``x`` ``[4, 5, ...]``."""
    dc, ds, l11, l12, l21, l22, o1, o2 = h
    r0 = dc * x[0] + ds * x[1]
    r1 = dc * x[1] - ds * x[0]
    e4 = _last_column(lam, x)[0]
    r2 = torch.addcmul(l11 * x[2] + l12 * x[3], o1, e4)
    r3 = torch.addcmul(l21 * x[2] + l22 * x[3], o2, e4)
    return torch.stack([r0, r1, r2, r3])


def _apply_free_tangent(h, dh, x, dx, lam: float) -> torch.Tensor:
    """Tangent of ``_apply_free(h, x, lam)``: it is bilinear in (coefficients, map)."""
    u = lambda v: v.unsqueeze(-2)  # noqa: E731
    return _apply_free(dh, u(x), lam) + _apply_free(tuple(u(c) for c in h), dx, 0.0)


#: tangent axis order of :func:`hybrid_state_jacobian`
JACOBIAN_PARAMETERS = ("m0s", "t1", "t2f", "t2s", "rx", "b0_hz", "b1")


def _parameter_tangents(p: dict, sat, t2s, b0_hz):
    """Tangents ``[1, 7, B]`` of the derived quantities w.r.t. ``JACOBIAN_PARAMETERS`` (one-hot
    columns where a quantity depends on one parameter), and of the saturation integrals ``sat(t2s,
    b0_hz)`` ``[U, 7, B]`` (forward-mode AD of :func:`saturation_rate`: a small ``[U, B]`` quadrature
    outside the recursion)."""
    zero = torch.zeros((1, 7) + p["r1"].shape[1:], dtype=p["r1"].dtype)

    def tangent(**cols):
        out = zero.clone()
        for name, v in cols.items():
            out[:, JACOBIAN_PARAMETERS.index(name)] = v
        return out

    d = {"m0s": tangent(m0s=1.0), "m0f": tangent(m0s=-1.0), "r1": tangent(t1=-p["r1"] ** 2),
         "r2f": tangent(t2f=-p["r2f"] ** 2), "dw": tangent(b0_hz=2 * math.pi), "rx": tangent(rx=1.0),
         "kf": tangent(m0s=p["rx"], rx=p["m0s"]), "ks": tangent(m0s=-p["rx"], rx=p["m0f"]), "b1": tangent(b1=1.0)}
    t2s, b0_hz = t2s.clone(), b0_hz.clone()  # broadcast (stride-0) views cannot carry tangents
    one, nil = torch.ones_like(t2s), torch.zeros_like(t2s)
    _, h_t2s = torch.func.jvp(sat, (t2s, b0_hz), (one, nil))
    _, h_b0 = torch.func.jvp(sat, (t2s, b0_hz), (nil, one))
    dh = torch.zeros((h_t2s.shape[0], 7, h_t2s.shape[1]), dtype=h_t2s.dtype)
    dh[:, JACOBIAN_PARAMETERS.index("t2s")] = h_t2s
    dh[:, JACOBIAN_PARAMETERS.index("b0_hz")] = h_b0
    return d, dh


def hybrid_state_signal(
    m0s: torch.Tensor | float,
    t1: torch.Tensor | float,
    t2f: torch.Tensor | float,
    t2s: torch.Tensor | float,
    rx: torch.Tensor | float,
    b0_hz: torch.Tensor | float,
    b1: torch.Tensor | float,
    *,
    flip_rad: torch.Tensor,
    pulse_dur: torch.Tensor,
    tr: float,
    lineshape: str = "superlorentzian",
    inversion_dur: float = 1.0e-3,
    alternate_sign: bool = True,
    time_chunk: int | None = None,
    return_state: bool = False,
):
    """Anti-periodic steady-state echoes ``[..., Nt]`` (complex) of the two-pool model.

    Parameters broadcast over leading dims; SI units (s, Hz, 1/s for ``rx``). ``flip_rad`` and
    ``pulse_dur`` are ``[Nt]``; ``tr`` (s) is common. With ``return_state=True`` also returns the
    steady-state ``[Mx, My, Mz_f, Mz_s]`` just before the inversion, ``[..., 4]``.
    """
    signal, _, x = _hybrid_state((m0s, t1, t2f, t2s, rx, b0_hz, b1), flip_rad, pulse_dur, tr, lineshape,
                                 inversion_dur, alternate_sign, time_chunk, jacobian=False)
    return (signal, x) if return_state else signal


def hybrid_state_jacobian(
    m0s: torch.Tensor | float,
    t1: torch.Tensor | float,
    t2f: torch.Tensor | float,
    t2s: torch.Tensor | float,
    rx: torch.Tensor | float,
    b0_hz: torch.Tensor | float,
    b1: torch.Tensor | float,
    *,
    flip_rad: torch.Tensor,
    pulse_dur: torch.Tensor,
    tr: float,
    lineshape: str = "superlorentzian",
    inversion_dur: float = 1.0e-3,
    alternate_sign: bool = True,
    time_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hybrid_state_signal(...), ∂/∂θ)``: echoes ``[..., Nt]`` and their exact derivatives
    ``[..., Nt, 7]`` (complex) w.r.t. ``JACOBIAN_PARAMETERS`` = (m0s, T1, T2f, T2s, Rx, ΔB0, B1), per
    SI unit (s, 1/s, Hz), in one pass.

    Forward mode written out through the same recursion: every affine map carries its 7 tangents
    (``[4, 5, ..., 7, B]``, the batch last), each product ``AB`` becomes ``dA·B + A·dB`` (the pulse
    exponentials' Taylor series, the free precession, the cycle), the fixed point's tangent is
    ``(I − C)⁻¹(dC x* + dc)``. Only the saturation integral's derivatives (per distinct pulse
    duration) come from ``torch.func.jvp``. ``tests/test_physics_qmt.py`` checks it against
    ``torch.func`` and central differences; it costs ~15× the signal (one product per tangent
    and side), while ``torch.func.jvp`` through the loop of small ops costs ~180×.
    """
    signal, jac, _ = _hybrid_state((m0s, t1, t2f, t2s, rx, b0_hz, b1), flip_rad, pulse_dur, tr, lineshape,
                                   inversion_dur, alternate_sign, time_chunk, jacobian=True)
    return signal, jac


def _hybrid_state(params, flip_rad, pulse_dur, tr, lineshape, inversion_dur, alternate_sign, time_chunk, *,
                  jacobian: bool):
    """The one pass behind :func:`hybrid_state_signal` and :func:`hybrid_state_jacobian`:
    ``(signal [..., Nt], jacobian [..., Nt, 7] or None, state [..., 4])``."""
    m0s, t1, t2f, t2s, rx, b0_hz, b1 = _params(*params)
    dtype = t1.dtype
    shape = torch.broadcast_shapes(m0s.shape, t1.shape, t2f.shape, t2s.shape, rx.shape, b0_hz.shape, b1.shape)
    flip = torch.as_tensor(flip_rad, dtype=dtype).reshape(-1)
    tau = torch.as_tensor(pulse_dur, dtype=dtype).reshape(-1)
    nt = flip.numel()
    if tau.numel() != nt:
        raise ValueError(f"qMT schedule: {nt} flip angles but {tau.numel()} pulse durations")
    if (tau <= 0).any() or (tau >= tr).any():
        raise ValueError(f"qMT schedule: pulse durations must lie in (0, TR={tr} s)")
    sign = (-1.0) ** torch.arange(nt, dtype=dtype) if alternate_sign else torch.ones(nt, dtype=dtype)

    # Flatten the broadcast parameters to [1, B]: the batch runs last, the time axis before it.
    p = [x.expand(shape).reshape(1, -1) for x in (m0s, t1, t2f, t2s, rx, b0_hz, b1)]
    m0s, t1, t2f, t2s, rx, b0_hz, b1 = p
    m0f = 1.0 - m0s
    r1, r2f = 1.0 / t1, 1.0 / t2f
    kf, ks = rx * m0s, rx * m0f
    dw = 2 * math.pi * b0_hz
    par = dict(r1=r1, r2f=r2f, dw=dw, kf=kf, ks=ks, m0f=m0f, m0s=m0s)

    # Saturation depends on the pulse only through τ (and ω1² ∝ α²): evaluate it per distinct τ.
    all_tau = torch.cat([tau, torch.as_tensor([inversion_dur], dtype=dtype)])
    uniq, inverse = torch.unique(all_tau, return_inverse=True)

    def sat(t2s_, b0_):
        return saturation_rate(torch.ones((), dtype=dtype), uniq[:, None], t2s_, b0_, lineshape)  # [U, B]

    h = sat(t2s, b0_hz)[inverse]  # [Nt + 1, B]
    u = lambda v: v.unsqueeze(-2)  # noqa: E731  values [..., B] against tangents [..., 7, B]
    if jacobian:
        dpar, dh = _parameter_tangents(dict(par, rx=rx), sat, t2s, b0_hz)
        dh = dh[inverse]  # [Nt + 1, 7, B]
    else:
        dpar = dh = None

    def pulses(alpha, tau_, h_, dh_):  # [T] flips and durations, [T, B] rates -> propagators [4, 5, T, B]
        alpha, tau_ = alpha[:, None], tau_[:, None]
        omega1 = b1 * alpha / tau_
        gen = _pulse_generator(omega1, omega1**2 * h_, **par) * tau_
        if dh_ is None:
            return _expm_affine(gen), None
        d_omega1 = dpar["b1"] * u(alpha / tau_)
        d_rrf = 2 * u(omega1 * h_) * d_omega1 + u(omega1**2) * dh_
        d_cf = dpar["r1"] * u(m0f) + u(r1) * dpar["m0f"]
        d_cs = dpar["r1"] * u(m0s) + u(r1) * dpar["m0s"]
        dgen = _generator_from_entries(d_omega1, d_rrf, dpar["r1"], dpar["r2f"], dpar["dw"], dpar["kf"],
                                       dpar["ks"], d_cf, d_cs) * u(tau_)
        return _expm_affine(gen, dgen)

    def then_free(free, dfree, x, dx):  # free precession after the map x (and its tangent)
        return _apply_free(free, x, 1.0), None if dx is None else _apply_free_tangent(free, dfree, x, dx, 1.0)

    # Pass over one cycle: the cycle map q (inversion, then every TR) and, for each TR, the rows
    # of the map from the cycle start to the echo (the echo is read off once x* is known).
    q, dq = pulses(torch.full((1,), math.pi, dtype=dtype), all_tau[-1:], h[-1:], None if dh is None else dh[-1:])
    q, dq = q[:, :, 0], None if dq is None else dq[:, :, 0]  # [4, 5, B], [4, 5, 7, B]
    echo_rows, d_echo_rows = [], []
    # TRs per batched pulse computation: ~8k maps per elementwise op keeps the operands in cache.
    time_chunk = time_chunk or max(1, 8192 // max(1, r1.shape[-1]))
    for start in range(0, nt, time_chunk):
        sl = slice(start, min(start + time_chunk, nt))
        free = _free_precession(0.5 * (tr - tau[sl, None]), rx=rx, **par)  # each [T, B]
        dfree = None if dh is None else _free_precession_tangent(0.5 * (tr - tau[sl, None]), free,
                                                                 dict(par, rx=rx), dpar)
        to_echo, d_to_echo = then_free(free, dfree, *pulses(sign[sl] * flip[sl], tau[sl], h[sl],
                                                            None if dh is None else dh[sl]))
        full_tr, d_full_tr = then_free(free, dfree, to_echo, d_to_echo)
        starts, d_starts = [], []  # the cycle map up to the start of each TR of the chunk
        for k in range(to_echo.shape[2]):
            starts.append(q)
            if dq is not None:
                d_starts.append(dq)
                dq = _mul(u(full_tr[:, :, k]), dq, 0.0, plus=_mul(d_full_tr[:, :, k], u(q), 1.0))
            q = _mul(full_tr[:, :, k], q, 1.0)
        starts = torch.stack(starts, 2)
        echo_rows.append(sign[sl, None] * _mul(to_echo[:2], starts, 1.0))
        if dq is not None:
            d_rows = _mul(u(to_echo[:2]), torch.stack(d_starts, 2), 0.0, plus=_mul(d_to_echo[:2], u(starts), 1.0))
            d_echo_rows.append(sign[sl, None, None] * d_rows)
    cycle, offset = q[:, :4].permute(2, 0, 1), q[:, 4].T  # [B, 4, 4], [B, 4]
    # Fixed point of one cycle. An explicit 4×4 inverse rather than linalg.solve/lu_solve: in
    # torch 2.13 their forward-mode derivatives under vmap (CRB via jacfwd) return NaN beyond the
    # first batch element; I − C is well conditioned (every cycle relaxes towards equilibrium).
    inv = torch.linalg.inv(torch.eye(4, dtype=dtype) - cycle)
    x = (inv @ offset[..., None])[..., 0]  # [B, 4]
    rows = torch.cat(echo_rows, 2)  # [2, 5, Nt, B]
    mxy = (rows[:, :4] * x.T[None, :, None]).sum(1) + rows[:, 4]  # [2, Nt, B]
    signal = torch.complex(mxy[0], mxy[1]).T.reshape(shape + (nt,))
    jac = None
    if dq is not None:
        # x* = C x* + c  =>  dx* = (I − C)⁻¹ (dC x* + dc)
        d_cycle, d_offset = dq[:, :4].permute(3, 2, 0, 1), dq[:, 4].permute(2, 1, 0)  # [B, 7, 4, 4], [B, 7, 4]
        dx = (inv[:, None] @ ((d_cycle @ x[:, None, :, None])[..., 0] + d_offset)[..., None])[..., 0]  # [B, 7, 4]
        d_rows = torch.cat(d_echo_rows, 2)  # [2, 5, Nt, 7, B]
        d_mxy = ((d_rows[:, :4] * x.T[None, :, None, None]).sum(1) + d_rows[:, 4]
                 + (u(rows[:, :4]) * dx.permute(2, 1, 0)[None, :, None]).sum(1))  # [2, Nt, 7, B]
        jac = torch.complex(d_mxy[0], d_mxy[1]).permute(2, 0, 1).reshape(shape + (nt, 7))
    return signal, jac, x.reshape(shape + (4,))
