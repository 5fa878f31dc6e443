#!/usr/bin/env python
"""Cost of the synthetic MRF and qMT per voxel, side by side on the same phantom voxels, in one run.

MRF goes through a dictionary: interpolated SVD coefficients versus the direct EPG simulation of
the same voxels (both ours, both float64): an algorithmic comparison, with the interpolation's
coefficient error printed beside the speed-up it buys.
qMT is simulated exactly per voxel (its ΔB0 dependence is too sharp to interpolate): our batched
hybrid-state model (float32 chunks, as ``sim_qmt`` runs it) versus the same algorithm compiled
voxel by voxel in float32 (numba, ``voxel_loops.py``; saturation integrals by the same function),
on a subset of the same voxels. That is the fair reference for "batched vs a voxel loop": an
earlier version compared with a scipy ``solve_ivp`` integration, a different and interpreted
algorithm (the tests' accuracy reference), whose ratio measured the ODE solver, not our batching.
The qMT reference needs the ``bench`` extra (numba); without it that row is skipped.
Measured (one thread): MRF interpolation 4.1 µs vs direct EPG 3.79 ms per voxel (932x, median
coefficient error 1.7e-3); qMT batched 0.98 ms vs compiled loop 1.10 ms per voxel (1.12x).

    OMP_NUM_THREADS=1 python benchmarks/bench_synth.py [--voxels N] [--resolution MM]

Prints the CPU time per voxel, the ratios, the extrapolation to the whole head at the given
resolution, and the relative coefficient error of the MRF interpolation.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from bids_qmri.physics import epg, qmt, svd
from bids_qmri.synth import dataset as ds
from bids_qmri.synth import phantom as ph



def _qmt_voxel_loop(qp: dict, schedule: dict, n: int):
    """CPU seconds per voxel and echoes of the compiled float32 voxel loop on the first ``n``
    voxels of ``qp``, or None without numba. The saturation integrals per distinct pulse
    duration come from ``qmt.saturation_rate`` (what the batched model calls), timed with it."""
    try:
        import voxel_loops  # benchmarks/ is on sys.path when this script runs
    except SystemExit:
        return None
    dt = np.float32
    kern = voxel_loops.kernels(dt)["qmt"]
    v = {k: np.ascontiguousarray(qp[k][:n].numpy().astype(dt)) for k in qp}
    tau, flip = schedule["pulse_dur"].numpy().astype(dt), schedule["flip_rad"].numpy().astype(dt)
    sign = ((-1.0) ** np.arange(len(tau))).astype(dt)

    def run(m):
        all_tau = np.concatenate([tau, [schedule["inversion_dur"]]]).astype(dt)
        uniq, inverse = np.unique(all_tau, return_inverse=True)
        h = qmt.saturation_rate(torch.ones((), dtype=torch.float32), torch.from_numpy(uniq)[:, None],
                                torch.from_numpy(v["T2s"][:m]), torch.from_numpy(v["B0"][:m])).numpy()
        h = np.ascontiguousarray(h[inverse].T)
        out = np.empty((m, len(tau), 2), dt)
        kern(v["m0s"][:m], v["T1"][:m], v["T2"][:m], v["Rx"][:m], v["B0"][:m], v["B1"][:m], flip, tau, sign,
             dt(schedule["tr"]), dt(schedule["inversion_dur"]), h, out)
        return out[..., 0] + 1j * out[..., 1]

    run(1)  # compile
    t0 = time.process_time()
    sig = run(len(v["T1"]))
    return (time.process_time() - t0) / len(v["T1"]), sig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--voxels", type=int, default=400, help="phantom voxels simulated both ways")
    p.add_argument("--resolution", type=float, default=2.0, help="phantom resolution (mm)")
    p.add_argument("--loop-voxels", type=int, default=500, help="qMT voxels for the compiled voxel loop")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    phantom = ph.make_phantom(np.random.default_rng(0), 4.0)
    fields = ph.make_session_fields(np.random.default_rng(1), phantom)
    head = np.flatnonzero(phantom.params["PD"].ravel() > 1e-3)
    idx = np.random.default_rng(2).choice(head, size=min(args.voxels, head.size), replace=False)
    t1 = phantom.params["T1"].ravel()[idx].astype(np.float64)
    t2 = phantom.params["T2"].ravel()[idx].astype(np.float64)
    b1 = fields.b1.ravel()[idx].astype(np.float64)

    t0 = time.process_time()
    axes, table, basis, schedule = ds.mrf_dictionary()
    t_dict = time.process_time() - t0
    t0 = time.process_time()
    interp = ds.interpolate_coefficients(axes, table, [np.log(t1), np.log(t2), b1])
    t_interp = (time.process_time() - t0) / len(idx)
    t0 = time.process_time()
    exact = epg.fisp_mrf(torch.from_numpy(t1), torch.from_numpy(t2), torch.from_numpy(b1), **schedule)
    t_exact = (time.process_time() - t0) / len(idx)
    exact_c = svd.compress(exact.to(torch.complex128), basis, real_first=False)
    err = ((interp - exact_c).norm(dim=-1) / exact_c.norm(dim=-1)).numpy()

    grid = ph.reference_grid(args.resolution)
    n_head = int(np.prod(grid.shape) * head.size / phantom.params["PD"].size)
    print(f"MRF dictionary build (once per process): {t_dict:.1f} s CPU")
    print(f"per voxel: interpolation {t_interp * 1e6:.1f} us, direct EPG {t_exact * 1e3:.2f} ms "
          f"-> ratio direct/interpolated {t_exact / t_interp:.0f}x")
    print(f"whole head at {args.resolution:g} mm (~{n_head} voxels): interpolated "
          f"{t_dict + n_head * t_interp:.1f} s vs direct {n_head * t_exact / 60:.1f} min CPU")
    print(f"relative coefficient error of the interpolation: median {np.median(err):.2e}, "
          f"99th percentile {np.percentile(err, 99):.2e}, max {err.max():.2e}")

    # qMT: exact simulation on the same voxels (their own m0s, T2s, Rx, B0), as sim_qmt runs it.
    # One full chunk of voxels, as sim_qmt calls it (smaller batches pay more per-TR overhead).
    qidx = np.random.default_rng(3).choice(head, size=min(ds.QMT_CHUNK, head.size), replace=False)
    qp = {k: torch.from_numpy(phantom.params[k].ravel()[qidx].astype(np.float64)) for k in ("m0s", "T1", "T2", "T2s", "Rx")}
    qp["B0"] = torch.from_numpy(fields.b0_hz.ravel()[qidx].astype(np.float64))
    qp["B1"] = torch.from_numpy(fields.b1.ravel()[qidx].astype(np.float64))
    ds.qmt_basis()  # once per process (cached), not per voxel
    qmt._superlorentzian_table()  # likewise (lineshape table)
    schedule = qmt.default_qmt_schedule()
    t0 = time.process_time()
    ours_q = ds._qmt_signal(qp, schedule)
    t_qmt = (time.process_time() - t0) / len(qidx)
    loop = _qmt_voxel_loop(qp, schedule, args.loop_voxels)
    if loop is None:
        print(f"qMT per voxel: exact hybrid-state model {t_qmt * 1e3:.2f} ms (numba not installed: no loop reference)")
    else:
        t_loop, loop_sig = loop
        diff = (ours_q[: len(loop_sig)].numpy() - loop_sig).__abs__().max()
        print(f"qMT per voxel (float32): batched hybrid-state model {t_qmt * 1e3:.3f} ms ({len(qidx)} voxels), "
              f"numba voxel loop {t_loop * 1e3:.3f} ms ({len(loop_sig)} voxels) -> loop/batched "
              f"{t_loop / t_qmt:.2f}x; max |difference| {diff:.1e}")
    n_qmt = int(n_head / ds.RES_FACTOR["qmt"] ** 3)
    print(f"qMT whole head at {args.resolution * ds.RES_FACTOR['qmt']:g} mm (~{n_qmt} voxels): "
          f"{n_qmt * t_qmt:.0f} s CPU per session")
    noise = 0.074 / 25 / math.sqrt(2)
    print(f"(for scale: SNR 25 noise is {noise / 0.074:.2e} of the reference signal per channel)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
