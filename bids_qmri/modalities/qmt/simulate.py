"""Training sets for the qMT networks (seed 003 §2.5): parameters, compressed fingerprints and the
Cramér–Rao bound of every sample over all 8 model parameters.

Parameters (seed 003 "truncated Gaussian distributions", in our units; the seed gives no T2s
distribution and no lower limits for T1/T2f, so those are ours and marked *):

========  =====================================  =====================================
m0s       N(0.12, 0.08) truncated to [0, 0.5]*   semi-solid fraction (m0s + m0f = 1)
T1        N(1.6, 0.8) s truncated to [0.1*, 6*]  apparent T1 of both pools
T2f       N(0.1, 0.2) s truncated to [5 ms*, T1] free-pool T2 (T2f ≤ T1 as in the seed)
T2s       N(12, 3) µs truncated to [5, 20] µs*   semi-solid T2 (Gloor et al.: ~12 µs in WM)
Rx        N(44, 20) /s truncated to [0, 150*]    exchange rate (kf = Rx·m0s)
B0        uniform on [−1/TR, 1/TR] Hz            seed: ω ∈ [−2π/TR, 2π/TR] rad/s
B1        N(1, 0.3) truncated to [0.3*, 1.7*]    achieved / nominal flip angle
M0        |M0| ~ U[0.1, 1], phase ~ U[0, 2π)     drawn afresh every epoch (not stored)
========  =====================================  =====================================

Truncation is by redrawing the offending values (rejection), so each marginal is the truncated
Gaussian. Fingerprints are the exact ``physics.qmt.hybrid_state_signal`` of the schedule,
projected on the data's basis (``c = s @ U``, ``U`` ``[Nt, R]`` with orthonormal columns), with
M0 = 1. Noise is white in the coefficients (σ per real channel), so with ``M0`` and ``σ`` the
Fisher information of the coefficients over the 9 real unknowns
``θ = (m0s, T1, T2f, T2s, Rx, B0, B1, Re M0, Im M0)`` is ``Re(Jᴴ J)|M0|²/σ²`` in the 7 physical
columns: the stored ``crb_unit`` (M0 = 1, σ = 1) times ``σ²/|M0|²`` is the CRB of the sample at
any scale and noise (a global phase of M0 only rotates the M0 columns, which span the same
plane). ``J = ∂c/∂θ`` comes from ``physics.qmt.hybrid_state_jacobian`` (forward mode written out
through the recursion, all 7 tangents in one batched pass: ~23 CPU-ms per sample against ~280
through ``torch.func.jvp``; ``benchmarks/bench_qmt.py``); the M0 columns are analytic (``c`` and
``i·c``). The inverse is taken on the Fisher matrix scaled to unit
diagonal with a pseudo-inverse, so a sample whose nuisance parameters are not identifiable
(m0s → 0 makes Rx and T2s invisible) still gets finite bounds for the others.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from bids_qmri.physics import qmt, svd

LOGGER = logging.getLogger("bids_qmri.modalities.qmt.simulate")

__all__ = ["PARAMETERS", "DISTRIBUTIONS", "sample_parameters", "fingerprints", "coefficient_jacobian",
           "crb_from_jacobian", "fisher_from_jacobian", "prior_precision", "prior_informed_bound",
           "widened_distributions", "check_widen", "parse_widen", "widen_factors",
           "PHYSICAL_LIMITS", "simulate_set", "set_from_theta", "effective_directions", "fisher_basis"]

#: The 7 physical parameters, in the order of every ``[N, 7]`` array of this module (SI units).
PARAMETERS = ("m0s", "T1", "T2f", "T2s", "Rx", "B0", "B1")
#: name -> (mean, sd, low, high) of the truncated Gaussians (B0 is uniform on ±1/TR, see above).
DISTRIBUTIONS = {
    "m0s": (0.12, 0.08, 0.0, 0.5),
    "T1": (1.6, 0.8, 0.1, 6.0),
    "T2f": (0.1, 0.2, 5e-3, 6.0),  # and ≤ T1
    "T2s": (12e-6, 3e-6, 5e-6, 20e-6),
    "Rx": (44.0, 20.0, 0.0, 150.0),
    "B1": (1.0, 0.3, 0.3, 1.7),
}
M0_ABS_RANGE = (0.1, 1.0)
NOISE_SIGMA = 0.01  # per real channel: SNR_max = |M0|/σ in [10, 100] (seed 003)
CHUNK = 512
#: samples per Jacobian pass: the tangents make each map 8× larger, so a smaller batch stays in cache
JACOBIAN_CHUNK = 256


def _truncated(mean, sd, lo, hi, n, gen, upper=None):
    out = torch.empty(n, dtype=torch.float64)
    todo = torch.arange(n)
    while len(todo):
        v = mean + sd * torch.randn(len(todo), generator=gen, dtype=torch.float64)
        top = hi if upper is None else torch.minimum(torch.full_like(v, hi), upper[todo])
        ok = (v >= lo) & (v <= top)
        out[todo[ok]] = v[ok]
        todo = todo[~ok]
    return out


#: physical limits a widened training distribution (``widened_distributions``) is clipped to
PHYSICAL_LIMITS = {"m0s": (0.0, 0.8), "T1": (0.05, 10.0), "T2f": (2e-3, 10.0), "T2s": (2e-6, 40e-6),
                   "Rx": (0.0, 300.0), "B1": (0.1, 2.5)}


def widened_distributions(widen: dict | None = None) -> dict:
    """``DISTRIBUTIONS`` with the parameters named in ``widen`` (name -> factor ≥ 1) widened about
    their mean: SD × factor and each truncation limit moved ``factor`` times as far from the mean,
    clipped to ``PHYSICAL_LIMITS`` (issue 16: a training distribution wider than seed 003's, which stays
    the evaluation distribution, so that the evaluation region is away from the training edges and
    a network leans less on the prior). B0 (uniform over ±1/TR, a full period of the off-resonance
    phase per TR) and M0 are not widened. ``None`` or ``{}``: seed 003's distributions."""
    widen = check_widen(widen)
    out = dict(DISTRIBUTIONS)
    for name, f in widen.items():
        mean, sd, lo, hi = DISTRIBUTIONS[name]
        plo, phi = PHYSICAL_LIMITS[name]
        out[name] = (mean, sd * f, max(plo, mean - f * (mean - lo)), min(phi, mean + f * (hi - mean)))
    return out


def check_widen(widen: dict | None) -> dict:
    """``widen`` as a plain ``{name: float}`` without factors of 1; ValueError (one line) otherwise."""
    out = {}
    for name, f in (widen or {}).items():
        try:
            f = float(f)
        except (TypeError, ValueError):
            f = math.nan
        if name not in DISTRIBUTIONS or not (math.isfinite(f) and 1.0 <= f <= 10.0):
            raise ValueError(f"widen {name}={f!r}: give factors in [1, 10] for "
                             f"{', '.join(DISTRIBUTIONS)} (B0 and M0 are not widened)")
        if f != 1.0:
            out[name] = f
    return out


def parse_widen(items) -> dict:
    """``["m0s=2", "Rx=1.5", ...]`` (the command lines' ``NAME=FACTOR``) -> ``check_widen``'s dict;
    ValueError (one line) for a bad item."""
    return check_widen(dict(w.split("=", 1) if "=" in w else (w, "") for w in items or ()))


def widen_factors(widen: dict | None) -> torch.Tensor:
    """``[7]`` factors in ``PARAMETERS`` order (1 = seed 003's distribution): what a set records."""
    widen = check_widen(widen)
    return torch.tensor([widen.get(k, 1.0) for k in PARAMETERS], dtype=torch.float64)


def sample_parameters(n: int, tr: float, gen: torch.Generator, widen: dict | None = None) -> torch.Tensor:
    """``[n, 7]`` float64 parameters (``PARAMETERS`` order) from the distributions above, or from
    ``widened_distributions(widen)``."""
    d = widened_distributions(widen)
    m0s = _truncated(*d["m0s"], n, gen)
    t1 = _truncated(*d["T1"], n, gen)
    t2f = _truncated(*d["T2f"], n, gen, upper=t1)
    t2s = _truncated(*d["T2s"], n, gen)
    rx = _truncated(*d["Rx"], n, gen)
    b0 = (2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1) / tr
    b1 = _truncated(*d["B1"], n, gen)
    return torch.stack([m0s, t1, t2f, t2s, rx, b0, b1], 1)


def _signal_fn(schedule: dict, basis: torch.Tensor, dtype):
    u = torch.as_tensor(basis).to(torch.complex64 if dtype == torch.float32 else torch.complex128)

    def fn(theta: torch.Tensor) -> torch.Tensor:
        return qmt.hybrid_state_signal(*theta.unbind(-1), **schedule) @ u

    return fn


def fingerprints(theta: torch.Tensor, schedule: dict, basis: torch.Tensor, *, chunk: int = CHUNK,
                 dtype=torch.float32) -> torch.Tensor:
    """Compressed noise-free fingerprints ``[N, R]`` (complex128 out; simulated in ``dtype`` chunks)."""
    fn = _signal_fn(schedule, basis, dtype)
    out = [fn(theta[i:i + chunk].to(dtype)).to(torch.complex128) for i in range(0, len(theta), chunk)]
    return torch.cat(out) if out else torch.zeros((0, basis.shape[1]), dtype=torch.complex128)


def coefficient_jacobian(theta: torch.Tensor, schedule: dict, basis: torch.Tensor | None, *,
                         chunk: int = JACOBIAN_CHUNK, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c [N, R], ∂c/∂θ [N, R, 7])`` (complex128): the physics layer's forward-mode Jacobian
    (``physics.qmt.hybrid_state_jacobian``, value and derivatives in one pass) on the basis, or of
    the full signal (R = the schedule's frames) when ``basis`` is None."""
    u = None if basis is None else torch.as_tensor(basis).to(torch.complex64 if dtype == torch.float32
                                                             else torch.complex128)
    cs, js = [], []
    for i in range(0, len(theta), chunk):
        s, j = qmt.hybrid_state_jacobian(*theta[i:i + chunk].to(dtype).unbind(-1), **schedule)
        cs.append((s if u is None else s @ u).to(torch.complex128))
        js.append((j if u is None else (j.transpose(-1, -2) @ u).transpose(-1, -2)).to(torch.complex128))
    if not cs:
        r = len(schedule["flip_rad"]) if basis is None else basis.shape[1]
        return torch.zeros((0, r), dtype=torch.complex128), torch.zeros((0, r, 7), dtype=torch.complex128)
    return torch.cat(cs), torch.cat(js)


def fisher_from_jacobian(c: torch.Tensor, jac: torch.Tensor, sigma: float | torch.Tensor = 1.0,
                         m0: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Fisher matrix ``[N, 9, 9]`` over ``(θ [7], Re M0, Im M0)`` from ``c`` ``[N, R]`` and ``∂c/∂θ``
    ``[N, R, 7]`` (at M0 = 1), for a complex scale ``m0`` and noise ``σ`` per real channel:
    ``Re(Jᴴ J)/σ²`` with ``J = [m0·∂c/∂θ, c, i·c]``."""
    c = c.to(torch.complex128)
    m0 = torch.as_tensor(m0, dtype=torch.complex128)
    m0 = m0[..., None, None] if m0.dim() else m0
    full = torch.cat([m0 * jac.to(torch.complex128), c[..., None], 1j * c[..., None]], -1)
    return (full.mH @ full).real / torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1) ** 2


def _inverse_diagonal(f: torch.Tensor) -> torch.Tensor:
    """``diag(f⁻¹)`` of symmetric PSD matrices ``[N, P, P]``, inverted scaled to unit diagonal with a
    pseudo-inverse (a parameter the data cannot identify keeps finite bounds for the others)."""
    d = f.diagonal(dim1=-2, dim2=-1).clamp_min(1e-300).rsqrt()
    scaled = f * d[..., :, None] * d[..., None, :]
    inv = torch.linalg.pinv(scaled, rtol=1e-13, hermitian=True)
    return inv.diagonal(dim1=-2, dim2=-1) * d * d


def crb_from_jacobian(c: torch.Tensor, jac: torch.Tensor, sigma: float | torch.Tensor = 1.0,
                      m0: float | torch.Tensor = 1.0) -> torch.Tensor:
    """CRB ``[N, 7]`` of the physical parameters: ``diag(F⁻¹)`` of ``fisher_from_jacobian``."""
    return _inverse_diagonal(fisher_from_jacobian(c, jac, sigma, m0))[..., :7]


def prior_precision(tr: float, widen: dict | None = None, *, n: int = 200_000, seed: int = 0) -> torch.Tensor:
    """``[9]`` diagonal prior precision ``1/var`` over ``(θ [7], Re M0, Im M0)`` of the training
    distribution (Gaussian approximation): the variance of each physical parameter as drawn by
    ``sample_parameters`` (``n`` Monte Carlo draws, so the truncations and T2f ≤ T1 are included;
    B0 uniform: width²/12), and 0 for M0: the networks see unit-norm, phase-removed coefficients, so
    they cannot use the M0 prior (it acts as a flat one)."""
    theta = sample_parameters(n, tr, torch.Generator().manual_seed(seed), widen=widen)
    return torch.cat([1.0 / theta.var(0), torch.zeros(2, dtype=torch.float64)])


def prior_informed_bound(fisher: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Prior-informed bound ``[N, 7]`` = ``diag((F + P)⁻¹)`` of the physical parameters (issue 16):
    ``fisher`` ``[N, 9, 9]`` the Fisher matrix of the CRB (``fisher_from_jacobian``: same basis, σ, M0
    and parameterisation), ``P = diag(precision)`` (``[9]`` or ``[N, 9]``, e.g. ``prior_precision``).
    For a linear-Gaussian model it is the posterior covariance, and it is the Bayesian (Van Trees)
    bound on the prior-averaged MSE: an estimator that uses the prior can have a variance below the
    CRB, which bounds unbiased estimators only. ``precision`` 0 gives ``crb_from_jacobian``."""
    p = torch.as_tensor(precision, dtype=torch.float64)
    return _inverse_diagonal(fisher + torch.diag_embed(p.expand(*fisher.shape[:-1])))[..., :7]


def effective_directions(s: torch.Tensor, jac: torch.Tensor, targets=(0, 1, 2)) -> torch.Tensor:
    """``[N, len(targets), Nt]``: each target's Jacobian column ``∂s/∂θ_k`` minus its (real) least-squares
    projection on the nuisance columns (the other physical parameters and the M0 columns ``s``, ``i·s``),
    i.e. the part of the signal change that no nuisance can mimic. Their norms alone give the Fisher
    information of the targets with the nuisances free, so a basis that keeps them keeps the CRB."""
    s, jac = s.to(torch.complex128), jac.to(torch.complex128)
    nuis = [k for k in range(jac.shape[-1]) if k not in targets]
    cols = torch.cat([jac, s[..., None], 1j * s[..., None]], -1).transpose(-1, -2)  # [N, 9, Nt]
    real = torch.view_as_real(cols).flatten(-2)  # [N, 9, 2Nt]: the real inner product of the Fisher matrix
    n = real[:, nuis + [jac.shape[-1], jac.shape[-1] + 1]]
    n = n / torch.linalg.vector_norm(n, dim=-1, keepdim=True).clamp_min(1e-300)
    t = real[:, list(targets)]
    coef = torch.linalg.pinv(n.transpose(-1, -2), rtol=1e-10) @ t.transpose(-1, -2)  # [N, nuis, targets]
    g = t - (n.transpose(-1, -2) @ coef).transpose(-1, -2)
    return torch.view_as_complex(g.reshape(*g.shape[:-1], -1, 2).contiguous())


def fisher_basis(s: torch.Tensor, jac: torch.Tensor, rank: int, *, targets=(0, 1, 2),
                 reference: torch.Tensor | None = None) -> torch.Tensor:
    """A rank-``rank`` temporal basis ``[Nt, rank]`` (orthonormal, complex128) that keeps the Fisher
    information of the targets (issue 16): the leading right singular vectors of the atoms' signals
    ``s [N, Nt]`` stacked with their ``effective_directions``, each row scaled to unit norm (so every
    atom's signal and every target's unmimickable change weigh alike). A plain SVD of the signals keeps
    their energy, which is dominated by what the nuisances and M0 do, and drops the small directions
    that tell the targets apart from T2s, Rx and B1. ``reference`` (e.g. the plain SVD basis of
    the same atoms): the result is rotated within its span to the unitary closest to it (orthogonal
    Procrustes); the CRB depends on the span only, and coefficients stay close to the reference's."""
    rows = torch.cat([s.to(torch.complex128)[:, None], effective_directions(s, jac, targets)], 1).flatten(0, 1)
    rows = rows / torch.linalg.vector_norm(rows, dim=-1, keepdim=True).clamp_min(1e-300)
    basis = svd.svd_basis(rows, rank).to(torch.complex128)
    if reference is not None:
        u, _, vh = torch.linalg.svd(basis.mH @ reference.to(torch.complex128))
        basis = basis @ (u @ vh)
    return basis


def simulate_set(n: int, schedule: dict, basis: torch.Tensor, *, seed: int, chunk: int = CHUNK,
                 with_crb: bool = True, with_fisher: bool = False, widen: dict | None = None,
                 log=LOGGER) -> dict[str, torch.Tensor]:
    """A training set: ``theta [n, 7]`` (float64), ``coeffs [n, R]`` (complex64, M0 = 1), and
    ``crb_unit [n, 7]`` (float64, M0 = 1, σ = 1) if ``with_crb``; ``seconds`` (0-dim) records the
    simulation time (so the per-sample cost is known wherever the set is cached); ``widen [n, 7]`` the
    factors of ``widened_distributions`` each sample was drawn from (1: seed 003's; per sample, so a
    set can be sliced and concatenated; parts saved before held one ``[7]`` row)."""
    gen = torch.Generator().manual_seed(int(seed))
    out = set_from_theta(sample_parameters(n, schedule["tr"], gen, widen=widen), schedule, basis, chunk=chunk,
                         with_crb=with_crb, with_fisher=with_fisher, log=log)
    out["widen"] = widen_factors(widen).expand(len(out["theta"]), -1).contiguous()  # per sample: sets are cut and joined
    return out


def set_from_theta(theta: torch.Tensor, schedule: dict, basis: torch.Tensor, *, chunk: int = CHUNK,
                   with_crb: bool = True, with_fisher: bool = False, log=LOGGER) -> dict[str, torch.Tensor]:
    """``simulate_set`` for given parameters ``theta [n, 7]`` (``PARAMETERS`` order, float64), e.g.
    the regular grids of ``insilico.grid_theta``. ``with_fisher`` (needs ``with_crb``): also
    ``fisher_unit [n, 9, 9]`` (``fisher_from_jacobian`` at M0 = 1, σ = 1; for ``prior_informed_bound``)."""
    n = len(theta)
    t0 = time.perf_counter()
    cs, crbs, fishers = [], [], []
    for i in range(0, n, chunk):
        part = theta[i:i + chunk]
        if with_crb:
            c, j = coefficient_jacobian(part, schedule, basis, chunk=min(chunk, JACOBIAN_CHUNK))
            crbs.append(crb_from_jacobian(c, j))
            if with_fisher:
                fishers.append(fisher_from_jacobian(c, j))
        else:
            c = fingerprints(part, schedule, basis, chunk=chunk)
        cs.append(c.to(torch.complex64))
        if log is not None:
            log.info("qMT training set: %d / %d samples (%.1f ms/sample)", min(i + chunk, n), n,
                     1e3 * (time.perf_counter() - t0) / min(i + chunk, n))
    out = {"theta": theta, "coeffs": torch.cat(cs),
           "seconds": torch.tensor(time.perf_counter() - t0, dtype=torch.float64)}
    if with_crb:
        out["crb_unit"] = torch.cat(crbs)
    if fishers:
        out["fisher_unit"] = torch.cat(fishers)
    return out


def schedule_key_parts(schedule: dict, basis: torch.Tensor) -> tuple:
    """What a cached set depends on (with ``n``, ``seed``, the distributions and any widening)."""
    return (np.asarray(schedule["flip_rad"]), np.asarray(schedule["pulse_dur"]), float(schedule["tr"]),
            float(schedule.get("inversion_dur", 1e-3)), torch.view_as_real(torch.as_tensor(basis)
                                                                         .to(torch.complex128)),
            sorted(DISTRIBUTIONS.items()), M0_ABS_RANGE, math.pi)


def cached_set(directory, n: int, schedule: dict, basis: torch.Tensor, *, seed: int, chunk: int = CHUNK,
               widen: dict | None = None, log=LOGGER) -> dict[str, torch.Tensor]:
    """``simulate_set`` stored once in ``directory`` (``utils.cache.disk_cached``, keyed by the
    schedule, the basis, the distributions, ``n``, ``seed`` and the widening: a widened set adds
    its sorted factors to the key, so seed 003's sets keep their keys): the CRBs are computed once per set."""
    from bids_qmri.utils.cache import disk_cached

    widen = check_widen(widen)
    extra = (("widen", sorted(widen.items()), sorted(PHYSICAL_LIMITS.items())),) if widen else ()
    return disk_cached(directory, "qmt-trainset", (*schedule_key_parts(schedule, basis), int(n), int(seed), *extra),
                       lambda: simulate_set(n, schedule, basis, seed=seed, chunk=chunk, widen=widen, log=log))
