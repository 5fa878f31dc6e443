"""qMT (seed 003) timings, measured in one run on the synthetic dataset's schedule and basis.

- training-set simulation per sample: exact fingerprints only, and fingerprints + the CRB over
  all 8 parameters, side by side: the Jacobian by ``torch.func.jvp`` through the batched physics
  (one tangent per parameter, ``physics.crb.jacobian(mode="jvp")``: the path before
  ``physics.qmt.hybrid_state_jacobian``) and by that hand-written forward mode
  (``simulate.simulate_set``), with the largest relative difference of their CRBs;
- qmtnet inference: a measured chunk of voxels, extrapolated to a 1 mm whole brain
  (``--brain-voxels``, default 1.5 M; the extrapolation is linear in the voxel count, which the
  per-voxel MLP is) against seed 003's 29 s on one CPU (target ≤ 30 s);
- qmtnls per voxel (``--nls-voxels`` voxels, B1 fixed, grid + network starts) against seed 003's
  ~30 s per voxel.

Each timing is printed as wall time and as this process's CPU time (``time.process_time``): on a
shared, loaded machine the CPU time is the meaningful one for one thread.

Usage: ``OMP_NUM_THREADS=2 python benchmarks/bench_qmt.py [--threads 2] [--sim 256] [--sim-ad 16] [--nls-voxels 4]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from bids_qmri.modalities.qmt import nls, simulate
from bids_qmri.modalities.qmt.estimate import INFERENCE_CHUNK
from bids_qmri.modalities.qmt.net import ResidualMLP, features
from bids_qmri.physics.crb import jacobian
from bids_qmri.synth.dataset import qmt_basis

SEED_INFERENCE_S = 29.0
SEED_NLLS_S = 30.0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sim", type=int, default=256, help="samples for the simulation timings")
    p.add_argument("--sim-ad", type=int, default=16, help="samples for the torch.func.jvp CRB timing (slow)")
    p.add_argument("--chunk", type=int, default=200_000, help="voxels in the measured inference chunk")
    p.add_argument("--brain-voxels", type=int, default=1_500_000)
    p.add_argument("--nls-voxels", type=int, default=4)
    p.add_argument("--only", nargs="+", choices=["simulation", "inference", "nls"],
                   default=["simulation", "inference", "nls"], help="which timings to run")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    basis, sched = qmt_basis()
    gen = torch.Generator().manual_seed(0)
    theta = simulate.sample_parameters(a.sim, sched["tr"], gen)

    if "simulation" in a.only:
        simulation(a, sched, basis, theta)
    if "inference" in a.only:
        inference(a, basis)
    if "nls" in a.only:
        nls_timing(a, sched, basis, gen)


def simulation(a, sched, basis, theta) -> None:
    t, c = time.perf_counter(), time.process_time()
    simulate.fingerprints(theta, sched, basis)
    fwd, fwd_cpu = (time.perf_counter() - t) / a.sim, (time.process_time() - c) / a.sim
    # before: torch.func.jvp through the physics, one tangent per parameter (float32, as simulate did)
    fn = simulate._signal_fn(sched, basis, torch.float32)
    sub = theta[:a.sim_ad]
    t, c = time.perf_counter(), time.process_time()
    j_ad = jacobian(fn, sub.float(), mode="jvp").to(torch.complex128)
    with torch.no_grad():
        c_ad = fn(sub.float()).to(torch.complex128)
    crb_ad_s = simulate.crb_from_jacobian(c_ad, j_ad)
    ad, ad_cpu = (time.perf_counter() - t) / a.sim_ad, (time.process_time() - c) / a.sim_ad
    # after: the hand-written forward mode (physics.qmt.hybrid_state_jacobian) inside simulate_set
    t, c = time.perf_counter(), time.process_time()
    data = simulate.simulate_set(a.sim, sched, basis, seed=0, log=None)
    crb, crb_cpu = (time.perf_counter() - t) / a.sim, (time.process_time() - c) / a.sim
    cj, jj = simulate.coefficient_jacobian(sub, sched, basis)
    diff = float((simulate.crb_from_jacobian(cj, jj) / crb_ad_s - 1).abs().max())
    print(f"simulation per sample (wall / CPU ms): fingerprint {1e3 * fwd:.1f} / {1e3 * fwd_cpu:.1f}; fingerprint + "
          f"CRB (8 parameters) with torch.func.jvp {1e3 * ad:.1f} / {1e3 * ad_cpu:.1f} ({a.sim_ad} samples), with "
          f"hybrid_state_jacobian {1e3 * crb:.1f} / {1e3 * crb_cpu:.1f} ({a.sim} samples): {ad_cpu / crb_cpu:.1f}x "
          f"less CPU, {crb_cpu / fwd_cpu:.1f}x the fingerprint's; CRBs agree within {diff:.1e} (largest relative "
          f"difference, float32); 100 k samples + CRB: {1e5 * crb_cpu / 60:.0f} CPU-min "
          f"({1e5 * crb_cpu / 60 / a.threads:.0f} min on {a.threads} cores, one process per core)")
    del data


def inference(a, basis) -> None:
    net = ResidualMLP(2 * basis.shape[1] - 1).eval()
    y = torch.randn(a.chunk, basis.shape[1], dtype=torch.complex64)
    with torch.no_grad():
        net(features(y[:1000]))
        t, c = time.perf_counter(), time.process_time()
        for lo in range(0, a.chunk, INFERENCE_CHUNK):  # the workflow's batch size
            net(features(y[lo:lo + INFERENCE_CHUNK]))
        inf, inf_cpu = time.perf_counter() - t, time.process_time() - c
    whole = inf * a.brain_voxels / a.chunk
    print(f"qmtnet inference: {a.chunk} voxels in {inf:.2f} s wall, {inf_cpu:.2f} s CPU -> {a.brain_voxels} voxels "
          f"(extrapolated, linear) {inf_cpu * a.brain_voxels / a.chunk:.1f} CPU-s, "
          f"{whole:.1f} s wall on {a.threads} thread(s); seed 003: {SEED_INFERENCE_S:g} s on one CPU "
          f"(ratio {inf_cpu * a.brain_voxels / a.chunk / SEED_INFERENCE_S:.2f}, CPU)")


def nls_timing(a, sched, basis, gen) -> None:
    truth = simulate.sample_parameters(a.nls_voxels, sched["tr"], gen)
    m0 = 0.5 * torch.ones(a.nls_voxels, dtype=torch.complex128)
    yv = simulate.fingerprints(truth, sched, basis) * m0[:, None]
    yv = yv + 0.01 * torch.complex(torch.randn(yv.shape, generator=gen, dtype=torch.float64),
                                   torch.randn(yv.shape, generator=gen, dtype=torch.float64))
    c = time.process_time()
    out = nls.fit_nls(yv, sched, basis, b1=truth[:, 6], x_net=truth[:, :3] * 1.1)
    per = out["seconds"] / a.nls_voxels
    per_cpu = (time.process_time() - c) / a.nls_voxels
    print(f"qmtnls: {per:.1f} s wall, {per_cpu:.1f} s CPU per voxel ({a.nls_voxels} voxels, batched, B1 fixed, 2 grid "
          f"starts + the network's, up to 60 LM iterations, {int(out['converged'].sum())} converged); "
          f"seed 003: ~{SEED_NLLS_S:g} s per voxel (ratio {per_cpu / SEED_NLLS_S:.2f}, CPU)")


if __name__ == "__main__":
    main()
