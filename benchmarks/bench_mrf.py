"""MRF matching and dictionary benchmarks, measured side by side in one run (issue 14, SPEC §9).

- matching throughput of ``fitting.dictmatch.match`` with the fused numba kernel
  (``fitting.match_kernel``) and with the torch GEMM path (float32 GEMMs + |·|² + running exact
  argmax over atom chunks) against a bare complex64 ``torch.matmul`` of the same shapes
  ``[V, R] @ [R, A]`` (chunked, result discarded): target ≥ 70 % of it; three kinds of atoms: real
  (FISP on a real basis), projected complex (real atoms times a random complex R × R rotation: a real
  dictionary on a complex rotation of its basis, searched as real atoms after a change of basis,
  ``dictmatch.prepare_atoms``; also timed on the direct complex path) and random complex (stacked
  rank 2R: the complex kernel); one thread and ``--threads``, every configuration repeated
  ``--repeats`` times interleaved with the others (thread counts included), medians reported; the
  kernel's JIT compile time (empty numba cache) and cache load time, each in a fresh interpreter;
- dictionary generation time per atom (FISP EPG, 1000 frames, the app's state cap, chunked);
- mrfnet inference (``modalities.mrf.net`` architecture) against matching the same voxels
  (target ≥ 20× faster);
- refinement per voxel on the dictionary's interpolant (``refine_on_grid``) against the EPG
  (``refine_gauss_newton``), with the accuracy of each against the off-grid truth;
- mrfnet's CRB weights with the training fingerprints: the exact one-pass EPG Jacobian
  (``physics.epg.fisp_mrf_jacobian``, the default) against simulation + forward differences and
  against forward-mode AD through ``physics.crb`` (CPU seconds, interleaved); the on-the-fly
  training time grows by at most the difference (the training loop itself does not change);
- memory of matching a 1 mm whole brain (1.5 M voxels) against a 100 k-atom dictionary, measured
  in a fresh interpreter (peak resident set): 1.5 M voxels against a few thousand atoms (the
  voxel-side memory) and a few thousand voxels against 100 k atoms (the atom side), added.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/bench_mrf.py [--voxels 4096] [--atoms 100000] [--threads 2]``
(``--threads N``: matching timed at 1 and N threads; ``--memory-voxels 0`` skips the memory run).
"""

from __future__ import annotations

import argparse
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


def _side_by_side(configs: dict, repeats=5) -> dict:
    """All ``repeats`` wall times of each ``(threads, name) -> fn``, the repeats interleaved (a, b,
    c, a, b, c, …, thread counts included) so that a change of the machine's load during the run
    hits every contender alike."""
    times = {k: [] for k in configs}
    for _ in range(repeats):
        for (n, name), fn in configs.items():
            torch.set_num_threads(n)
            t0 = time.perf_counter()
            fn()
            times[(n, name)].append(time.perf_counter() - t0)
    torch.set_num_threads(1)
    return times


def _median(values) -> float:
    return float(torch.tensor(values, dtype=torch.float64).median())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--voxels", type=int, default=4096)
    p.add_argument("--atoms", type=int, default=100000)
    p.add_argument("--rank", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats of each timing (median reported)")
    p.add_argument("--memory-voxels", type=int, default=1_500_000, help="voxels of the memory run (0: skip)")
    p.add_argument("--dict-atoms", type=int, default=2048, help="atoms simulated to time the dictionary")
    p.add_argument("--refine-voxels", type=int, default=20000, help="voxels refined on the dictionary interpolant")
    p.add_argument("--refine-epg-voxels", type=int, default=512, help="voxels refined on the EPG")
    p.add_argument("--crb-samples", type=int, default=2048, help="mrfnet training samples for the CRB timing (0: skip)")
    p.add_argument("--crb-ad-samples", type=int, default=256, help="of which timed through AD as well (0: skip)")
    args = p.parse_args()
    import os

    wall0, cpu0 = time.perf_counter(), time.process_time()
    print(f"load average at the start {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)", flush=True)
    g = torch.Generator().manual_seed(0)
    v, a, r = args.voxels, args.atoms, args.rank
    threads = sorted({1, args.threads}) if args.threads > 1 else [1]
    signals = torch.randn(v, r, dtype=torch.complex64, generator=g)
    print(f"fused kernel compilation (fitting.match_kernel, float32, rank {r}, real atoms): "
          f"{_compile_times(r)}")
    atoms_c = torch.randn(a, r, dtype=torch.complex64, generator=g)
    # real atoms (FISP fingerprints on a real SVD basis, what the app matches), stored complex64
    atoms_r = torch.complex(torch.randn(a, r, generator=g), torch.zeros(a, r))
    # projected complex atoms: the real atoms times a random complex unitary R x R matrix (a real
    # dictionary on a complex rotation of its basis: complex atoms of real rank R)
    rotation = torch.linalg.qr(torch.randn(r, r, dtype=torch.complex128, generator=g))[0]
    atoms_p = (atoms_r.to(torch.complex128) @ rotation).to(torch.complex64)
    cases = {"real": atoms_r, "projected complex": atoms_p, "random complex": atoms_c}
    t_match = _bench_match(signals, cases, threads, args.repeats)
    whole = 1_500_000
    print(f"  extrapolated 1 mm whole brain ({whole} voxels) x {a} atoms, fused kernel, 1 thread (median): "
          f"real atoms {t_match * whole / v:.0f} s")
    if args.memory_voxels:
        print(f"memory: {_memory(args.memory_voxels, a, r)}", flush=True)

    # mrfnet inference (the architecture of modalities.mrf.net; weights do not change the cost)
    from bids_qmri.modalities.mrf.net import LOG_RANGES, features
    from bids_qmri.nets.mlp import ScaledMLP

    net = ScaledMLP(2 * r, 128, ("logT1", "logT2", "logNorm"), {**LOG_RANGES, "logNorm": (-5.0, 5.0)}, depth=3).eval()
    b1 = torch.ones(v)

    def infer():
        with torch.no_grad():
            net(features(signals, b1))

    t_net = _median([_best_of(infer, 1) for _ in range(5)])
    print(f"mrfnet inference, {v} voxels: {t_net:.4f} s (median of 5); matching against {a} real atoms (fused "
          f"kernel, median) / mrfnet = {t_match / t_net:.0f}x (target >= 20x)")

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
    print(f"whole run: wall {time.perf_counter() - wall0:.0f} s, CPU {time.process_time() - cpu0:.0f} s (this "
          f"process); load average at the end {os.getloadavg()[0]:.1f}")


def _bench_match(signals, cases: dict, threads, repeats) -> float:
    """Side by side, per kind of atoms and thread count: a bare complex ``torch.matmul`` of the same
    shapes (chunked, result discarded), ``dictmatch.match`` with the fused kernel and with the torch
    GEMM path (and, for projected complex atoms, the kernel on the direct complex path). All
    configurations interleaved, ``repeats`` times; medians. Returns the kernel's median time on
    real atoms at one thread."""
    v, r = signals.shape
    vc, ac = 1024, 256
    configs, labels = {}, {}
    for kind, atoms in cases.items():
        a = atoms.shape[0]
        t0 = time.perf_counter()
        prep = dictmatch.prepare_atoms(atoms)
        t_prep = time.perf_counter() - t0
        direct = dictmatch.prepare_atoms(atoms, factor=False)
        atoms_h = prep.unit.mH.contiguous()

        def bare(atoms_h=atoms_h, a=a):
            for lo in range(0, v, vc):
                s = signals[lo:lo + vc]
                for alo in range(0, a, ac):
                    torch.matmul(s, atoms_h[:, alo:alo + ac])

        def kernel(n, prep=prep):
            return lambda: dictmatch.match(signals, atoms, prepared=prep, backend="kernel", num_threads=n)

        def gemm(prep=prep, atoms=atoms):
            dictmatch.match(signals, atoms, voxel_chunk=vc, atom_chunk=ac, prepared=prep, backend="torch")

        first = kernel(1)()  # compiled (or loaded from numba's cache) before timing
        check = dictmatch.match(signals[:2048], atoms, prepared=direct, backend="torch").index
        differ = int((first.index[:2048] != check).sum())
        labels[kind] = (f"{kind} atoms ({a} x rank {r}): searched as '{first.form}' (prepared in {t_prep:.2f} s, "
                        f"factorisation residual {prep.residual:.1e}); the kernel and the direct torch complex path "
                        f"disagree on {differ} of {len(check)} voxels")
        for n in threads:
            configs[(n, f"{kind}|bare")] = bare
            configs[(n, f"{kind}|kernel")] = kernel(n)
            configs[(n, f"{kind}|torch")] = gemm
            if prep.form == "factored":
                configs[(n, f"{kind}|kernel direct complex")] = (
                    lambda n=n, direct=direct, atoms=atoms: dictmatch.match(signals, atoms, prepared=direct,
                                                                            backend="kernel", num_threads=n))
    times = _side_by_side(configs, repeats)
    med = {k: _median(t) for k, t in times.items()}
    pairs = v * next(iter(cases.values())).shape[0] / 1e9
    print(f"matching {v} voxels, wall s, median of {repeats} interleaved repeats (min in brackets); ratio = bare "
          f"complex torch.matmul time / the matcher's time (throughput ratio; target >= 0.70):")
    for kind in cases:
        print(f"  {labels[kind]}")
        for n in threads:
            bare_t = med[(n, f"{kind}|bare")]
            row = [f"bare matmul {bare_t:.3f} [{min(times[(n, f'{kind}|bare')]):.3f}] "
                   f"({pairs / bare_t:.2f} G pairs/s)"]
            for name in ("kernel", "kernel direct complex", "torch"):
                key = (n, f"{kind}|{name}")
                if key in med:
                    row.append(f"{name} {med[key]:.3f} [{min(times[key]):.3f}] ratio {bare_t / med[key]:.2f}")
            print(f"    {n} thread(s): " + "; ".join(row), flush=True)
    return med[(1, "real|kernel")]


def _memory(voxels: int, atoms: int, rank: int) -> str:
    """Peak resident-set growth of ``dictmatch.match`` (kernel, real atoms; the kernel already compiled
    and cached), in fresh interpreters, beyond the signals and atoms already in memory:
    ``voxels`` against 2048 atoms and 4096 voxels against ``atoms``; their sum estimates the whole."""
    import subprocess
    import sys

    # growth = the high-water mark after the match minus the resident set just before it (the kernel is
    # already compiled and cached by this process: the child only loads it; an earlier, higher
    # high-water mark would make this an over-estimate)
    code = ("import os, resource, sys, torch; from bids_qmri.fitting import dictmatch\n"
            "torch.set_num_threads(1); v, a, r = map(int, sys.argv[1:4]); g = torch.Generator().manual_seed(0)\n"
            "s = torch.randn(v, r, dtype=torch.complex64, generator=g)\n"
            "d = torch.complex(torch.randn(a, r, generator=g), torch.zeros(a, r))\n"
            "dictmatch.match(s[:64], d[:64], backend='kernel')  # loaded from the cache before measuring\n"
            "base = int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') // 1024\n"
            "dictmatch.match(s, d, backend='kernel', num_threads=1)\n"
            "print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    out = {}
    for v, a in ((voxels, 2048), (4096, atoms)):
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", code, str(v), str(a), str(rank)], capture_output=True,
                             text=True, check=True)
        base, peak = map(int, res.stdout.split())
        out[(v, a)] = ((peak - base) / 1024, time.perf_counter() - t0)
    (mv, tv), (ma, ta) = out[(voxels, 2048)], out[(4096, atoms)]
    inputs = voxels * rank * 8 / 2**20
    return (f"peak resident growth of a kernel match (measured: high-water mark minus the resident set "
            f"before it, fresh interpreters): {voxels} voxels x 2048 atoms "
            f"{mv:.0f} MiB ({tv:.0f} s wall), 4096 voxels x {atoms} atoms {ma:.0f} MiB ({ta:.0f} s wall); "
            f"{voxels} voxels x {atoms} atoms ~ {mv + ma:.0f} MiB beyond the signals themselves "
            f"({inputs:.0f} MiB complex64) and the atoms ({atoms * rank * 8 / 2**20:.0f} MiB; the sum of the two "
            f"growths is an extrapolation)")


def _compile_times(rank: int) -> str:
    """JIT compile time of the kernel (first call with an empty numba cache) and the load time from
    that cache (a second process), each in a fresh interpreter; and where the cache is written."""
    import os
    import subprocess
    import sys
    import tempfile

    code = ("import time, numpy as np; t0 = time.perf_counter(); from bids_qmri.fitting import match_kernel as mk; "
            "t1 = time.perf_counter(); rng = np.random.default_rng(0); "
            f"a = (rng.normal(size=(64, {rank})) + 0j).astype(np.complex64); "
            f"s = (rng.normal(size=(8, {rank})) + 1j).astype(np.complex64); mk.best_atoms(s, a); "
            "print(t1 - t0, time.perf_counter() - t1, mk._CACHE, getattr(mk._match._cache, 'cache_path', '-'))")
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "NUMBA_CACHE_DIR": tmp}
        runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
                .stdout.split() for _ in range(2)]
    (imp, cold, cached, path), (_, warm, _, _) = runs[0], runs[1]
    return (f"first call {float(cold):.1f} s with an empty cache, {float(warm):.2f} s loaded from the cache "
            f"(import {float(imp):.1f} s; cache written: {cached}, to NUMBA_CACHE_DIR here: {path})")


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
