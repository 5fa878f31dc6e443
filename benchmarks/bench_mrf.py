"""MRF matching and dictionary benchmarks, measured side by side in one run (issue 14, SPEC §9).

- matching throughput of ``fitting.dictmatch.match`` (the complex inner products as two float32
  GEMMs + |·|² + running exact argmax over atom chunks) against a bare complex64 ``torch.matmul``
  of the same shapes ``[V, R] @ [R, A]`` (chunked the same way, result discarded): target ≥ 70 %
  of it; also against the two real GEMMs alone (what the argmax costs on top);
- dictionary generation time per atom (FISP EPG, 1000 frames, the app's state cap, chunked);
- mrfnet inference (``modalities.mrf.net`` architecture) against matching the same voxels
  (target ≥ 20× faster);
- refinement per voxel on the dictionary's interpolant (``refine_on_grid``) against the EPG
  (``refine_gauss_newton``), with the accuracy of each against the off-grid truth;
- mrfnet's CRB weights with the training fingerprints: the exact one-pass EPG Jacobian
  (``physics.epg.fisp_mrf_jacobian``, the default) against simulation + forward differences and
  against forward-mode AD through ``physics.crb`` (CPU seconds, interleaved); the on-the-fly
  training time grows by at most the difference (the training loop itself does not change);
- memory of matching a 1 mm whole brain (1.5 M voxels) against a 100 k-atom dictionary: the
  inputs plus one score block (``voxel_chunk × atom_chunk``), measured as the resident-set growth
  of a match on a voxel subset and extrapolated by the input size.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/bench_mrf.py [--voxels 20000] [--atoms 100000] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from bids_qmri.fitting import dictmatch
from bids_qmri.modalities.mrf import dictionary as mrfdict
from bids_qmri.physics import epg


def _best_of(fn, repeats=3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _side_by_side(fns: dict, repeats=3) -> dict:
    """Best-of-``repeats`` time of each function, the repeats interleaved (a, b, c, a, b, c, …) so
    that a change of the machine's load during the run hits every contender alike."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--voxels", type=int, default=20000)
    p.add_argument("--atoms", type=int, default=100000)
    p.add_argument("--rank", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each timing (best kept)")
    p.add_argument("--dict-atoms", type=int, default=2048, help="atoms simulated to time the dictionary")
    p.add_argument("--refine-voxels", type=int, default=20000, help="voxels refined on the dictionary interpolant")
    p.add_argument("--refine-epg-voxels", type=int, default=512, help="voxels refined on the EPG")
    p.add_argument("--crb-samples", type=int, default=2048, help="mrfnet training samples for the CRB timing (0: skip)")
    p.add_argument("--crb-ad-samples", type=int, default=256, help="of which timed through AD as well (0: skip)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    v, a, r = args.voxels, args.atoms, args.rank
    signals = torch.randn(v, r, dtype=torch.complex64, generator=g)
    atoms = torch.randn(a, r, dtype=torch.complex64, generator=g)
    unit, norms = dictmatch.normalise_atoms(atoms)
    atoms_h = unit.mH.contiguous()
    vc, ac = 1024, 256

    def bare():
        for lo in range(0, v, vc):
            s = signals[lo:lo + vc]
            for alo in range(0, a, ac):
                torch.matmul(s, atoms_h[:, alo:alo + ac])

    atoms_re, atoms_im = dictmatch._real_atoms(atoms_h)

    def bare_real():
        for lo in range(0, v, vc):
            s_r = torch.cat([signals[lo:lo + vc].real, signals[lo:lo + vc].imag], 1)
            for alo in range(0, a, ac):
                torch.matmul(s_r, atoms_re[:, alo:alo + ac])
                torch.matmul(s_r, atoms_im[:, alo:alo + ac])

    def full():
        dictmatch.match(signals, atoms, voxel_chunk=vc, atom_chunk=ac, atom_norms=(unit, norms))

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    full()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = _side_by_side({"match": full, "bare": bare, "real": bare_real}, args.repeats)
    t_match, t_bare, t_real = t["match"], t["bare"], t["real"]
    print(f"matching {v} voxels x {a} complex atoms (rank {r}, {args.threads} thread(s)):")
    print(f"  bare torch.matmul (same shapes, chunked)  {t_bare:8.3f} s  {v * a / t_bare / 1e9:6.2f} G pairs/s")
    print(f"  dictmatch.match (GEMM + exact argmax)     {t_match:8.3f} s  {v * a / t_match / 1e9:6.2f} G pairs/s")
    print(f"  the two real GEMMs match uses, alone      {t_real:8.3f} s  {v * a / t_real / 1e9:6.2f} G pairs/s")
    print(f"  ratio match / bare complex matmul throughput: {t_bare / t_match:.2f} (target >= 0.70)")
    print(f"  ratio match / its own real GEMMs alone:       {t_real / t_match:.2f}")
    # real atoms (FISP fingerprints on a real SVD basis, what the app matches), stored complex64
    atoms_r = torch.complex(torch.randn(a, r, generator=g), torch.zeros(a, r))
    unit_r, norms_r = dictmatch.normalise_atoms(atoms_r)
    atoms_rh = unit_r.mH.contiguous()

    def bare_r():
        for lo in range(0, v, vc):
            s = signals[lo:lo + vc]
            for alo in range(0, a, ac):
                torch.matmul(s, atoms_rh[:, alo:alo + ac])

    def full_r():
        dictmatch.match(signals, atoms_r, voxel_chunk=vc, atom_chunk=ac, atom_norms=(unit_r, norms_r))

    t = _side_by_side({"match": full_r, "bare": bare_r}, args.repeats)
    t_match_r, t_bare_r = t["match"], t["bare"]
    print(f"matching {v} voxels x {a} real atoms (FISP on a real basis; stored complex64):")
    print(f"  bare torch.matmul (same shapes, chunked)  {t_bare_r:8.3f} s  {v * a / t_bare_r / 1e9:6.2f} G pairs/s")
    print(f"  dictmatch.match (one real GEMM + argmax)  {t_match_r:8.3f} s  {v * a / t_match_r / 1e9:6.2f} G pairs/s")
    print(f"  ratio match / bare complex matmul throughput: {t_bare_r / t_match_r:.2f} (target >= 0.70)")
    whole = 1_500_000
    print(f"  extrapolated 1 mm whole brain ({whole} voxels) x {a} atoms: {t_match_r * whole / v:.0f} s")
    block = 2 * vc * ac * 4
    inputs = whole * r * 8 + a * r * 8 * 2
    print(f"  memory, whole brain (extrapolated from the sizes, not measured at 1.5 M): inputs {inputs / 2**20:.0f} MiB "
          f"+ score block {block / 2**20:.0f} MiB (resident growth of this run's {v}-voxel match "
          f"{max(rss1 - rss0, 0) / 1024:.0f} MiB)")

    # mrfnet inference (the architecture of modalities.mrf.net; weights do not change the cost)
    from bids_qmri.modalities.mrf.net import LOG_RANGES, features
    from bids_qmri.nets.mlp import ScaledMLP

    net = ScaledMLP(2 * r, 128, ("logT1", "logT2", "logNorm"), {**LOG_RANGES, "logNorm": (-5.0, 5.0)}, depth=3).eval()
    b1 = torch.ones(v)

    def infer():
        with torch.no_grad():
            net(features(signals, b1))

    t_net = _best_of(infer)
    print(f"mrfnet inference, {v} voxels: {t_net:.4f} s; matching against {a} atoms / mrfnet = {t_match / t_net:.0f}x "
          f"(target >= 20x)")

    sched = epg.default_fisp_schedule(1000)
    x = torch.stack([torch.full((args.dict_atoms,), 0.0).uniform_(-2.3, 1.6, generator=g),
                     torch.full((args.dict_atoms,), 0.0).uniform_(-4.6, -0.7, generator=g)], -1)
    sim = mrfdict.simulator(sched, 1.0)
    t0 = time.perf_counter()
    dictmatch.simulate_dictionary(sim, x, chunk=mrfdict.CHUNK, progress=False)
    dt = time.perf_counter() - t0
    print(f"dictionary: {1e3 * dt / args.dict_atoms:.3f} ms per atom (1000 frames, EPG states {mrfdict.N_STATES}, "
          f"chunk {mrfdict.CHUNK}); peak work memory ~"
          f"{dictmatch.chunk_peak_bytes(mrfdict.CHUNK, 1000, r, a) / 2**20:.0f} MiB for {a} atoms")

    # refinement inside the winning cell: on the dictionary's interpolant vs on the EPG (per voxel)
    import math

    grid = mrfdict.DictionaryGrid(t1_steps=40, t2_steps=40, b1_step=0.1)
    b1_idx = [3, 4, 5, 6]  # B1 0.9 … 1.2
    basis = torch.linalg.qr(torch.randn(1000, r, dtype=torch.float64, generator=g))[0].to(torch.complex64)
    nodes = torch.from_numpy(grid.nodes())
    t0 = time.perf_counter()
    parts = [dictmatch.simulate_dictionary(mrfdict.simulator(sched, float(grid.b1_values[k])), nodes, basis=basis,
                                           chunk=mrfdict.CHUNK, progress=False) for k in b1_idx]
    t_dict = time.perf_counter() - t0
    atoms_d = torch.cat(parts)
    slices = [slice(i * len(nodes), (i + 1) * len(nodes)) for i in range(len(b1_idx))]
    index = mrfdict.node_index(grid, b1_idx, slices)
    nv = args.refine_voxels
    lt1 = torch.empty(nv, dtype=torch.float64).uniform_(math.log(0.6), math.log(2.0), generator=g)
    lt2 = torch.empty(nv, dtype=torch.float64).uniform_(math.log(0.04), math.log(0.15), generator=g)
    b1v = torch.empty(nv, dtype=torch.float64).uniform_(1.0, 1.1, generator=g)
    sig = mrfdict.simulator(sched, b1v.float())(torch.stack([lt1, lt2], 1)) @ basis
    step1, step2 = grid.cell
    pos = torch.stack([(lt1 - grid.log_t1[0]) / step1, (lt2 - grid.log_t2[0]) / step2,
                       (b1v - grid.b1_range[0]) / grid.b1_step], 1)
    start = torch.cat([pos[:, :2].round(), pos[:, 2:]], 1)
    t0 = time.perf_counter()
    res, ok = dictmatch.refine_on_grid(sig, atoms_d, index, start, (True, True, False), iterations=4)
    t_int = time.perf_counter() - t0
    grid_err = (start[:, :2] - pos[:, :2]).abs().mul(torch.tensor([step1, step2])).median(0).values
    int_err = (res.x[ok] - pos[ok, :2]).abs().mul(torch.tensor([step1, step2])).median(0).values
    ne = min(nv, args.refine_epg_voxels)
    x0 = torch.stack([grid.log_t1[0] + start[:ne, 0] * step1, grid.log_t2[0] + start[:ne, 1] * step2], 1)
    cell = torch.tensor(grid.cell, dtype=torch.float64)

    def simulate(xx, b):
        return mrfdict.simulator(sched, b[:, 0])(xx) @ basis

    t0 = time.perf_counter()
    dictmatch.refine_gauss_newton(simulate, sig[:ne], x0, x0 - cell, x0 + cell, fixed=b1v[:ne, None].float(),
                                  iterations=2, update_jacobian=False)
    t_epg = time.perf_counter() - t0
    print("refinement (noise-free, 1000 frames, grid 40 x 40, B1 step 0.1, own B1 off the grid):")
    print(f"  on the dictionary interpolant: {1e6 * t_int / nv:.1f} us/voxel ({nv} voxels, {int(ok.sum())} with a "
          f"stencil); 1 mm brain {t_int * whole / nv:.0f} s; median |log error| T1 {int_err[0]:.2e}, "
          f"T2 {int_err[1]:.2e} (grid node: {grid_err[0]:.2e}, {grid_err[1]:.2e})")
    print(f"  on the EPG (chord, 2 iterations): {1e3 * t_epg / ne:.2f} ms/voxel ({ne} voxels); 1 mm brain "
          f"{t_epg * whole / ne / 3600:.1f} h; interpolant faster by {t_epg / ne / (t_int / nv):.0f}x "
          f"(dictionary of 4 B1 slices built in {t_dict:.0f} s)")


    if args.crb_samples:
        _bench_crb(sched, args.crb_samples, args.crb_ad_samples, args.repeats, r, g)


def _bench_crb(sched, n, n_ad, repeats, rank, g) -> None:
    from bids_qmri.modalities.mrf import net as mrfnet

    x = mrfnet._sample(n, g)
    frames = len(sched["tr"])
    basis = torch.linalg.qr(torch.randn(frames, rank, dtype=torch.float64, generator=g))[0].to(torch.complex64)
    cpu = {"exact": [], "differences": [], "ad": []}
    for _ in range(repeats):
        t0 = time.process_time()
        mrfnet._unit_sigma_crb(sched, basis, x, jacobian="exact", return_clean=True)
        cpu["exact"].append(time.process_time() - t0)
        t0 = time.process_time()
        clean = mrfnet._simulate(sched, basis, x)
        mrfnet._unit_sigma_crb(sched, basis, x, clean, jacobian="differences")
        cpu["differences"].append(time.process_time() - t0)
        if n_ad:
            t0 = time.process_time()
            mrfnet._unit_sigma_crb(sched, basis, x[:n_ad], clean[:n_ad], jacobian="ad")
            cpu["ad"].append((time.process_time() - t0) * n / n_ad)
    best = {k: min(v) for k, v in cpu.items() if v}
    print(f"mrfnet CRB weights + fingerprints, {n} samples x {len(sched['tr'])} frames (CPU s, best of {repeats}):")
    print(f"  exact one-pass EPG Jacobian (default) {best['exact']:.2f} s; simulation + forward differences "
          f"{best['differences']:.2f} s; ratio {best['exact'] / best['differences']:.2f} (training grows by less)")
    if "ad" in best:
        print(f"  forward-mode AD through physics.crb (extrapolated from {n_ad}) {best['ad']:.2f} s; "
              f"{best['ad'] / best['exact']:.1f}x the exact one-pass")


if __name__ == "__main__":
    main()
