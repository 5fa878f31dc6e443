"""Batched damped least squares / damped Newton for many small independent problems (torch).

``levenberg_marquardt`` minimises ``½‖r_n(x_n)‖²`` for ``N`` independent rows at once (one row =
one voxel, ``P`` ≲ 10 parameters, ``M`` residuals); ``damped_newton`` minimises a general per-row
objective ``f_n(x_n)`` (e.g. a Rician negative log-likelihood, which is not a sum of squares) with
the same machinery and autograd Hessians. Both share one loop:

* local quadratic model ``f + gᵀδ + ½ δᵀHδ`` (LM: ``g = Jᵀr``, ``H = JᵀJ``; Newton: exact ``∇f``,
  ``∇²f``), step ``(H + λ·D) δ = −g`` with Marquardt's scaling ``D = diag|H|`` so the damping is
  invariant to the very different parameter scales (signal units, seconds, unitless);
* per-row damping ``λ`` updated by the gain ratio ``ρ = actual/predicted reduction`` (Nielsen
  1999): every row accepts or rejects its own step, so one hard voxel never slows the others;
* box bounds by projection, with the binding set of projected Newton (Bertsekas 1982):
  parameters on a bound whose gradient pushes outward are held fixed for that step, so the
  remaining ones still move and a row converges at a bound-constrained minimum;
* rows whose start, model or derivatives are not finite are frozen and reported not converged;
  all updates go through ``torch.where`` (never ``mask * value``) so a NaN cannot leak across rows.

Everything runs on the device and in the dtype of ``x0``. Only the rows still iterating are
evaluated (the batch is compacted as rows finish, so a few slow rows do not cost ``N`` rows of
work per iteration); a residual written for the whole batch (``rows=False``) still sees ``N``
rows, the others at their start values (rows are independent). The ``P×P`` solve is unrolled
over ``P``: meant for a handful of parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import grad, jacfwd

__all__ = ["LMResult", "levenberg_marquardt", "damped_newton"]

Residual = Callable[..., torch.Tensor]  # (x) -> r, or (x, rows) -> r with rows=True
NormalEquations = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Model = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

_LAMBDA_MAX = 1e32  # a row that needs more damping than this cannot make progress: give up


@dataclass(frozen=True)
class LMResult:
    """Solution of ``N`` independent problems.

    ``x`` ``[N, P]`` (the last accepted iterate; the start for rows that never started),
    ``cost`` ``[N]`` (``½‖r‖²`` for least squares, the objective for ``damped_newton``),
    ``converged`` bool ``[N]`` (a tolerance was met with finite values), ``iterations`` int ``[N]``.
    """

    x: torch.Tensor
    cost: torch.Tensor
    converged: torch.Tensor
    iterations: torch.Tensor


def levenberg_marquardt(
    residual: Residual,
    x0: torch.Tensor,
    *,
    jacobian: Callable[..., torch.Tensor] | None = None,
    lower: torch.Tensor | float | None = None,
    upper: torch.Tensor | float | None = None,
    max_iter: int = 100,
    ftol: float = 1e-10,
    xtol: float = 1e-10,
    gtol: float = 1e-8,
    lambda0: float = 1e-3,
    rows: bool = False,
    normal_equations: NormalEquations | None = None,
) -> LMResult:
    """Minimise ``½‖residual(x)_n‖²`` for every row ``n`` of ``x0`` ``[N, P]``.

    ``residual(x [N, P]) -> r [N, M]`` (real) must treat rows independently. ``jacobian(x) ->
    J [N, M, P]``; if ``None`` it is computed by forward-mode autograd (see ``_autograd_jacobian``).
    ``lower``/``upper``: bounds broadcastable to ``[N, P]`` (``x0`` is projected into them).
    Convergence (per row, as MINPACK/scipy): an accepted step with ``ρ > ¼`` that lowers the cost
    by less than ``ftol·|cost|``, or a trial step with ``|δ_i| ≤ xtol·(xtol + |x_i|)`` for all ``i``
    (no representable progress left), or, at an accepted point, the cosine between ``r`` and every
    free column of ``J`` (``|J_iᵀr|/(‖J_i‖‖r‖)``, MINPACK's gtol test) at most ``gtol``, or a zero
    cost.

    ``rows=True``: ``residual`` and ``jacobian`` take a second argument, the LongTensor of the
    rows of ``x0`` that their first argument holds, and are only asked for rows still iterating
    (cheaper when a few rows need many iterations). With ``rows=False`` they always see ``N``
    rows and only the active ones are read.

    ``normal_equations(x [n, P], r [n, M], rows [n]) -> (JᵀJ [n, P, P], Jᵀr [n, P])`` replaces
    ``jacobian`` for models whose normal equations reduce to a few sums over the residual axis
    (exponentials: small GEMMs over the time points), which is ~3× cheaper than forming ``J`` when
    ``M ≫ P``. It is always called with the subset of rows still iterating.
    """
    if jacobian is not None and normal_equations is not None:
        raise ValueError("give jacobian or normal_equations, not both")
    res_rows = _with_rows(residual, x0, rows)
    if normal_equations is not None:

        def model_ne(x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            r = res_rows(x, idx)
            jtj, jtr = normal_equations(x, r, idx)
            return 0.5 * torch.linalg.vecdot(r, r), jtr, jtj

        return _damped_minimise(model_ne, x0, lower, upper, max_iter, ftol, xtol, gtol, lambda0)
    if jacobian is not None:
        jac_rows = _with_rows(jacobian, x0, rows)
    else:
        jac_rows = lambda x, idx: _autograd_jacobian(lambda xx: res_rows(xx, idx), x)  # noqa: E731

    def model(x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r = res_rows(x, idx)
        j = jac_rows(x, idx)
        jt = j.mT
        return 0.5 * torch.linalg.vecdot(r, r), (jt @ r[..., None])[..., 0], jt @ j

    return _damped_minimise(model, x0, lower, upper, max_iter, ftol, xtol, gtol, lambda0)


def damped_newton(
    objective: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    *,
    lower: torch.Tensor | float | None = None,
    upper: torch.Tensor | float | None = None,
    max_iter: int = 100,
    ftol: float = 1e-10,
    xtol: float = 1e-10,
    lambda0: float = 1e-3,
    rows: bool = False,
) -> LMResult:
    """Minimise ``objective(x [N, P]) -> f [N]`` row by row with Levenberg-damped Newton steps.

    Gradient and Hessian come from autograd (forward over reverse: one vmapped pass over the
    ``P`` tangents). An indefinite Hessian is handled by the damping: a step is only taken once
    ``H + λD`` is positive definite. Tolerances and ``rows`` as ``levenberg_marquardt`` (no gtol).
    """
    obj_rows = _with_rows(objective, x0, rows)

    def model(x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Rows are independent, so the gradient of Σ_n f_n with respect to x [n, P] holds every
        # row's own gradient (reverse mode, one pass); differentiating that forward with respect
        # to a shift shared by all rows (see _autograd_jacobian) gives every row's Hessian.
        def total(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            values = obj_rows(z, idx)
            return values.sum(), values

        def gradient(y: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
            g, values = grad(total, has_aux=True)(x + y)
            return g, (g, values)

        y0 = torch.zeros(x.shape[-1], dtype=x.dtype, device=x.device)
        hess, (g, values) = jacfwd(gradient, has_aux=True)(y0)
        return values, g, hess

    # No gtol test: MINPACK's cosine needs a sum of squares (2f = ‖r‖², H ≈ JᵀJ).
    return _damped_minimise(model, x0, lower, upper, max_iter, ftol, xtol, 0.0, lambda0)


def _autograd_jacobian(residual: Residual, x: torch.Tensor) -> torch.Tensor:
    """``J [N, M, P]`` by ``jacfwd`` (vmap over the ``P`` basis tangents of one batched jvp).

    Rows are independent, so differentiating ``residual(x + y)`` with respect to a shift ``y``
    ``[P]`` shared by all rows gives each row's own Jacobian: ``[N, M, P]`` instead of the
    ``[N, M, N, P]`` that ``jacfwd(residual)(x)`` would build.
    """
    y0 = torch.zeros(x.shape[-1], dtype=x.dtype, device=x.device)
    return jacfwd(lambda y: residual(x + y))(y0)


def _with_rows(fn: Callable, x0: torch.Tensor, rows: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``fn`` as ``(x_sub, rows) -> out_sub``; a full-batch ``fn`` gets the subset embedded in an
    ``N``-row tensor (the other rows' values are irrelevant: rows are independent)."""
    if rows:
        return fn
    base = torch.nan_to_num(x0.detach().clone())

    def embedded(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if idx.numel() == base.shape[0]:
            return fn(x)
        full = base.to(x.dtype).index_put((idx,), x)  # out of place: autograd/jvp flow through x
        return fn(full)[idx]

    return embedded


def _bound(value: torch.Tensor | float | None, like: torch.Tensor, default: float) -> torch.Tensor:
    if value is None:
        value = default
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).expand_as(like)


def _cholesky_solve(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve ``a x = b`` for SPD ``a`` ``[N, P, P]`` -> ``(x [N, P], ok [N])``.

    Unrolled over ``P`` and vectorised over ``N`` (fused ``addcmul``s on contiguous element
    vectors): for 2–4 parameters this is several times faster than batched LAPACK calls, and a
    failed pivot only flags its own row (``ok`` False).
    """
    n, p = b.shape
    el = a.reshape(n, p * p).T.contiguous()  # [P², N]: every matrix element a contiguous vector
    rhs = b.T.contiguous()
    low: dict[tuple[int, int], torch.Tensor] = {}
    inv_diag: list[torch.Tensor] = []
    ok = torch.ones(n, dtype=torch.bool, device=a.device)
    for j in range(p):
        d = el[j * p + j]
        for k in range(j):
            d = torch.addcmul(d, low[j, k], low[j, k], value=-1.0)
        ok &= d > 0  # False for NaN too
        inv = torch.where(d > 0, d, 1.0).rsqrt()
        inv_diag.append(inv)
        for i in range(j + 1, p):
            s = el[i * p + j]
            for k in range(j):
                s = torch.addcmul(s, low[i, k], low[j, k], value=-1.0)
            low[i, j] = s * inv
    z: list[torch.Tensor] = []
    for i in range(p):  # forward substitution L z = b
        s = rhs[i]
        for k in range(i):
            s = torch.addcmul(s, low[i, k], z[k], value=-1.0)
        z.append(s * inv_diag[i])
    x: list[torch.Tensor] = [z[0]] * p
    for i in reversed(range(p)):  # back substitution Lᵀ x = z
        s = z[i]
        for k in range(i + 1, p):
            s = torch.addcmul(s, low[k, i], x[k], value=-1.0)
        x[i] = s * inv_diag[i]
    return torch.stack(x, dim=-1), ok


def _damped_minimise(
    model: Model,
    x0: torch.Tensor,
    lower: torch.Tensor | float | None,
    upper: torch.Tensor | float | None,
    max_iter: int,
    ftol: float,
    xtol: float,
    gtol: float,
    lambda0: float,
) -> LMResult:
    """The shared loop. ``model(x_sub [n, P], rows [n]) -> (f [n], g [n, P], H [n, P, P])``.

    The state of the rows still iterating is kept compacted (``rows`` indexes them in the
    output) and shrinks as rows finish: most voxels converge in a few iterations while a few
    need many, so the work follows the sum of the rows' iteration counts, not
    ``N × max(iterations)``. Finished rows stay in the batch, frozen (``alive`` False), until
    they are an eighth of it: compacting costs a gather of every state tensor (and of the
    model's per-row data), so it is done in bulk. ``rows`` is the same tensor object between
    compactions, which lets a model cache what it gathers with it.
    """
    if x0.ndim != 2:
        raise ValueError(f"x0 must be [N, P], got shape {tuple(x0.shape)}")
    lo_full, hi_full = _bound(lower, x0, -torch.inf), _bound(upper, x0, torch.inf)
    x = torch.minimum(torch.maximum(x0, lo_full), hi_full)
    n, p = x.shape
    dev = x.device
    tiny = torch.finfo(x.dtype).tiny

    def finite_model(xs: torch.Tensor, rows: torch.Tensor):
        f, g, h = model(xs, rows)
        ok = torch.isfinite(f + g.sum(-1) + h.sum((-1, -2)))  # a NaN or inf anywhere reaches the sum
        if not bool(ok.all()):  # sanitise bad rows so no batched op downstream sees a NaN
            eye = torch.eye(p, dtype=xs.dtype, device=dev).expand(xs.shape[0], p, p)
            g, h = torch.where(ok[:, None], g, 0.0), torch.where(ok[:, None, None], h, eye)
        return f, g, h, ok

    start_ok = torch.isfinite(x).all(-1)
    f0, g, h, ok = finite_model(torch.where(start_ok[:, None], x, 0.0), torch.arange(n, device=dev))
    f = torch.where(start_ok, f0, torch.nan)
    converged = ok & start_ok & (f == 0)
    iterations = torch.zeros(n, dtype=torch.int64, device=dev)

    # Compacted state of the active rows.
    rows = torch.nonzero(ok & start_ok & ~converged).reshape(-1)
    xa, fa, ga, ha, lo, hi = x[rows], f[rows], g[rows], h[rows], lo_full[rows], hi_full[rows]
    lam = torch.full_like(fa, lambda0)
    nu = torch.full_like(fa, 2.0)
    alive = torch.ones_like(fa, dtype=torch.bool)

    def binding(xa: torch.Tensor, ga: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Parameters on a bound whose descent direction points out: held for the next step."""
        return ((xa <= lo) & (ga > 0)) | ((xa >= hi) & (ga < 0))

    held = binding(xa, ga, lo, hi)
    for it in range(max_iter):
        if rows.numel() == 0:
            break
        free = ~held
        all_free = bool(free.all())
        h_free = ha if all_free else torch.where(free[:, :, None] & free[:, None, :], ha, 0.0)
        diag = h_free.diagonal(dim1=-2, dim2=-1).abs()
        # Floor the scaling so a parameter with zero curvature still gets damped; held ones get
        # a unit pivot, hence a zero step from their zeroed gradient.
        diag = torch.maximum(diag, 1e-12 * diag.amax(-1, keepdim=True).clamp_min(tiny))
        damping = lam[:, None] * diag if all_free else torch.where(free, lam[:, None] * diag, 1.0)
        system = h_free.clone()
        system.diagonal(dim1=-2, dim2=-1).add_(damping)
        step, spd = _cholesky_solve(system, -(ga if all_free else torch.where(free, ga, 0.0)))
        step = torch.where(spd[:, None], step, 0.0)
        x_try = torch.minimum(torch.maximum(xa + step, lo), hi)
        dx = x_try - xa
        f_try, g_try, h_try, ok_try = finite_model(x_try, rows)

        predicted = -((ga + 0.5 * (ha @ dx[..., None])[..., 0]) * dx).sum(-1)  # −(gᵀδ + ½δᵀHδ)
        actual = fa - f_try
        accept = alive & spd & ok_try & (actual > 0)
        rho = torch.where(predicted > 0, actual / predicted, torch.zeros_like(actual))

        # Tolerances (MINPACK style): ftol on a trusted accepted step, xtol on any trial step.
        small_step = spd & (dx.abs() <= xtol * (xtol + xa.abs())).all(-1)
        small_gain = accept & (rho > 0.25) & (actual <= ftol * fa.abs())  # |f|: an NLL may be < 0

        xa = torch.where(accept[:, None], x_try, xa)
        fa = torch.where(accept, f_try, fa)
        ga = torch.where(accept[:, None], g_try, ga)
        ha = torch.where(accept[:, None, None], h_try, ha)
        # Nielsen's damping update: shrink by up to 3 on good steps, double (growing) on bad ones.
        shrink = torch.clamp(1.0 - (2.0 * rho - 1.0) ** 3, min=1.0 / 3.0)
        lam = torch.where(accept, lam * shrink, torch.where(alive, lam * nu, lam))
        nu = torch.where(accept, torch.full_like(nu, 2.0), torch.where(alive, nu * 2.0, nu))

        done = small_step | small_gain | (fa == 0)
        held = binding(xa, ga, lo, hi)  # at the current point: for the gtol test and the next step
        if gtol > 0:  # MINPACK's orthogonality test at the (new) accepted point, free parameters only
            norms = torch.sqrt(ha.diagonal(dim1=-2, dim2=-1) * (2.0 * fa)[:, None])  # ‖J_i‖·‖r‖
            cosine = torch.where(held, 0.0, ga.abs() / norms).amax(-1)
            done |= accept & (cosine <= gtol)  # 0/0 = NaN compares False
        finished = alive & (done | (lam >= _LAMBDA_MAX))  # the latter: stuck, not converged
        if bool(finished.any()):
            fin = rows[finished]
            x[fin], f[fin], converged[fin], iterations[fin] = xa[finished], fa[finished], done[finished], it + 1
            alive &= ~finished
            if 8 * int((~alive).sum()) >= alive.numel():
                rows, xa, fa, ga, ha, lo, hi, lam, nu, held, alive = (
                    v[alive] for v in (rows, xa, fa, ga, ha, lo, hi, lam, nu, held, alive))

    # Rows that ran out of iterations: their last accepted iterate, not converged.
    rows, xa, fa = rows[alive], xa[alive], fa[alive]
    x[rows], f[rows], iterations[rows] = xa, fa, max_iter
    return LMResult(x=x, cost=f, converged=converged, iterations=iterations)
