#!/usr/bin/env python
"""Cost of the synthetic MRF and qMT per voxel, side by side on the same phantom voxels, in one run.

MRF goes through a dictionary: interpolated SVD coefficients versus the direct EPG simulation.
qMT is simulated exactly per voxel (its ΔB0 dependence is too sharp to interpolate): our
hybrid-state model versus a scipy ``solve_ivp`` integration of one cycle (the tests' reference)
on a few of the same voxels.

    python benchmarks/bench_synth.py [--voxels N] [--resolution MM]

Prints the CPU time per voxel, the ratios, the extrapolation to the whole head at the given
resolution, and the relative coefficient error of the MRF interpolation.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bids_qmri.physics import epg, qmt, svd
from bids_qmri.synth import dataset as ds
from bids_qmri.synth import phantom as ph

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--voxels", type=int, default=400, help="phantom voxels simulated both ways")
    p.add_argument("--resolution", type=float, default=2.0, help="phantom resolution (mm)")
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
    from test_physics_qmt import bloch_mcconnell_ode

    # One full chunk of voxels, as sim_qmt calls it (smaller batches pay more per-TR overhead).
    qidx = np.random.default_rng(3).choice(head, size=min(ds.QMT_CHUNK, head.size), replace=False)
    qp = {k: torch.from_numpy(phantom.params[k].ravel()[qidx].astype(np.float64)) for k in ("m0s", "T1", "T2", "T2s", "Rx")}
    qp["B0"] = torch.from_numpy(fields.b0_hz.ravel()[qidx].astype(np.float64))
    qp["B1"] = torch.from_numpy(fields.b1.ravel()[qidx].astype(np.float64))
    ds.qmt_basis()  # once per process (cached), not per voxel
    qmt._superlorentzian_table()  # likewise (lineshape table)
    t0 = time.process_time()
    ds._qmt_signal(qp, qmt.default_qmt_schedule())
    t_qmt = (time.process_time() - t0) / len(qidx)
    n_ode = 2
    t0 = time.process_time()
    for i in range(n_ode):
        par = tuple(float(qp[k][i]) for k in ("m0s", "T1", "T2", "T2s", "Rx", "B0", "B1"))
        bloch_mcconnell_ode(par, qmt.default_qmt_schedule(), np.array([0.0, 0.0, 1 - par[0], par[0]]),
                            "superlorentzian")
    t_ode = (time.process_time() - t0) / n_ode
    n_qmt = int(n_head / ds.RES_FACTOR["qmt"] ** 3)
    print(f"qMT per voxel: exact hybrid-state model {t_qmt * 1e3:.2f} ms, solve_ivp (one cycle, "
          f"{n_ode} voxels) {t_ode:.1f} s -> ratio {t_ode / t_qmt:.0f}x")
    print(f"qMT whole head at {args.resolution * ds.RES_FACTOR['qmt']:g} mm (~{n_qmt} voxels): "
          f"{n_qmt * t_qmt:.0f} s CPU per session")
    noise = 0.074 / 25 / math.sqrt(2)
    print(f"(for scale: SNR 25 noise is {noise / 0.074:.2e} of the reference signal per channel)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
