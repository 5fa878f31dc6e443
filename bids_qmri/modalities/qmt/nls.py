"""``qmtnls``: non-linear least squares over all 8 parameters of the two-pool model (seed 003's
gold standard), batched over voxels with the generic Levenberg–Marquardt (``fitting.lm``).

Unknowns per voxel ``x = (m0s, T1, T2f, T2s, Rx, B0, B1, Re M0, Im M0)`` (complex M0 as two reals;
T2s in µs inside the solver for conditioning), residual ``[Re, Im](M0·c(θ) − y)`` on the data's
SVD coefficients ``y`` (``c`` = exact ``physics.qmt`` fingerprint on the basis). The Jacobian is the
physics layer's own (``physics.qmt.hybrid_state_jacobian`` via ``simulate.coefficient_jacobian``)
times M0, and the
analytic ``[c, i·c]`` for M0. ``B1`` is held at the voxel's B1-map value when one is given
(``b1=``), else estimated. Box bounds ``BOUNDS`` by projection (``fitting.lm``).

Multi-start: every start of the coarse grid ``GRID`` (m0s × T1 × T2f × B0, the rest at the
training means) is scored by its variable-projection residual (best complex M0 in closed form),
the ``n_grid_starts`` best per voxel are refined by LM, as is the network's estimate (``x_net``:
m0s, T1, T2f; the rest at the training means) when given; the lowest cost wins. All starts of all
voxels run as rows of one LM call, so each iteration is one batched Jacobian pass.
"""

from __future__ import annotations

import itertools
import math
import time

import torch

from bids_qmri.fitting.lm import levenberg_marquardt

from . import simulate

__all__ = ["BOUNDS", "GRID", "fit_nls"]

#: solver bounds per parameter (SI; T2s in s here, µs in the solver)
BOUNDS = {"m0s": (0.0, 0.5), "T1": (0.05, 6.0), "T2f": (2e-3, 3.0), "T2s": (2e-6, 40e-6), "Rx": (0.0, 300.0),
          "B0": (-float("inf"), float("inf")), "B1": (0.3, 1.8)}
#: coarse start grid: m0s, T1 (s), T2f (s), B0 (fraction of 1/TR)
GRID = {"m0s": (0.05, 0.15, 0.25), "T1": (0.7, 1.4, 2.8), "T2f": (0.04, 0.1, 0.25), "B0": (-0.25, 0.0, 0.25)}
_MEANS = {"m0s": 0.12, "T1": 1.6, "T2f": 0.1, "T2s": 12e-6, "Rx": 44.0, "B0": 0.0, "B1": 1.0}
_SCALE = torch.tensor([1.0, 1.0, 1.0, 1e6, 1.0, 1.0, 1.0], dtype=torch.float64)  # SI -> solver units


def _best_m0(c: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form complex M0 = cᴴy/cᴴc and the residual ‖M0·c − y‖² per row."""
    m0 = (c.conj() * y).sum(-1) / (c.abs() ** 2).sum(-1).clamp_min(1e-30)
    return m0, ((m0[:, None] * c - y).abs() ** 2).sum(-1)


def fit_nls(y: torch.Tensor, schedule: dict, basis: torch.Tensor, *, b1: torch.Tensor | None = None,
            x_net: torch.Tensor | None = None, n_grid_starts: int = 2, max_iter: int = 60,
            dtype=torch.float32, chunk: int = 256) -> dict:
    """Fit coefficients ``y`` ``[N, R]`` -> dict of ``[N]`` tensors (``simulate.PARAMETERS`` plus
    ``M0`` (complex), ``cost``, ``converged``, ``seconds``). ``b1`` ``[N]`` fixes B1; ``x_net`` ``[N, 3]``
    (m0s, T1, T2f; the rest at the training means) adds the network's start; ``[N, 7]`` gives every
    parameter of that start (e.g. the truth, to measure the local MLE's spread in silico)."""
    t0 = time.perf_counter()
    y = torch.as_tensor(y).to(torch.complex128)
    n = len(y)
    basis = torch.as_tensor(basis)
    tr = float(schedule["tr"])
    fixed_b1 = b1 is not None
    free = [k for k in range(7) if not (fixed_b1 and k == 6)]
    b1v = torch.as_tensor(b1, dtype=torch.float64) if fixed_b1 else None

    # every start of every voxel is one LM row: row k fits voxel k % n (one batched physics call)
    def full_theta(x, rows):  # solver x [m, P] -> SI theta [m, 7]
        th = torch.empty(len(x), 7, dtype=torch.float64)
        th[:, free] = x[:, :len(free)].double() / _SCALE[free]
        if fixed_b1:
            th[:, 6] = b1v[rows % n]
        return th

    def unpack(x, rows):
        m0 = torch.complex(x[:, -2].double(), x[:, -1].double())
        return full_theta(x, rows), m0

    def residual(x, rows):
        th, m0 = unpack(x, rows)
        c = simulate.fingerprints(th, schedule, basis, chunk=chunk, dtype=dtype)
        r = m0[:, None] * c - y[rows % n]
        return torch.cat([r.real, r.imag], 1).to(x.dtype)

    def jacobian(x, rows):
        th, m0 = unpack(x, rows)
        c, j = simulate.coefficient_jacobian(th, schedule, basis, chunk=chunk, dtype=dtype)
        j = m0[:, None, None] * j[:, :, free] / _SCALE[free]
        j = torch.cat([j, c[..., None], 1j * c[..., None]], -1)
        return torch.cat([j.real, j.imag], 1).to(x.dtype)

    lo = torch.tensor([BOUNDS[k][0] for k in simulate.PARAMETERS], dtype=torch.float64)
    hi = torch.tensor([BOUNDS[k][1] for k in simulate.PARAMETERS], dtype=torch.float64)
    lo[5], hi[5] = -1.0 / tr, 1.0 / tr
    inf = torch.tensor([-math.inf, math.inf], dtype=torch.float64)
    lower = torch.cat([(lo * _SCALE)[free], inf[:1].repeat(2)])
    upper = torch.cat([(hi * _SCALE)[free], inf[1:].repeat(2)])

    # starts: the best grid points by variable projection, and the network's estimate
    means = torch.tensor([_MEANS[k] for k in simulate.PARAMETERS], dtype=torch.float64)
    grid = torch.tensor(list(itertools.product(*GRID.values())), dtype=torch.float64)  # [G, 4]
    starts = []
    g = len(grid)
    th = means.repeat(n * g, 1)
    th[:, [0, 1, 2, 5]] = grid.repeat(n, 1)
    th[:, 5] = th[:, 5] / tr
    if fixed_b1:
        th[:, 6] = b1v.repeat_interleave(g)
    c = simulate.fingerprints(th, schedule, basis, chunk=max(chunk, 1024), dtype=dtype)
    m0, cost = _best_m0(c, y.repeat_interleave(g, 0))
    best = cost.reshape(n, g).argsort(1)[:, :n_grid_starts]
    for k in range(best.shape[1]):
        idx = torch.arange(n) * g + best[:, k]
        starts.append((th[idx], m0[idx]))
    if x_net is not None:
        x_net = torch.as_tensor(x_net, dtype=torch.float64)
        th = means.repeat(n, 1)
        th[:, :x_net.shape[1]] = x_net
        if fixed_b1:
            th[:, 6] = b1v
        th = torch.minimum(torch.maximum(th, lo), hi)
        m0, _ = _best_m0(simulate.fingerprints(th, schedule, basis, chunk=chunk, dtype=dtype), y)
        starts.append((th, m0))

    x0 = torch.cat([torch.cat([(th * _SCALE)[:, free], m0.real[:, None], m0.imag[:, None]], 1) for th, m0 in starts])
    res = levenberg_marquardt(residual, x0, jacobian=jacobian, lower=lower, upper=upper, rows=True,
                              max_iter=max_iter, ftol=1e-12, xtol=1e-10, gtol=1e-10)
    cost = torch.where(torch.isfinite(res.cost), res.cost, torch.full_like(res.cost, math.inf)).reshape(-1, n)
    pick = cost.argmin(0)  # the first start wins ties
    voxels = torch.arange(n)
    best_x = res.x.reshape(len(starts), n, -1)[pick, voxels]
    best_cost, conv = cost[pick, voxels], res.converged.reshape(-1, n)[pick, voxels]
    theta, m0 = unpack(best_x, torch.arange(n))
    out = {k: theta[:, i] for i, k in enumerate(simulate.PARAMETERS)}
    out.update(M0=m0, cost=best_cost, converged=conv, seconds=time.perf_counter() - t0)
    return out
