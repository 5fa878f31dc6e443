"""MRF matching and dictionary benchmarks, measured side by side in one run (issue 14, SPEC §9).

- matching throughput of ``fitting.dictmatch.match`` (the complex inner products as two float32
  GEMMs + |·|² + running exact argmax over atom chunks) against a bare complex64 ``torch.matmul``
  of the same shapes ``[V, R] @ [R, A]`` (chunked the same way, result discarded): target ≥ 70 %
  of it; also against the two real GEMMs alone (what the argmax costs on top);
- dictionary generation time per atom (FISP EPG, 1000 frames, the app's state cap, chunked);
- mrfnet inference (``modalities.mrf.net`` architecture) against matching the same voxels
  (target ≥ 20× faster);
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--voxels", type=int, default=20000)
    p.add_argument("--atoms", type=int, default=100000)
    p.add_argument("--rank", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dict-atoms", type=int, default=2048, help="atoms simulated to time the dictionary")
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
    t_match = _best_of(full)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t_bare = _best_of(bare)
    t_real = _best_of(bare_real)
    print(f"matching {v} voxels x {a} atoms (rank {r}, {args.threads} thread(s)):")
    print(f"  bare torch.matmul (same shapes, chunked)  {t_bare:8.3f} s  {v * a / t_bare / 1e9:6.2f} G pairs/s")
    print(f"  dictmatch.match (GEMM + exact argmax)     {t_match:8.3f} s  {v * a / t_match / 1e9:6.2f} G pairs/s")
    print(f"  the two real GEMMs match uses, alone      {t_real:8.3f} s  {v * a / t_real / 1e9:6.2f} G pairs/s")
    print(f"  ratio match / bare complex matmul throughput: {t_bare / t_match:.2f} (target >= 0.70)")
    print(f"  ratio match / its own real GEMMs alone:       {t_real / t_match:.2f}")
    whole = 1_500_000
    print(f"  extrapolated 1 mm whole brain ({whole} voxels) x {a} atoms: {t_match * whole / v:.0f} s")
    block = vc * ac * (8 + 4)
    inputs = whole * r * 8 + a * r * 8 * 2
    print(f"  memory, whole brain: inputs {inputs / 2**20:.0f} MiB + score block {block / 2**20:.0f} MiB "
          f"(resident growth of this run {max(rss1 - rss0, 0) / 1024:.0f} MiB)")

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


if __name__ == "__main__":
    main()
