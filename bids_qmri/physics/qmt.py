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

__all__ = ["hybrid_state_signal", "default_qmt_schedule", "saturation_rate", "LINESHAPES"]

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


def default_qmt_schedule() -> dict:
    """Our hybrid-state qMT train in the spirit of seed 003 (the published schedule is not given).

    4-s cycle at TR 3.5 ms (1142 TRs) after a 1-ms rectangular inversion. Six segments of ~190
    TRs, each a half-sine flip-angle lobe ``α = peak·sin(π(m+½)/L)`` with one pulse duration:
    (τ, peak) = (0.30 ms, 90°), (0.80 ms, 140°), (0.25 ms, 60°), (1.00 ms, 170°), (0.40 ms,
    120°), (0.60 ms, 45°). Short, strong pulses saturate the semi-solid pool more than long ones
    of similar flip, which encodes m0s, Rx and T2s; the RF amplitude stays below 25 µT.
    Returns ``dict(flip_rad=[Nt], pulse_dur=[Nt], tr=float, inversion_dur=float)`` (float64).
    """
    tr = 3.5e-3
    n_tr = int(4.0 / tr)
    segments = [(0.30e-3, 90.0), (0.80e-3, 140.0), (0.25e-3, 60.0), (1.00e-3, 170.0), (0.40e-3, 120.0), (0.60e-3, 45.0)]
    bounds = np.linspace(0, n_tr, len(segments) + 1).round().astype(int)
    flip, dur = np.zeros(n_tr), np.zeros(n_tr)
    for (tau, peak), lo, hi in zip(segments, bounds[:-1], bounds[1:]):
        m = np.arange(hi - lo)
        flip[lo:hi] = math.radians(peak) * np.sin(np.pi * (m + 0.5) / (hi - lo))
        dur[lo:hi] = tau
    return {"flip_rad": torch.from_numpy(flip), "pulse_dur": torch.from_numpy(dur), "tr": tr, "inversion_dur": 1.0e-3}


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


def _expm_affine(x: torch.Tensor) -> torch.Tensor:
    """``exp`` of generators ``[4, 5, ...]`` (implicit last row 0): propagators ``[4, 5, ...]``.

    Taylor series of degree m by Paterson–Stockmeyer (p + (m+1)/p − 2 products) after scaling by
    2^−s per element, then s squarings (masked per element, so that it also runs under vmap).
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
    result, lam = block(n_blocks - 1), coef[(n_blocks - 1) * p]
    for j in range(n_blocks - 2, -1, -1):
        result, lam = _mul(powers[p], result, lam, plus=block(j)), coef[j * p]
    for k in range(int(_concrete_max(s, s_max))):
        result = torch.where(s > k, _mul(result, result, 1.0), result)
    return result


def _pulse_generator(omega1, rrf, r1, r2f, dw, kf, ks, m0f, m0s):
    """Affine generator ``[4, 5, ...]`` of the Bloch–McConnell equations during a pulse."""
    zero = torch.zeros_like(omega1 + rrf + r1 + dw + kf)
    z = lambda t: t.expand_as(zero)  # noqa: E731
    rows = [
        [z(-r2f), z(dw), zero, zero, zero],
        [z(-dw), z(-r2f), z(omega1), zero, zero],
        [zero, z(-omega1), z(-r1 - kf), z(ks), z(r1 * m0f)],
        [zero, zero, z(kf), z(-r1 - ks - rrf), z(r1 * m0s)],
    ]
    return torch.stack([torch.stack(r) for r in rows])


def _free_precession(t, r1, r2f, dw, rx, kf, ks, m0f, m0s):
    """Closed-form free precession for time ``t``: the coefficients of its block structure.

    Transverse rotation/decay ``e^{−t/T2f}(cos, sin)``; longitudinal ``e^{−t/T1}(I + K(1 − e^{−Rx t})/Rx)``
    with the exchange matrix ``K`` (eigenvalues 0 and −Rx) and the offset that keeps equilibrium.
    """
    decay = torch.exp(-t * r2f)
    e1 = torch.exp(-t * r1)
    rxt = rx * t
    # (1 − e^{−Rx t})/Rx, with its series near Rx = 0
    safe_rx = torch.where(rxt > 1e-6, rx, torch.ones_like(rx))
    frac = torch.where(rxt > 1e-6, -torch.expm1(-safe_rx * t) / safe_rx, t * (1 - 0.5 * rxt))
    l11, l12 = e1 * (1 - frac * kf), e1 * frac * ks
    l21, l22 = e1 * frac * kf, e1 * (1 - frac * ks)
    o1 = m0f - (l11 * m0f + l12 * m0s)
    o2 = m0s - (l21 * m0f + l22 * m0s)
    return decay * torch.cos(dw * t), decay * torch.sin(dw * t), l11, l12, l21, l22, o1, o2


def _apply_free(h, x: torch.Tensor, lam: float) -> torch.Tensor:
    """Free precession ``h`` (from :func:`_free_precession`) after the map ``x`` ``[4, 5, ...]``."""
    dc, ds, l11, l12, l21, l22, o1, o2 = h
    r0 = dc * x[0] + ds * x[1]
    r1 = dc * x[1] - ds * x[0]
    e4 = _last_column(lam, x)[0]
    r2 = torch.addcmul(l11 * x[2] + l12 * x[3], o1, e4)
    r3 = torch.addcmul(l21 * x[2] + l22 * x[3], o2, e4)
    return torch.stack([r0, r1, r2, r3])


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
    m0s, t1, t2f, t2s, rx, b0_hz, b1 = _params(m0s, t1, t2f, t2s, rx, b0_hz, b1)
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
    h = saturation_rate(torch.ones((), dtype=dtype), uniq[:, None], t2s, b0_hz, lineshape)  # [U, B]
    h = h[inverse]  # [Nt + 1, B]

    def pulses(alpha, tau_, h_):  # [T] flips and durations, [T, B] rates -> propagators [4, 5, T, B]
        alpha, tau_ = alpha[:, None], tau_[:, None]
        omega1 = b1 * alpha / tau_
        return _expm_affine(_pulse_generator(omega1, omega1**2 * h_, **par) * tau_)

    # Pass over one cycle: the cycle map q (inversion, then every TR) and, for each TR, the rows
    # of the map from the cycle start to the echo (the echo is read off once x* is known).
    q = pulses(torch.full((1,), math.pi, dtype=dtype), all_tau[-1:], h[-1:])[:, :, 0]  # [4, 5, B]
    echo_rows = []
    # TRs per batched pulse computation: ~8k maps per elementwise op keeps the operands in cache.
    time_chunk = time_chunk or max(1, 8192 // max(1, r1.shape[-1]))
    for start in range(0, nt, time_chunk):
        sl = slice(start, min(start + time_chunk, nt))
        free = _free_precession(0.5 * (tr - tau[sl, None]), rx=rx, **par)  # each [T, B]
        to_echo = _apply_free(free, pulses(sign[sl] * flip[sl], tau[sl], h[sl]), 1.0)
        full_tr = _apply_free(free, to_echo, 1.0)
        starts = []  # the cycle map up to the start of each TR of the chunk
        for k in range(to_echo.shape[2]):
            starts.append(q)
            q = _mul(full_tr[:, :, k], q, 1.0)
        echo_rows.append(sign[sl, None] * _mul(to_echo[:2], torch.stack(starts, 2), 1.0))
    cycle, offset = q[:, :4].permute(2, 0, 1), q[:, 4].T  # [B, 4, 4], [B, 4]
    # Fixed point of one cycle. An explicit 4×4 inverse rather than linalg.solve/lu_solve: in
    # torch 2.13 their forward-mode derivatives under vmap (CRB via jacfwd) return NaN beyond the
    # first batch element; I − C is well conditioned (every cycle relaxes towards equilibrium).
    x = (torch.linalg.inv(torch.eye(4, dtype=dtype) - cycle) @ offset[..., None])[..., 0]  # [B, 4]
    rows = torch.cat(echo_rows, 2)  # [2, 5, Nt, B]
    mxy = (rows[:, :4] * x.T[None, :, None]).sum(1) + rows[:, 4]  # [2, Nt, B]
    signal = torch.complex(mxy[0], mxy[1]).T.reshape(shape + (nt,))
    x = x.reshape(shape + (4,))
    return (signal, x) if return_state else signal
