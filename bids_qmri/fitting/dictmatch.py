"""Dictionary matching for any signal model (SPEC §5 "solvers that take any model"; seed 002).

A *dictionary* is a table of simulated signals (atoms) ``[A, K]`` at known parameter values
``[A, P]``; a *signal* is matched to the atom with the largest normalised inner product
``|⟨d, s⟩| / ‖d‖`` (McGivney 2014), which is invariant to the signal's complex scale, and that
scale ``⟨d, s⟩ / ‖d‖²`` is the proton density (complex M0). Nothing here knows the physics: the
caller gives a ``simulate(params [n, P]) -> complex [n, Nt]`` function.

- :func:`simulate_dictionary` evaluates ``simulate`` chunk by chunk (bounded memory, progress
  bar) and projects each chunk onto a temporal basis when one is given;
  :func:`dictionary_gram` accumulates ``DᴴD`` chunk by chunk for the dictionary's own SVD
  (``physics.svd.basis_from_gram``), so a frames dictionary never has to be held in memory.
- :func:`match`: the best atom of every signal, two implementations with one contract (exact
  argmax of the scores computed, no clustering or tree search; ties to the lowest atom index):
  the fused numba kernel of :mod:`fitting.match_kernel` (scores accumulated in registers, never
  stored as a block; the default for large searches when numba is installed) and the torch path:
  chunked GEMM over voxels × atoms (the complex inner products as two real GEMMs, or one real
  GEMM of the stacked ``[Re s; Im s]`` when the atoms are real) with ``|·|²`` and a running argmax
  per block (``torch.max`` returns the first maximum within a block; a later block must be
  strictly larger). ``groups``: each signal may be matched against one sub-dictionary only (e.g.
  the atoms at the voxel's known B1).
- :func:`refine_gauss_newton`: a few Gauss–Newton steps of the variable-projection residual
  ``s − d(θ) ⟨d(θ), s⟩/‖d(θ)‖²`` in the parameters, starting at the match and kept inside a box
  (the winning grid cell), with a forward-difference Jacobian of ``simulate``; a step that does
  not lower the residual is not taken.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

LOGGER = logging.getLogger("bids_qmri.fitting.dictmatch")

__all__ = ["MatchResult", "PreparedAtoms", "prepare_atoms", "simulate_dictionary", "dictionary_gram",
           "normalise_atoms", "match", "RefineResult", "refine_gauss_newton", "refine_on_grid", "lagrange_weights",
           "chunk_peak_bytes"]

Simulate = Callable[[torch.Tensor], torch.Tensor]  # params [n, P] -> complex [n, Nt]


def _progress(total: int, desc: str, progress: bool | None):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="atom", disable=None if progress is None else not progress,
                leave=False)


def simulate_dictionary(simulate: Simulate, params: torch.Tensor, *, basis: torch.Tensor | None = None,
                        chunk: int = 2048, dtype: torch.dtype = torch.complex64, progress: bool | None = None,
                        desc: str = "dictionary") -> torch.Tensor:
    """Atoms ``[A, Nt]`` (or ``[A, R]`` projected on ``basis`` ``[Nt, R]``: ``atoms = signals @ basis``)
    of ``simulate`` at ``params`` ``[A, P]``, ``chunk`` atoms at a time, stored as ``dtype``."""
    params = torch.as_tensor(params)
    n = params.shape[0]
    out = None
    with _progress(n, desc, progress) as bar:
        for lo in range(0, n, chunk):
            sig = simulate(params[lo:lo + chunk])
            if basis is not None:
                sig = sig.to(basis.dtype) @ basis
            if out is None:
                out = torch.empty((n, sig.shape[-1]), dtype=dtype)
            out[lo:lo + sig.shape[0]] = sig.to(dtype)
            bar.update(sig.shape[0])
    if out is None:
        raise ValueError("empty dictionary: no parameter values")
    return out


def dictionary_gram(simulate: Simulate, params: torch.Tensor, *, chunk: int = 2048, progress: bool | None = None,
                    desc: str = "dictionary SVD") -> torch.Tensor:
    """``DᴴD`` ``[Nt, Nt]`` (complex128) of the dictionary of ``simulate`` at ``params``, chunk by chunk."""
    params = torch.as_tensor(params)
    gram = None
    with _progress(params.shape[0], desc, progress) as bar:
        for lo in range(0, params.shape[0], chunk):
            sig = simulate(params[lo:lo + chunk]).to(torch.complex128)
            g = sig.mH @ sig
            gram = g if gram is None else gram + g
            bar.update(sig.shape[0])
    if gram is None:
        raise ValueError("empty dictionary: no parameter values")
    return gram


def chunk_peak_bytes(chunk: int, n_frames: int, rank: int, n_atoms: int, *, state_arrays: int = 12) -> int:
    """Estimated peak memory of building a dictionary: ``state_arrays`` float32 work arrays of
    ``chunk × n_frames`` (simulation) plus the stored ``n_atoms × rank`` complex64 atoms."""
    return int(4 * state_arrays * chunk * n_frames + 8 * n_atoms * rank)


def normalise_atoms(atoms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(atoms / ‖atoms‖, ‖atoms‖)`` over the last axis (a zero atom stays zero)."""
    norms = torch.linalg.vector_norm(atoms, dim=-1)
    return atoms / norms.clamp_min(torch.finfo(norms.dtype).tiny)[..., None], norms


@dataclass(frozen=True)
class MatchResult:
    """``index`` ``[V]`` (into the full dictionary; −1 where the signal is zero or not finite),
    ``score`` ``[V]`` (``|⟨d̂, s⟩|/‖s‖``, 1 for a perfect match), ``scale`` ``[V]`` complex
    (``⟨d, s⟩/‖d‖²``: the signal ≈ scale · atom), ``backend``: ``"kernel"`` or ``"torch"`` (which
    implementation searched), ``form``: how the atoms were searched (``PreparedAtoms.form``:
    ``"real"``, ``"factored"`` or ``"complex"``)."""

    index: torch.Tensor
    score: torch.Tensor
    scale: torch.Tensor
    backend: str = "torch"
    form: str = "complex"


#: Largest residual, per unit atom, of the real rank-R factorisation ``d̂ = x M`` for which complex
#: atoms are searched as real ones: a few roundings of the atoms' own precision, so the scores move
#: by about what the search's own rounding moves them (``|Δ⟨d̂, s⟩| ≤ residual · ‖s‖``).
FACTOR_TOLERANCE = {torch.complex64: 2e-6, torch.complex128: 1e-13}


@dataclass(frozen=True)
class PreparedAtoms:
    """Unit atoms ready to be searched (``prepare_atoms``).

    ``unit`` ``[A, R]`` complex unit atoms and ``norms`` ``[A]`` (the original atoms' norms: the
    score and scale of a match always come from these). ``form``:

    - ``"real"``: the imaginary parts are exactly zero; ``real_atoms`` is ``unit.real``.
    - ``"factored"``: complex atoms of real rank R: ``unit = real_atoms @ basis_change`` with
      ``real_atoms`` ``[A, R]`` real and ``basis_change`` ``M`` ``[R, R]`` complex, up to a per-atom
      residual ``residual`` (at most ``FACTOR_TOLERANCE``). Then ``⟨d̂_k, s⟩ = Σ_j conj(d̂_kj) s_j =
      x_k · (conj(M) s)``: each signal is transformed once (``s @ Mᴴ``) and searched against the
      real atoms ``x_k`` (half the multiply-adds of complex atoms). This is the case of a real
      dictionary (FISP) projected onto a complex basis that spans a real subspace, e.g. the
      dictionary's own SVD basis with complex phases, or any complex rotation of it.
    - ``"complex"``: neither; searched as complex atoms.
    """

    unit: torch.Tensor
    norms: torch.Tensor
    form: str
    real_atoms: torch.Tensor | None = None
    basis_change: torch.Tensor | None = None
    residual: float = 0.0

    def search_signals(self, signals: torch.Tensor) -> torch.Tensor:
        """The signals in the space searched: ``s @ Mᴴ`` (in double precision) for ``"factored"``
        atoms, else the signals themselves."""
        if self.form != "factored":
            return signals
        out = torch.empty_like(signals)
        for lo in range(0, signals.shape[0], SIGNAL_CHUNK):  # bounded double-precision temporaries
            part = signals[lo:lo + SIGNAL_CHUNK]
            out[lo:lo + SIGNAL_CHUNK] = part.to(torch.complex128) @ self.basis_change.mH
        return out


def prepare_atoms(atoms: torch.Tensor, *, atom_norms: tuple[torch.Tensor, torch.Tensor] | None = None,
                  factor: bool = True, tolerance: float | None = None) -> PreparedAtoms:
    """Unit atoms of ``atoms`` ``[A, R]`` and the form in which they are searched (``PreparedAtoms``).

    ``atom_norms``: ``normalise_atoms(atoms)`` if already computed. ``factor=False`` keeps complex
    atoms complex (the direct path). Complex atoms are factored when the stacked real matrix
    ``[Re d̂ | Im d̂]`` ``[A, 2R]`` has rank R: with its SVD ``U S Vᵀ`` (from the R factor of a QR,
    precise in the small singular values), ``x = [Re d̂ | Im d̂] V_R`` and ``M = (V₁ + i V₂)ᵀ``
    where ``V_R = [V₁; V₂]`` are the leading R right singular vectors. The largest per-atom
    residual ``‖[Re d̂ | Im d̂] V_rest‖`` (the score error per unit signal norm; at most the
    (R+1)-th singular value) must not exceed ``tolerance`` (default ``FACTOR_TOLERANCE`` of the
    dtype), else the atoms stay complex.
    """
    atoms = torch.as_tensor(atoms)
    if not atoms.is_complex():
        atoms = atoms.to(torch.complex128 if atoms.dtype == torch.float64 else torch.complex64)
    unit, norms = atom_norms if atom_norms is not None else normalise_atoms(atoms)
    unit = unit.to(atoms.dtype)
    if not bool(unit.imag.any()):
        return PreparedAtoms(unit, norms, "real", real_atoms=unit.real)
    n_atoms, rank = unit.shape
    if not factor or n_atoms < 2 * rank:
        return PreparedAtoms(unit, norms, "complex", residual=float("nan"))
    stacked = torch.cat([unit.real, unit.imag], 1).to(torch.float64)  # [A, 2R]
    r_factor = torch.linalg.qr(stacked, mode="r")[1]
    v = torch.linalg.svd(r_factor)[2].mT  # [2R, 2R] right singular vectors, singular values descending
    residual = float(torch.linalg.vector_norm(stacked @ v[:, rank:], dim=1).max())
    limit = FACTOR_TOLERANCE[unit.dtype] if tolerance is None else tolerance
    if not residual <= limit:
        return PreparedAtoms(unit, norms, "complex", residual=residual)
    # x = stacked @ V_R as a sum of columns in a fixed order (no GEMM blocking): duplicate atoms get
    # bitwise equal rows, so their ties survive
    x = torch.zeros((n_atoms, rank), dtype=torch.float64)
    for j in range(2 * rank):
        x += stacked[:, j:j + 1] * v[j, :rank]
    basis_change = (v[:rank, :rank] + 1j * v[rank:, :rank]).mT.contiguous()  # M = (V1 + i V2)^T
    return PreparedAtoms(unit, norms, "factored", real_atoms=x.to(unit.real.dtype), basis_change=basis_change,
                         residual=residual)


def _real_atoms(atoms_h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Real GEMM operands of conjugated unit atoms ``atoms_h [R, A]``: with ``s_r = [Re s, Im s]``,
    ``Re⟨d̂, s⟩ = s_r @ re`` and ``Im⟨d̂, s⟩ = s_r @ im`` (two real GEMMs: on CPU about 3× faster
    than one complex GEMM of the same shapes, and their outputs are contiguous)."""
    re = torch.cat([atoms_h.real, -atoms_h.imag], 0).contiguous()
    im = torch.cat([atoms_h.imag, atoms_h.real], 0).contiguous()
    return re, im


def _match_block(signals: torch.Tensor, atoms_re: torch.Tensor, atoms_im: torch.Tensor | None, atom_chunk: int):
    """Running (max |score|², argmax) of ``signals [v, R]`` against the real operands of the atoms.

    ``atoms_im is None``: the atoms are real (``atoms_re`` is ``[R, A]``, the unit atoms' real
    part) and one real GEMM of the stacked ``[Re s; Im s]`` ``[2v, R]`` gives both the real and the
    imaginary part of every inner product (half the multiply-adds of the complex product).
    """
    v = signals.shape[0]
    if atoms_im is None:
        s_r = torch.cat([signals.real, signals.imag], 0).contiguous()  # [2v, R]
        rows_out = 2 * v
    else:
        s_r = torch.cat([signals.real, signals.imag], 1).contiguous()  # [v, 2R]
        rows_out = v
    best = torch.full((v,), -1.0, dtype=s_r.dtype)
    arg = torch.zeros(v, dtype=torch.long)
    # Reused output blocks: a fresh multi-MB allocation per block costs page faults.
    buf_re = torch.empty((rows_out, atom_chunk), dtype=s_r.dtype)
    buf_im = torch.empty((v, atom_chunk), dtype=s_r.dtype) if atoms_im is not None else None
    n_atoms = atoms_re.shape[1]
    for lo in range(0, n_atoms, atom_chunk):
        n = min(atom_chunk, n_atoms - lo)
        full = n == atom_chunk
        out = torch.matmul(s_r, atoms_re[:, lo:lo + n], out=buf_re[:, :n] if full else None)
        if atoms_im is None:
            power, im = out[:v], out[v:]
        else:
            power = out
            im = torch.matmul(s_r, atoms_im[:, lo:lo + n], out=buf_im[:, :n] if full else None)
        power.square_().addcmul_(im, im)  # |⟨d̂, s⟩|² (no square root needed)
        value = power.amax(dim=1)
        rows = torch.nonzero(value > best).flatten()  # strictly: an earlier block keeps a tie
        if rows.numel():
            _, idx = power[rows].max(dim=1)  # the first maximum within the block
            best[rows] = value[rows]
            arg[rows] = idx + lo
    return best, arg


#: ``backend="auto"`` takes the fused kernel from this many voxel-atom pairs on: below it the torch
#: path is done in about the time the kernel takes to compile when numba has no cache yet (5–8 s).
KERNEL_MIN_PAIRS = 200_000_000
#: Signals per step of the passes over all signals (norms, the kernel's gathers, the final inner
#: products): each temporary stays at about 10 MiB whatever the number of voxels.
SIGNAL_CHUNK = 131072
BACKENDS = ("auto", "kernel", "torch")


def _use_kernel(backend: str, pairs: int) -> bool:
    import importlib.util

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    have_numba = importlib.util.find_spec("numba") is not None  # numba itself is imported only when used
    if backend == "kernel" and not have_numba:
        raise RuntimeError("backend 'kernel' needs numba (pip install numba)")
    return backend == "kernel" or (backend == "auto" and have_numba and pairs >= KERNEL_MIN_PAIRS)


def match(signals: torch.Tensor, atoms: torch.Tensor, *, groups: torch.Tensor | None = None,
          atom_groups: list[slice] | None = None, voxel_chunk: int = 1024, atom_chunk: int = 256,
          atom_norms: tuple[torch.Tensor, torch.Tensor] | None = None, prepared: PreparedAtoms | None = None,
          backend: str = "auto", num_threads: int | None = None) -> MatchResult:
    """Best atom of ``atoms`` ``[A, R]`` for each signal of ``signals`` ``[V, R]`` (complex).

    ``atom_groups`` (list of slices of the atom axis) with ``groups`` ``[V]`` (index into
    ``atom_groups``, −1: not matched) restricts each signal to its own sub-dictionary.
    ``prepared``: ``prepare_atoms(atoms)`` if already computed (else it is computed here, from
    ``atom_norms`` = ``normalise_atoms(atoms)`` when given). The computation runs in the dtype of
    ``atoms`` (complex64: single precision). Real atoms (imaginary part exactly zero, as FISP
    fingerprints on a real SVD basis are) and complex atoms of real rank R (a real dictionary on a
    complex basis: ``PreparedAtoms`` ``"factored"``, searched as real atoms after one R × R
    transform of each signal) take the real search: one real GEMM of ``[Re s; Im s]``, or the
    kernel's real variant, instead of complex products. ``backend``: ``"kernel"`` (the fused numba
    kernel), ``"torch"`` (the GEMM path; ``voxel_chunk`` and ``atom_chunk`` are its block sizes) or
    ``"auto"`` (the kernel when numba is installed and the search has ``KERNEL_MIN_PAIRS``
    voxel-atom pairs or more). ``num_threads``: the kernel's threads (default
    ``torch.get_num_threads()``, which the run sets from ``--omp-nthreads``).
    """
    atoms = torch.as_tensor(atoms)
    if not atoms.is_complex():
        atoms = atoms.to(torch.complex128 if atoms.dtype == torch.float64 else torch.complex64)
    signals = torch.as_tensor(signals).to(atoms.dtype)
    if signals.shape[-1] != atoms.shape[-1]:
        raise ValueError(f"signals have {signals.shape[-1]} coefficients, atoms {atoms.shape[-1]}")
    prep = prepared if prepared is not None else prepare_atoms(atoms, atom_norms=atom_norms)
    unit, norms = prep.unit, prep.norms
    n = signals.shape[0]
    if atom_groups is None:
        atom_groups = [slice(0, atoms.shape[0])]
        groups = torch.zeros(n, dtype=torch.long)
    elif groups is None:
        raise ValueError("atom_groups needs groups (the group of each signal)")
    groups = torch.as_tensor(groups, dtype=torch.long)
    finite = torch.empty(n, dtype=torch.bool)
    snorm = torch.empty(n, dtype=signals.real.dtype)
    for lo in range(0, n, SIGNAL_CHUNK):  # chunked: temporaries stay small for a whole brain
        part = signals[lo:lo + SIGNAL_CHUNK]
        finite[lo:lo + SIGNAL_CHUNK] = ok = torch.isfinite(torch.view_as_real(part)).all(-1).all(-1)
        snorm[lo:lo + SIGNAL_CHUNK] = torch.linalg.vector_norm(torch.where(ok[:, None], part, 0), dim=-1)
    usable = finite & (snorm > 0) & (groups >= 0)
    index = torch.full((n,), -1, dtype=torch.long)
    real_search = prep.form in ("real", "factored")
    rows_of = [torch.nonzero(usable & (groups == g)).flatten() for g in range(len(atom_groups))]
    pairs = sum(len(rows) * len(range(*sl.indices(atoms.shape[0]))) for rows, sl in zip(rows_of, atom_groups))
    kernel = _use_kernel(backend, pairs)
    for rows, sl in zip(rows_of, atom_groups):
        if rows.numel() == 0:
            continue
        if kernel:
            from bids_qmri.fitting import match_kernel

            sub = prep.real_atoms[sl] if real_search else unit[sl].resolve_conj()
            for lo in range(0, rows.numel(), SIGNAL_CHUNK):  # gathered a chunk at a time (bounded copies)
                sel = rows[lo:lo + SIGNAL_CHUNK]
                arg = match_kernel.best_atoms(prep.search_signals(signals[sel]).numpy(), sub.numpy(),
                                              num_threads=num_threads or torch.get_num_threads())
                index[sel] = torch.from_numpy(arg) + (sl.start or 0)
            continue
        if real_search:
            atoms_re, atoms_im = prep.real_atoms[sl].mT.contiguous(), None  # [R, A_g]
        else:
            atoms_re, atoms_im = _real_atoms(unit[sl].mH)  # [2R, A_g] each
        for lo in range(0, rows.numel(), voxel_chunk):
            sel = rows[lo:lo + voxel_chunk]
            _, arg = _match_block(prep.search_signals(signals[sel]), atoms_re, atoms_im, atom_chunk)
            index[sel] = arg + (sl.start or 0)
    ok = index >= 0
    safe = index.clamp_min(0)
    ip = torch.empty(n, dtype=signals.dtype)
    for lo in range(0, n, SIGNAL_CHUNK):  # Σ conj(d̂) s, with the original atoms
        ip[lo:lo + SIGNAL_CHUNK] = torch.linalg.vecdot(unit[safe[lo:lo + SIGNAL_CHUNK]], signals[lo:lo + SIGNAL_CHUNK])
    score = torch.where(ok, ip.abs() / snorm.clamp_min(torch.finfo(snorm.dtype).tiny), 0.0)
    scale = torch.where(ok, ip / norms[safe].clamp_min(torch.finfo(norms.dtype).tiny), 0.0)
    return MatchResult(index=index, score=score, scale=scale, backend="kernel" if kernel else "torch",
                       form=prep.form)


def _projected_residual(signals: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """Real ``[n, 2R]`` residual of ``signals`` after removing its projection on ``model`` (VarPro)."""
    scale = torch.linalg.vecdot(model, signals) / torch.linalg.vecdot(model, model).real.clamp_min(1e-30)
    r = signals - scale[:, None] * model
    return torch.view_as_real(r).flatten(1)


@dataclass(frozen=True)
class RefineResult:
    """``x`` ``[N, P]`` refined parameters, ``cost`` ``‖r‖²`` there, ``start_cost`` at ``x0``,
    ``scale`` ``[N]`` complex: the signal ≈ scale · simulate(x)."""

    x: torch.Tensor
    cost: torch.Tensor
    start_cost: torch.Tensor
    scale: torch.Tensor


def refine_gauss_newton(simulate: Simulate, signals: torch.Tensor, x0: torch.Tensor, lower: torch.Tensor,
                        upper: torch.Tensor, *, fixed: torch.Tensor | None = None, iterations: int = 4,
                        step: float = 1e-3, chunk: int = 512, update_jacobian: bool = True) -> RefineResult:
    """Refine parameters ``x0`` ``[N, P]`` of ``signals`` ``[N, R]`` within ``[lower, upper]``.

    ``simulate(x [n, P]) -> [n, R]`` complex model signals (any complex scale is projected out);
    with ``fixed`` ``[N, Q]`` (per-row constants such as a known B1) ``simulate(x, fixed_rows)``.
    Every evaluation runs the model at ``x`` and at ``x + step·e_p`` (one call on ``P + 1``
    stacked batches: residual and forward-difference Jacobian). Each iteration solves the
    ``P × P`` Gauss–Newton system (damping 1e-6 of the diagonal), clamps the step to the box and
    keeps it only if it lowers ``‖r‖²``; a row whose step is refused stops there.
    ``update_jacobian=False``: the Jacobian of the start point is kept (chord method), so each
    iteration costs one model evaluation instead of ``P + 1`` (linear instead of quadratic
    convergence, fine from a grid node inside one cell of the minimum).
    """
    x0 = torch.as_tensor(x0, dtype=torch.float64)
    lower = torch.as_tensor(lower, dtype=torch.float64).expand_as(x0)
    upper = torch.as_tensor(upper, dtype=torch.float64).expand_as(x0)
    n, p = x0.shape
    out_x = x0.clone()
    out_cost, start_cost = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    out_scale = torch.zeros(n, dtype=torch.complex128)
    eye = torch.eye(p, dtype=torch.float64)

    def evaluate(s, x, f, jacobian=True):
        shifted = torch.cat([x] + [x + step * eye[k] for k in range(p)]) if jacobian else x
        if f is None:
            sig = simulate(shifted)
        else:
            sig = simulate(shifted, f.repeat(len(shifted) // len(x), *([1] * (f.dim() - 1))))
        models = sig.to(torch.complex128).reshape(-1, x.shape[0], sig.shape[-1])
        r0 = _projected_residual(s, models[0])
        jac = torch.stack([(_projected_residual(s, models[k + 1]) - r0) / step for k in range(p)], -1) \
            if jacobian else None
        scale = torch.linalg.vecdot(models[0], s) / torch.linalg.vecdot(models[0], models[0]).real.clamp_min(1e-30)
        return r0, jac, scale

    for lo in range(0, n, chunk):
        s = torch.as_tensor(signals[lo:lo + chunk]).to(torch.complex128)
        x = x0[lo:lo + chunk].clone()
        lo_b, hi_b = lower[lo:lo + chunk], upper[lo:lo + chunk]
        f = None if fixed is None else torch.as_tensor(fixed)[lo:lo + chunk]
        r, jac, scale = evaluate(s, x, f)
        cost = r.square().sum(-1)
        start_cost[lo:lo + chunk] = cost
        active = torch.isfinite(cost)
        for _ in range(iterations):
            rows = torch.nonzero(active).flatten()
            if rows.numel() == 0:
                break
            j = jac[rows]
            jtj = j.mT @ j
            jtr = (j.mT @ r[rows][..., None])[..., 0]
            damp = 1e-6 * torch.diagonal(jtj, dim1=-2, dim2=-1).clamp_min(1e-30)
            delta = torch.linalg.solve(jtj + torch.diag_embed(damp), -jtr)
            trial = torch.minimum(torch.maximum(x[rows] + delta, lo_b[rows]), hi_b[rows])
            trial = torch.where(torch.isfinite(trial), trial, x[rows])
            r_t, jac_t, scale_t = evaluate(s[rows], trial, None if f is None else f[rows], update_jacobian)
            c_t = r_t.square().sum(-1)
            better = c_t < cost[rows]
            acc = rows[better]
            x[acc], r[acc], cost[acc] = trial[better], r_t[better], c_t[better]
            if update_jacobian:
                jac[acc] = jac_t[better]
            scale[acc] = scale_t[better]
            active[rows[~better]] = False
        out_x[lo:lo + chunk], out_cost[lo:lo + chunk], out_scale[lo:lo + chunk] = x, cost, scale
    return RefineResult(x=out_x, cost=out_cost, start_cost=start_cost, scale=out_scale)


def lagrange_weights(u: torch.Tensor, n: int) -> torch.Tensor:
    """Weights ``[..., n]`` of the Lagrange polynomial through nodes ``0 … n−1`` at positions ``u`` ``[...]``
    (``Σ_k w_k f(k)`` interpolates ``f`` at ``u``, exactly for polynomials of degree < ``n``)."""
    k = torch.arange(n, dtype=u.dtype)
    diff = u[..., None] - k  # [..., n]
    cols = []
    for j in range(n):
        others = torch.cat([diff[..., :j], diff[..., j + 1:]], -1)
        denom = float(torch.prod(j - torch.cat([k[:j], k[j + 1:]]))) if n > 1 else 1.0
        cols.append(torch.prod(others, -1) / denom)
    return torch.stack(cols, -1)


#: Nodes of the interpolation stencil along a refined axis (±2 around the match) and along a fixed axis.
FREE_STENCIL, FIXED_STENCIL = 5, 4


def _interpolant(u: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``Σ_ab L_a(u_0) L_b(u_1) … table[:, a, b, …]``: ``u`` ``[n, F]``, ``table`` ``[n, 5, …, 5, R]``."""
    out = table
    for f in range(u.shape[1]):
        w = lagrange_weights(u[:, f], FREE_STENCIL).to(out.dtype)  # [n, 5]
        # broadcast multiply-add (a batched 1 x 5 GEMM per signal would be far slower)
        out = (w.reshape(*w.shape, *([1] * (out.dim() - 2))) * out).sum(1)
    return out


def refine_on_grid(signals: torch.Tensor, atoms: torch.Tensor, node_index: torch.Tensor, start: torch.Tensor,
                   free: tuple[bool, ...], *, iterations: int = 4, chunk: int = 2048
                   ) -> tuple[RefineResult, torch.Tensor]:
    """Refinement inside the winning cell on an interpolant of the dictionary itself (no simulation).

    The atoms lie on a regular grid: ``node_index`` ``[G_1, …, G_D]`` gives the atom row of each
    grid node (−1: no atom there). ``start`` ``[N, D]`` is each signal's position in grid units:
    the matched node along the ``free`` axes (refined) and the known, continuous coordinate along
    the others (fixed, e.g. a measured B1). Along a fixed axis the atoms are interpolated by the
    cubic Lagrange polynomial of the 4 nodes around the coordinate; along the free axes by the
    degree-4 polynomial through the 5 nodes centred on the match (moved inwards at the grid's
    edges), and ``refine_gauss_newton`` (every-step Jacobian) runs on that polynomial model inside
    ±1 node of the match. Cost: a few hundred multiply-adds per signal and iteration, whatever the
    length of the simulated signal.

    Returns ``(result, ok)``: ``result.x`` ``[N, F]`` refined grid coordinates of the free axes
    (``start`` where not ``ok``) and ``ok`` ``[N]``: a full stencil of atoms existed (a fixed
    coordinate inside the grid, every stencil node present). Refine the rest another way.
    """
    node_index = torch.as_tensor(node_index, dtype=torch.long)
    start = torch.as_tensor(start, dtype=torch.float64)
    dims = node_index.shape
    if start.shape[1] != len(dims) or len(free) != len(dims):
        raise ValueError(f"start has {start.shape[1]} coordinates, the grid {len(dims)} axes, free {len(free)}")
    n = start.shape[0]
    free_axes = [d for d in range(len(dims)) if free[d]]
    out_x = start[:, free_axes].clone()
    cost = torch.full((n,), torch.nan, dtype=torch.float64)
    start_cost = torch.full((n,), torch.nan, dtype=torch.float64)
    scale = torch.zeros(n, dtype=torch.complex128)
    ok_all = torch.zeros(n, dtype=torch.bool)
    for lo in range(0, n, chunk):
        pos = start[lo:lo + chunk]
        m = pos.shape[0]
        ok = torch.isfinite(pos).all(1)
        bases, offsets, fixed_w = [], [], []
        for d, size in enumerate(dims):
            width = FREE_STENCIL if free[d] else FIXED_STENCIL
            p = torch.nan_to_num(pos[:, d])
            ok &= (p >= 0) & (p <= size - 1) & (size >= width)
            first = (torch.round(p) - 2) if free[d] else (torch.floor(p) - 1)
            base = first.clamp(0, max(size - width, 0)).long()
            bases.append(base)
            offsets.append(torch.arange(width))
            if not free[d]:
                fixed_w.append(lagrange_weights(p - base, width))
        # gather the stencil [m, w_1, …, w_D] of atom rows
        idx = []
        for d in range(len(dims)):
            shape = [m] + [1] * len(dims)
            shape[d + 1] = offsets[d].numel()
            idx.append((bases[d][:, None] + offsets[d]).reshape(shape).clamp_max(dims[d] - 1))
        rows = node_index[tuple(idx)]
        ok &= (rows >= 0).flatten(1).all(1)
        sel = torch.nonzero(ok).flatten()
        if sel.numel() == 0:
            continue
        table = atoms[rows[sel].clamp_min(0)]  # [k, w_1, …, w_D, R]
        # contract the fixed axes (last first, so the axis numbers of the others stay put)
        fixed_axes = [d for d in range(len(dims)) if not free[d]]
        for d, w in zip(reversed(fixed_axes), reversed(fixed_w)):
            table = torch.einsum("nk...,nk->n...", torch.movedim(table, d + 1, 1), w[sel].to(table.dtype))
        table = table.to(torch.complex128)
        # free axes: table is now [k, 5, …, 5, R]; the model's coordinates are relative to the base
        base_free = torch.stack([bases[d][sel] for d in free_axes], 1).double()
        x0 = pos[sel][:, free_axes] - base_free
        lower = (x0.round() - 1).clamp(0, FREE_STENCIL - 1)
        upper = (x0.round() + 1).clamp(0, FREE_STENCIL - 1)
        res = refine_gauss_newton(lambda u, t: _interpolant(u, t), signals[lo:lo + chunk][sel], x0, lower, upper,
                                  fixed=table, iterations=iterations, step=1e-4, chunk=len(sel))
        rows_out = lo + sel
        out_x[rows_out] = res.x + base_free
        cost[rows_out], start_cost[rows_out], scale[rows_out] = res.cost, res.start_cost, res.scale
        ok_all[rows_out] = True
    return RefineResult(x=out_x, cost=cost, start_cost=start_cost, scale=scale), ok_all
