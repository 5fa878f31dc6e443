"""Fused dictionary-matching kernel (numba): the best atom of each signal without a score matrix.

``fitting.dictmatch.match`` computes ``|⟨d̂, s⟩|²`` block by block with a GEMM and then takes a
running argmax over each score block; with a rank of ~10 the GEMM is memory-bound on its output
and the |·|² and argmax passes over the block cost as much again. This kernel fuses the three:
for one signal and one tile of atoms (atoms contiguous, so the loop over atoms vectorises) it
accumulates Re and Im of ``⟨d̂, s⟩`` over the rank in registers, writes ``|·|²`` into a small
buffer that stays in L1, and keeps the running maximum and its index per signal.

Exactness and ties (the same contract as the GEMM path):

- The maximum of a tile is taken on the *bit patterns* of the scores: a non-negative IEEE float
  orders like the integer of its bits (``|·|²`` is never negative, and never −0), and an integer
  maximum vectorises where a float maximum (NaN rules) does not. The winner's index is then the
  first position of that exact value in the same buffer, so the score that wins is bitwise the
  score that was compared, and ties go to the lowest atom index (a later tile must be strictly
  larger).
- The rank is padded with zeros to a multiple of 4 (exact: adding ``0·0`` changes no sum) and is
  a compile-time constant of the kernel (passed as the length of a tuple, which is part of the
  argument types: no per-call literal dispatch), so the loop over the rank unrolls inside the
  loop over atoms; one compilation serves ranks 9–12, another 13–16, …
- No fast-math beyond contraction (``CONTRACT``): sums run in the order written, a multiply-add
  may round once (as in a BLAS GEMM, whose summation order is its own: the two paths may differ
  in the last bit of a score, and so on a near-tie below that precision; exact ties, e.g. of
  duplicate atoms, are found by both).
- Threads split the signals into blocks (``prange``); each signal is scored by one thread with
  the same code whatever the thread count, so results do not depend on it.

Compiled on first use per (dtype, real or complex atoms, padded rank) and cached on disk when
numba finds a writable cache folder: ``__pycache__`` beside this file, else ``NUMBA_CACHE_DIR``
(the container sets ``/tmp/.cache/numba``), else the user cache folder; with none writable (a
read-only file system) it compiles in memory on every run instead of failing.
"""

from __future__ import annotations

import numpy as np

try:
    import numba
except ImportError:  # the torch GEMM path in fitting.dictmatch is used instead
    numba = None

#: Atoms per tile: ``rank × TILE`` values (20–40 KiB at rank 10 in float32) stay in L1 while a
#: block of signals is scored against them.
TILE = 512
#: Signals per parallel block (one thread scores a block against every tile).
VOXEL_BLOCK = 64
#: Signals per kernel call (bounds the per-block score buffers).
CALL_VOXELS = 16384
#: The only fast-math flag: ``a * x + re`` may be one fused multiply-add (one rounding instead of
#: two; deterministic for a given build; 1.2–1.4× faster measured). No reassociation, no NaN or
#: infinity assumptions: the order of every sum is the order written.
CONTRACT = {"contract"}


def available() -> bool:
    """numba can be imported (the kernel can be compiled)."""
    return numba is not None


def padded_rank(rank: int) -> int:
    """The rank the kernel is compiled for: ``rank`` rounded up to a multiple of 4."""
    return max(4, -(-int(rank) // 4) * 4)


if numba is not None:
    from numba import njit, prange

    def _cache_usable() -> bool:
        """numba finds a writable cache folder for this module (else it refuses ``cache=True``)."""
        try:
            njit(cache=True)(_probe)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return False
        return True

    def _probe():
        return 0

    _CACHE = _cache_usable()

    @njit(cache=_CACHE, fastmath=CONTRACT)
    def _power_real(x, y, tile, n, out, rank_tag):
        """``out[j] = |⟨d̂_j, x + iy⟩|²`` for the real atoms ``tile[:, j]``, ``j < n``."""
        rank = len(rank_tag)
        for j in range(n):
            re = tile[0, j] * x[0]
            im = tile[0, j] * y[0]
            for k in range(1, rank):  # a compile-time count: unrolled, the j loop vectorises
                a = tile[k, j]
                re += a * x[k]
                im += a * y[k]
            out[j] = re * re + im * im

    @njit(cache=_CACHE, fastmath=CONTRACT)
    def _power_complex(x, y, tile_re, tile_im, n, out, rank_tag):
        """``out[j] = |⟨d̂_j, x + iy⟩|²`` for ``d̂_j = tile_re[:, j] + i tile_im[:, j]``:
        ``conj(a + ib)(x + iy) = (ax + by) + i(ay − bx)``."""
        rank = len(rank_tag)
        for j in range(n):
            a = tile_re[0, j]
            b = tile_im[0, j]
            re = a * x[0] + b * y[0]
            im = a * y[0] - b * x[0]
            for k in range(1, rank):
                a = tile_re[k, j]
                b = tile_im[k, j]
                re += a * x[k] + b * y[k]
                im += a * y[k] - b * x[k]
            out[j] = re * re + im * im

    @njit(cache=_CACHE)
    def _keep_best(bits, n, offset, v, best, arg):
        """Running argmax of signal ``v`` over one tile, on the scores' bit patterns ``bits[:n]``."""
        m = bits[0]
        for j in range(1, n):  # integer maximum: vectorises
            m = max(m, bits[j])
        if m > best[v]:  # strictly: an earlier tile keeps a tie
            for j in range(n):
                if bits[j] == m:  # the first maximum of the tile
                    best[v] = m
                    arg[v] = offset + j
                    break

    @njit(parallel=True, cache=_CACHE)
    def _match(s_re, s_im, tiles_re, tiles_im, n_atoms, scratch, scratch_bits, best, arg, rank_tag):
        """Running argmax of every signal over all tiles; real atoms when ``tiles_im`` is empty."""
        n_signals = s_re.shape[0]
        width = tiles_re.shape[2]
        real = tiles_im.shape[0] == 0
        for b in prange(scratch.shape[0]):
            out, bits = scratch[b], scratch_bits[b]
            v1 = min(n_signals, (b + 1) * VOXEL_BLOCK)
            for t in range(tiles_re.shape[0]):
                n = min(width, n_atoms - t * width)
                for v in range(b * VOXEL_BLOCK, v1):
                    if real:
                        _power_real(s_re[v], s_im[v], tiles_re[t], n, out, rank_tag)
                    else:
                        _power_complex(s_re[v], s_im[v], tiles_re[t], tiles_im[t], n, out, rank_tag)
                    _keep_best(bits, n, t * width, v, best, arg)


def _tiles(part: np.ndarray, rank: int, tile: int) -> np.ndarray:
    """``part`` ``[A, R]`` as contiguous tiles ``[ceil(A / tile), rank, tile]`` (zero padding)."""
    n_atoms, r = part.shape
    n_tiles = -(-n_atoms // tile)
    out = np.zeros((n_tiles * tile, rank), dtype=part.dtype)
    out[:n_atoms, :r] = part
    return np.ascontiguousarray(out.reshape(n_tiles, tile, rank).transpose(0, 2, 1))


def best_atoms(signals: np.ndarray, unit_atoms: np.ndarray, *, num_threads: int | None = None,
               tile: int = TILE) -> np.ndarray:
    """Index ``[V]`` of the unit atom ``unit_atoms`` ``[A, R]`` with the largest ``|⟨d̂, s⟩|`` for each
    signal of ``signals`` ``[V, R]`` (both complex; ties: the lowest index). Atoms of any one common
    norm give the same argmax.

    ``unit_atoms`` may be a real array (float32 or float64). Runs in float32 for complex64 or
    float32 atoms, else float64. Real atoms (a real array, or an imaginary part exactly zero) take
    the real kernel (half the multiply-adds). ``num_threads``: numba threads (capped at
    ``numba.config.NUMBA_NUM_THREADS``; the caller's setting is restored afterwards). The caller
    passes finite signals only (a NaN would order above every score).
    """
    if numba is None:
        raise RuntimeError("the fused matching kernel needs numba (pip install numba)")
    dtype = np.float32 if unit_atoms.dtype in (np.complex64, np.float32) else np.float64
    bits_dtype = np.int32 if dtype == np.float32 else np.int64
    n_signals, rank = signals.shape
    n_atoms = unit_atoms.shape[0]
    arg = np.zeros(n_signals, dtype=np.int64)
    if n_signals == 0 or n_atoms == 0:
        return arg
    r4 = padded_rank(rank)
    real_atoms = not np.iscomplexobj(unit_atoms) or not np.any(unit_atoms.imag)
    tiles_re = _tiles(unit_atoms.real.astype(dtype), r4, tile)
    tiles_im = np.empty((0, r4, tile), dtype) if real_atoms else _tiles(unit_atoms.imag.astype(dtype), r4, tile)
    best = np.full(n_signals, -1, dtype=bits_dtype)
    rank_tag = (0,) * r4  # the rank as a type: a tuple's length is a compile-time constant
    old = numba.get_num_threads()
    if num_threads:
        numba.set_num_threads(max(1, min(int(num_threads), numba.config.NUMBA_NUM_THREADS)))
    try:
        for lo in range(0, n_signals, CALL_VOXELS):
            hi = min(n_signals, lo + CALL_VOXELS)
            # zero-padded real and imaginary parts, one call's worth at a time (bounded memory)
            s_re, s_im = np.zeros((2, hi - lo, r4), dtype=dtype)
            s_re[:, :rank], s_im[:, :rank] = signals[lo:hi].real, signals[lo:hi].imag
            blocks = -(-(hi - lo) // VOXEL_BLOCK)
            scratch = np.empty((blocks, tile), dtype=dtype)
            scratch_bits = scratch.view(bits_dtype)
            _match(s_re, s_im, tiles_re, tiles_im, n_atoms, scratch, scratch_bits, best[lo:hi], arg[lo:hi], rank_tag)
    finally:
        numba.set_num_threads(old)
    return arg
