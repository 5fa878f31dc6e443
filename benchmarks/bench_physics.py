"""Throughput of the batched physics models, side by side with per-voxel reference simulators.

For every model: signals per second of our batched PyTorch model (one call on ``--batch``
voxels) and of an independent per-voxel reference (the simulators the tests compare against:
brute-force MPRAGE repetitions, a 2000-isochromat Bloch simulation for FISP-MRF, a scipy
``solve_ivp`` integration of the Bloch–McConnell equations for qMT, a NumPy loop for IR/T2),
and their ratio. CRB rows compare ``torch.func`` (vmap + jacfwd) with central finite
differences of the same batched model. Rates use CPU seconds of this process
(``time.process_time``, all threads), which other users of the shared machine do not inflate;
wall-clock rates are printed beside them.

Run: ``OMP_NUM_THREADS=2 nice -n 10 python benchmarks/bench_physics.py [--batch 2000] [--threads 2]``
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bids_qmri.physics import crb, epg, mprage, qmt, relaxation

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_physics_epg import isochromat_fisp  # noqa: E402  (the tests' reference simulators)
from test_physics_mprage import brute_force  # noqa: E402
from test_physics_qmt import bloch_mcconnell_ode  # noqa: E402

SEED_TI = np.linspace(0.139, 0.937, 31)  # seed 004: 31 inversion times
SEED_TE = np.array([0.01, 0.02, 0.04, 0.08, 0.16, 0.32])  # seed 004: T2 preparation times


def timed(fn):
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=100_000, help="voxels per call of the closed-form models")
    ap.add_argument("--sim-batch", type=int, default=500, help="voxels per call of the EPG and qMT models")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rng = np.random.default_rng(args.seed)
    n = args.batch
    t1 = torch.from_numpy(rng.uniform(0.3, 3.0, n)).to(dtype)
    t2 = torch.from_numpy(rng.uniform(0.02, 0.3, n)).to(dtype)
    b1 = torch.from_numpy(rng.uniform(0.8, 1.2, n)).to(dtype)
    a = torch.ones(n, dtype=dtype)
    rows = []

    def row(name, n_ours, ours, n_ref, ref, length):
        timed(lambda: ours(1))  # warm-up (lazy imports, tables)
        c_o, w_o = timed(lambda: ours(n_ours))
        c_r, w_r = timed(lambda: ref(n_ref))
        r_o, r_r = n_ours / c_o, n_ref / c_r
        rows.append((name, length, n_ours, r_o, n_ours / w_o, n_ref, r_r, r_o / r_r))
        print(f"  {name}: {r_o:,.0f} vs {r_r:,.1f} signals/CPU-s", flush=True)

    # --- IR / T2 (seed 004) ---------------------------------------------------------------
    ti, te = torch.from_numpy(SEED_TI).to(dtype), torch.from_numpy(SEED_TE).to(dtype)
    t1n, t2n = t1.numpy(), t2.numpy()
    row("inversion_recovery", n, lambda k: relaxation.inversion_recovery(a[:k], 2.0, t1[:k], ti),
        n // 10, lambda k: [np.abs(1.0 * (1 - 2.0 * np.exp(-SEED_TI / t1n[i]))) for i in range(k)], 31)
    row("t2_decay", n, lambda k: relaxation.t2_decay(a[:k], t2[:k], te),
        n // 10, lambda k: [np.abs(np.exp(-SEED_TE / t2n[i])) for i in range(k)], 6)

    # --- MPRAGE: closed form vs 30 brute-force repetitions ---------------------------------
    p = mprage.default_mprage_protocol()
    row("mprage_signal", n, lambda k: mprage.mprage_signal(t1[:k], 1.0, b1[:k], **p),
        20, lambda k: [brute_force(float(t1[i]), 1.0, float(b1[i]), ti=p["ti"], tr_prep=p["tr_prep"],
                                   esp=p["echo_spacing"], flip=p["flip_rad"], n=p["n_readout"],
                                   centre=p["n_readout"] // 2, reps=30) for i in range(k)], 1)

    # --- FISP-MRF: EPG (exact and 50 states) vs 2000 isochromats ---------------------------
    s = epg.default_fisp_schedule()
    nm = min(n, args.sim_batch)
    iso = lambda k: [isochromat_fisp(float(t1[i]), float(t2[i]), float(b1[i]), s["flip_rad"].numpy(),  # noqa: E731
                                     s["tr"].numpy(), s["te"], s["ti"], n_spins=2000) for i in range(k)]
    row("fisp_mrf (exact)", nm, lambda k: epg.fisp_mrf(t1[:k], t2[:k], b1[:k], **s), 2, iso, 1000)
    row("fisp_mrf (n_states=50)", nm, lambda k: epg.fisp_mrf(t1[:k], t2[:k], b1[:k], n_states=50, **s), 2, iso, 1000)

    # --- qMT: matrix exponentials + steady-state solve vs solve_ivp of one cycle ------------
    q = qmt.default_qmt_schedule()
    nq = min(n, args.sim_batch)
    m0s = torch.from_numpy(rng.uniform(0.0, 0.25, nq)).to(dtype)
    b0 = torch.from_numpy(rng.uniform(-100, 100, nq)).to(dtype)

    def ode(k):
        for i in range(k):
            par = (float(m0s[i]), float(t1[i]), float(t2[i]), 12e-6, 30.0, float(b0[i]), float(b1[i]))
            bloch_mcconnell_ode(par, q, np.array([0.0, 0.0, 1 - par[0], par[0]]), "superlorentzian")

    row("hybrid_state_signal", nq, lambda k: qmt.hybrid_state_signal(m0s[:k], t1[:k], t2[:k], 12e-6, 30.0, b0[:k], b1[:k], **q),
        1, ode, q["flip_rad"].numel())

    # --- qMT pulse propagators: our elementwise Taylor exponential vs torch.linalg.matrix_exp --
    # The same generators (every pulse of the default train on the qMT voxels), side by side.
    tau, alpha = q["pulse_dur"].to(dtype)[:, None], q["flip_rad"].to(dtype)[:, None]
    w1 = b1[None, :nq] * alpha / tau
    rrf = w1**2 * qmt.saturation_rate(torch.ones((), dtype=dtype), tau, torch.tensor(12e-6, dtype=dtype), b0[None])
    m0s_ = m0s[None]
    gen = qmt._pulse_generator(w1, rrf, 1 / t1[None, :nq], 1 / t2[None, :nq], 2 * math.pi * b0[None], 30.0 * m0s_,
                               30.0 * (1 - m0s_), 1 - m0s_, m0s_) * tau
    gen = gen.reshape(4, 5, -1)  # [4, 5, pulses]
    full = torch.cat([gen.permute(2, 0, 1), torch.zeros(gen.shape[-1], 1, 5, dtype=dtype)], 1)  # [pulses, 5, 5]

    def ours_expm(k, chunk=8192):  # the chunk size hybrid_state_signal uses
        return torch.cat([qmt._expm_affine(gen[..., i:min(i + chunk, k)]) for i in range(0, k, chunk)], -1)

    npulse = gen.shape[-1]
    diff = (ours_expm(npulse).permute(2, 0, 1) - torch.linalg.matrix_exp(full)[:, :4]).abs().max().item()
    print(f"  qMT pulse exponentials: max |ours - matrix_exp| = {diff:.1e}", flush=True)
    row("qMT pulse expm (vs matrix_exp)", npulse, ours_expm, npulse // 4,
        lambda k: torch.linalg.matrix_exp(full[:k]), 1)

    # --- CRB: torch.func vs central finite differences of the same batched model -------------
    def fd_crb(model, theta, sigma, rel=1e-4):
        cols = []
        for j in range(theta.shape[-1]):
            h = torch.zeros_like(theta)
            h[:, j] = rel * theta[:, j]
            cols.append((model(theta + h) - model(theta - h)) / (2 * h[:, j:j + 1]))
        jac = torch.stack(cols, -1)
        f = (jac.mH @ jac).real / sigma**2
        return torch.linalg.inv(f).diagonal(dim1=-2, dim2=-1)

    th = torch.stack([a, 2.0 * a, t1], -1).double()
    tid = ti.double()
    ir = lambda t: relaxation.inversion_recovery(t[..., 0], t[..., 1], t[..., 2], tid)  # noqa: E731
    ncr = min(n, 10_000)
    row("crb (IR, 3 params)", ncr, lambda k: crb.crb(ir, th[:k], 0.01), ncr, lambda k: fd_crb(ir, th[:k], 0.01), 31)
    qs = {k: (v[::4] if torch.is_tensor(v) else v) for k, v in q.items()}  # 286-TR train
    thq = torch.stack([m0s.double() + 0.05, t1[:nq].double(), t2[:nq].double(), 30.0 + 0 * m0s.double()], -1)
    qm = lambda t: qmt.hybrid_state_signal(t[..., 0], t[..., 1], t[..., 2], 12e-6, t[..., 3], 0.0, 1.0, **qs)  # noqa: E731
    nc = min(nq, 64)
    row("crb vmap (qMT, 4 params, 286 TRs)", nc, lambda k: crb.crb(qm, thq[:k], 0.01), nc,
        lambda k: fd_crb(qm, thq[:k], 0.01), 286)
    row("crb jvp (qMT, 4 params, 286 TRs)", nc, lambda k: crb.crb(qm, thq[:k], 0.01, mode="jvp"), nc,
        lambda k: fd_crb(qm, thq[:k], 0.01), 286)

    print(f"\nthreads={args.threads} dtype={args.dtype} (CRB rows float64); rates in signals per CPU-second")
    hdr = f"{'model':<36}{'Nt':>6}{'batch':>7}{'ours/CPU-s':>13}{'ours/wall-s':>13}{'ref n':>7}{'ref/CPU-s':>12}{'ratio':>10}"
    print(hdr)
    print("-" * len(hdr))
    for name, length, n_o, r_o, w_o, n_r, r_r, ratio in rows:
        print(f"{name:<36}{length:>6}{n_o:>7}{r_o:>13,.0f}{w_o:>13,.0f}{n_r:>7}{r_r:>12,.2f}{ratio:>9,.3g}×")
    print("reference: IR/T2 NumPy per-voxel loop; MPRAGE brute force (30 periods); FISP 2000 isochromats;"
          " qMT solve_ivp (one cycle); qMT pulses torch.linalg.matrix_exp (5x5, batched);"
          " CRB central finite differences (7 evaluations / 2P+1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
