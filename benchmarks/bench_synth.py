#!/usr/bin/env python
"""Why the synthetic MRF goes through a dictionary: interpolated SVD coefficients versus the
direct EPG simulation per voxel, side by side on the same phantom voxels, in one run.

    python benchmarks/bench_synth.py [--voxels N] [--resolution MM]

Prints the CPU time per voxel of both, their ratio (extrapolated to the whole head at the given
resolution), and the relative coefficient error of the interpolation.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from bids_qmri.physics import epg, svd
from bids_qmri.synth import dataset as ds
from bids_qmri.synth import phantom as ph


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
    noise = 0.074 / 25 / math.sqrt(2)
    print(f"(for scale: SNR 25 noise is {noise / 0.074:.2e} of the reference signal per channel)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
