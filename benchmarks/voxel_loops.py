"""Compiled voxel-by-voxel references for the physics benchmarks (numba; benchmark-only).

Each kernel runs the *same algorithm* as the batched PyTorch model it is compared with, one
voxel at a time in an ``@njit`` loop (LLVM-compiled, one thread, no Python in the loop), in the
precision of its input arrays: ``kernels(np.float32)`` builds kernels whose every constant and
intermediate is float32 (``single_precision`` checks the typed IR for float64), so a float32
model is compared with a float32 loop. The compile happens on the first call; time the second.

This is the reference a user would otherwise write ("loop over the voxels in a compiled
language"); an interpreted Python loop would measure the interpreter, not the method. numba is a
runtime dependency (the app's fused MRF matching kernel, ``fitting.match_kernel``); these
references are benchmark-only.
"""

from __future__ import annotations

import functools
import io
import math

import numpy as np

try:
    import numba
except ImportError as exc:  # pragma: no cover - benchmark-only dependency
    raise SystemExit("the compiled references need numba: pip install numba") from exc

# (Taylor degree m, Paterson–Stockmeyer block p) as in bids_qmri.physics.qmt._TAYLOR
_TAYLOR = np.array([(5, 2), (8, 3), (11, 4), (15, 4), (19, 4), (23, 4)], dtype=np.int64)


def single_precision(*kernels) -> bool:
    """True when no float64 value appears in the typed IR of the kernels (all compiled signatures)."""
    buf = io.StringIO()
    for kernel in kernels:
        kernel.inspect_types(file=buf)
    return "float64" not in buf.getvalue()


@functools.lru_cache(maxsize=2)
def kernels(dtype) -> dict:
    """``{name: njit kernel}`` computing in ``dtype`` (``np.float32`` or ``np.float64``)."""
    dt = np.dtype(dtype).type
    ZERO, HALF, ONE, TWO = dt(0.0), dt(0.5), dt(1.0), dt(2.0)
    TWO_PI, PI = dt(2.0 * math.pi), dt(math.pi)
    EXPM_THETA = dt(2.0)
    EXPM_TOL = dt(1e-8 if dt is np.float32 else 1e-16)
    EXPM_SMAX = 4
    SMALL_RXT = dt(1e-6)
    # 1/k! for k ≤ 23 in the working precision
    INV_FACT = np.array([1.0 / math.factorial(k) for k in range(24)], dtype=dt)
    TAYLOR = _TAYLOR

    @numba.njit(cache=False)
    def inversion_recovery(a, b, t1, ti, out):
        """``out[i, n] = |a_i (1 − b_i e^{−ti_n/T1_i})|``."""
        for i in range(t1.shape[0]):
            r1 = ONE / t1[i]
            for n in range(ti.shape[0]):
                out[i, n] = abs(a[i] * (ONE - b[i] * math.exp(-ti[n] * r1)))

    @numba.njit(cache=False)
    def t2_decay(a, t2, te, out):
        """``out[i, n] = |a_i e^{−te_n/T2_i}|``."""
        for i in range(t2.shape[0]):
            r2 = ONE / t2[i]
            for n in range(te.shape[0]):
                out[i, n] = abs(a[i] * math.exp(-te[n] * r2))

    @numba.njit(cache=False)
    def _train(n, cos_a, log_cos_a, esp, r1):
        """n × (pulse, recovery for esp) as one affine map (a, b), the closed form of mprage._train."""
        if n == ZERO:
            return ONE, ZERO
        one_minus_e = -math.expm1(-esp * r1)
        log_q = log_cos_a - esp * r1
        one_minus_qn = -math.expm1(n * log_q)
        one_minus_q = (ONE - cos_a) + cos_a * one_minus_e
        return math.exp(n * log_q), one_minus_e * one_minus_qn / one_minus_q

    @numba.njit(cache=False)
    def mprage(t1, b1, flip, esp, t_first, t_after, n_after, n_centre, eta, out):
        """Periodic steady-state MPRAGE signal (M0 = 1), the algorithm of mprage.mprage_signal:
        compose the affine maps of one period from just before the centre pulse, Mz* = b/(1 − a)."""
        for i in range(t1.shape[0]):
            r1 = ONE / t1[i]
            alpha = flip * b1[i]
            cos_a = math.cos(alpha)
            s = math.sin(alpha / TWO)
            log_cos_a = math.log1p(-TWO * s * s)
            a, b = _train(n_after, cos_a, log_cos_a, esp, r1)
            a, b = cos_a * a, cos_a * b  # the last pulse
            e = math.exp(-t_after * r1)
            a, b = e * a, e * b - math.expm1(-t_after * r1)  # recovery to the inversion
            a, b = -eta * a, -eta * b  # inversion
            e = math.exp(-t_first * r1)
            a, b = e * a, e * b - math.expm1(-t_first * r1)  # recovery to the first pulse
            a2, b2 = _train(n_centre, cos_a, log_cos_a, esp, r1)
            a, b = a2 * a, a2 * b + b2
            out[i] = abs(math.sin(alpha) * (b / (ONE - a)))

    @numba.njit(cache=False)
    def fisp(t1, t2, b1, flip, tr, te, z0, cap, out):
        """FISP EPG echoes (real), the algorithm of epg.fisp_mrf: P = F⁺ + F⁻, M = F⁺ − F⁻ and Z
        per order, only the orders that can still return to 0 before the last echo (and ≤ cap)."""
        nt = flip.shape[0]
        P = np.zeros(nt + 1, dtype=t1.dtype)
        M = np.zeros(nt + 1, dtype=t1.dtype)
        Z = np.zeros(nt + 1, dtype=t1.dtype)
        FP = np.zeros(nt + 1, dtype=t1.dtype)
        FM = np.zeros(nt + 1, dtype=t1.dtype)
        for i in range(t1.shape[0]):
            r1, r2 = ONE / t1[i], ONE / t2[i]
            e2te = math.exp(-te * r2)
            P[0], M[0], Z[0] = ZERO, ZERO, z0[i]
            length = 1
            for n in range(nt):
                alpha = b1[i] * flip[n]
                ca, sa = math.cos(alpha), math.sin(alpha)
                for k in range(length):
                    p, z = P[k], Z[k]
                    P[k] = ca * p + TWO * sa * z
                    Z[k] = ca * z - HALF * sa * p
                out[i, n] = HALF * (P[0] + M[0]) * e2te
                if n == nt - 1:
                    break
                e1 = math.exp(-tr[n] * r1)
                e2 = math.exp(-tr[n] * r2)
                for k in range(length):
                    FP[k] = HALF * (P[k] + M[k]) * e2
                    FM[k] = HALF * (P[k] - M[k]) * e2
                    Z[k] = Z[k] * e1
                Z[0] = Z[0] - math.expm1(-tr[n] * r1)
                new = min(length + 1, nt - 1 - n, cap + 1)
                for k in range(new):  # the spoiler: F⁺_k ← F⁺_{k−1}, F⁺_0 ← F⁻_1, F⁻_k ← F⁻_{k+1}
                    if k == 0:
                        fp = FM[1] if length > 1 else ZERO
                    else:
                        fp = FP[k - 1] if k - 1 < length else ZERO
                    fm = FM[k + 1] if k + 1 < length else ZERO
                    P[k] = fp + fm
                    M[k] = fp - fm
                    if k >= length:
                        Z[k] = ZERO
                length = new

    # --- qMT: 4×5 affine maps [A | a] with an implicit last row (0, 0, 0, 0, λ) ---------------
    @numba.njit(cache=False)
    def _mul(a, b, lam_b, out):
        """Top rows of [[A, a], [0, ·]] @ [[B, b], [0, λ_b]] into ``out``."""
        for r in range(4):
            for c in range(5):
                acc = a[r, 0] * b[0, c] + a[r, 1] * b[1, c] + a[r, 2] * b[2, c] + a[r, 3] * b[3, c]
                if c == 4:
                    acc += a[r, 4] * lam_b
                out[r, c] = acc

    @numba.njit(cache=False)
    def _block(pw, p, j, dest):
        """Σ_{i<p} c_{jp+i} X^i (a map with λ = c_{jp}) into ``dest``."""
        for r in range(4):
            for c in range(5):
                v = INV_FACT[j * p] if r == c else ZERO
                for i in range(1, p):
                    v += INV_FACT[j * p + i] * pw[i, r, c]
                dest[r, c] = v

    @numba.njit(cache=False)
    def _expm(x, work, out):
        """exp of a generator ``x`` (4×5, λ = 0) by Taylor–Paterson–Stockmeyer with scaling and
        squaring (qmt._expm_affine; the degree is chosen per pulse from its own norm)."""
        norm = ZERO
        for r in range(4):
            row = abs(x[r, 0]) + abs(x[r, 1]) + abs(x[r, 2]) + abs(x[r, 3]) + abs(x[r, 4])
            norm = max(norm, row)
        s = 0
        if norm > EXPM_THETA:
            s = min(int(math.ceil(math.log2(norm / EXPM_THETA))), EXPM_SMAX)
        scale = ONE
        for _ in range(s):
            scale = scale * HALF
        nu = norm * scale
        m, p = TAYLOR[-1, 0], TAYLOR[-1, 1]
        for j in range(TAYLOR.shape[0]):
            mm = TAYLOR[j, 0]
            bound = ONE
            for k in range(1, mm + 2):
                bound = bound * nu / dt(k)
            if bound <= EXPM_TOL:
                m, p = mm, TAYLOR[j, 1]
                break
        pw = work[0]  # pw[k] = X^k (k = 1..p), λ = 0
        for r in range(4):
            for c in range(5):
                pw[1, r, c] = x[r, c] * scale
        for k in range(2, p + 1):
            _mul(pw[k - 1], pw[1], ZERO, pw[k])
        n_blocks = (m + 1) // p
        res, tmp = work[1, 0], work[1, 1]
        _block(pw, p, n_blocks - 1, res)
        for j in range(n_blocks - 2, -1, -1):
            lam = INV_FACT[(j + 1) * p]
            _mul(pw[p], res, lam, tmp)
            _block(pw, p, j, res)
            for r in range(4):
                for c in range(5):
                    res[r, c] += tmp[r, c]
        for _ in range(s):
            _mul(res, res, ONE, tmp)
            res[:, :] = tmp
        out[:, :] = res

    @numba.njit(cache=False)
    def _apply_free(t, r1, r2f, dw, rx, kf, ks, m0f, m0s, x, out):
        """Free precession for ``t`` (closed form, qmt._free_precession) after the map ``x`` (λ = 1)."""
        decay = math.exp(-t * r2f)
        e1 = math.exp(-t * r1)
        rxt = rx * t
        frac = -math.expm1(-rxt) / rx if rxt > SMALL_RXT else t * (ONE - HALF * rxt)
        l11, l12 = e1 * (ONE - frac * kf), e1 * frac * ks
        l21, l22 = e1 * frac * kf, e1 * (ONE - frac * ks)
        o1 = m0f - (l11 * m0f + l12 * m0s)
        o2 = m0s - (l21 * m0f + l22 * m0s)
        dc, ds = decay * math.cos(dw * t), decay * math.sin(dw * t)
        for c in range(5):
            out[0, c] = dc * x[0, c] + ds * x[1, c]
            out[1, c] = dc * x[1, c] - ds * x[0, c]
            out[2, c] = l11 * x[2, c] + l12 * x[3, c]
            out[3, c] = l21 * x[2, c] + l22 * x[3, c]
        out[2, 4] += o1
        out[3, 4] += o2

    @numba.njit(cache=False)
    def _generator(omega1, rrf, r1, r2f, dw, kf, ks, m0f, m0s, tau, g):
        g[:, :] = ZERO
        g[0, 0], g[0, 1] = -r2f * tau, dw * tau
        g[1, 0], g[1, 1], g[1, 2] = -dw * tau, -r2f * tau, omega1 * tau
        g[2, 1], g[2, 2], g[2, 3], g[2, 4] = -omega1 * tau, (-r1 - kf) * tau, ks * tau, r1 * m0f * tau
        g[3, 2], g[3, 3], g[3, 4] = kf * tau, (-r1 - ks - rrf) * tau, r1 * m0s * tau

    @numba.njit(cache=False)
    def qmt(m0s, t1, t2f, rx, b0_hz, b1, flip, tau, sign, tr, inv_dur, h, out):
        """Anti-periodic steady-state hybrid-state echoes (Mx, My), the algorithm of
        qmt.hybrid_state_signal: inversion and every TR composed into the cycle map, its fixed
        point by a 4×4 solve, echoes from the stored echo rows. ``h[i, n]``: saturation integrals
        per TR (``n = nt``: the inversion pulse), ``Rrf = ω1²·h``."""
        nt = flip.shape[0]
        g = np.zeros((4, 5), dtype=t1.dtype)
        prop = np.zeros((4, 5), dtype=t1.dtype)
        echo = np.zeros((4, 5), dtype=t1.dtype)
        full = np.zeros((4, 5), dtype=t1.dtype)
        q = np.zeros((4, 5), dtype=t1.dtype)
        qn = np.zeros((4, 5), dtype=t1.dtype)
        rows = np.zeros((nt, 4, 5), dtype=t1.dtype)
        work = np.zeros((2, 5, 4, 5), dtype=t1.dtype)
        a = np.zeros((4, 5), dtype=t1.dtype)
        for i in range(t1.shape[0]):
            m0f = ONE - m0s[i]
            r1, r2f = ONE / t1[i], ONE / t2f[i]
            kf, ks = rx[i] * m0s[i], rx[i] * m0f
            dw = TWO_PI * b0_hz[i]
            omega1 = b1[i] * PI / inv_dur
            _generator(omega1, omega1 * omega1 * h[i, nt], r1, r2f, dw, kf, ks, m0f, m0s[i], inv_dur, g)
            _expm(g, work, q)
            for n in range(nt):
                omega1 = b1[i] * sign[n] * flip[n] / tau[n]
                _generator(omega1, omega1 * omega1 * h[i, n], r1, r2f, dw, kf, ks, m0f, m0s[i], tau[n], g)
                _expm(g, work, prop)
                t = HALF * (tr - tau[n])
                _apply_free(t, r1, r2f, dw, rx[i], kf, ks, m0f, m0s[i], prop, echo)
                _apply_free(t, r1, r2f, dw, rx[i], kf, ks, m0f, m0s[i], echo, full)
                _mul(echo, q, ONE, rows[n])  # the map from the cycle start to this echo
                _mul(full, q, ONE, qn)
                q[:, :] = qn
            # fixed point x = (I − C)⁻¹ c: Gaussian elimination with partial pivoting on [I − C | c]
            for r in range(4):
                for c in range(4):
                    a[r, c] = (ONE if r == c else ZERO) - q[r, c]
                a[r, 4] = q[r, 4]
            for c in range(4):
                piv = c
                for r in range(c + 1, 4):
                    if abs(a[r, c]) > abs(a[piv, c]):
                        piv = r
                if piv != c:
                    for k in range(5):
                        a[c, k], a[piv, k] = a[piv, k], a[c, k]
                for r in range(c + 1, 4):
                    f = a[r, c] / a[c, c]
                    for k in range(c, 5):
                        a[r, k] -= f * a[c, k]
            x3 = a[3, 4] / a[3, 3]
            x2 = (a[2, 4] - a[2, 3] * x3) / a[2, 2]
            x1 = (a[1, 4] - a[1, 2] * x2 - a[1, 3] * x3) / a[1, 1]
            x0 = (a[0, 4] - a[0, 1] * x1 - a[0, 2] * x2 - a[0, 3] * x3) / a[0, 0]
            for n in range(nt):
                for r in range(2):
                    out[i, n, r] = sign[n] * (rows[n, r, 0] * x0 + rows[n, r, 1] * x1 + rows[n, r, 2] * x2
                                              + rows[n, r, 3] * x3 + rows[n, r, 4])

    return {"inversion_recovery": inversion_recovery, "t2_decay": t2_decay, "mprage": mprage, "fisp": fisp,
            "qmt": qmt, "_helpers": (_train, _mul, _block, _expm, _apply_free, _generator)}
