"""pc-bSSFP speed and memory, measured side by side in one run (SPEC §9).

Seed-size volume: 176×176×128 = 3,964,928 voxels (seed protocol, Npc 12). To fit the shared CPU
we time a random fraction of the voxels (``--fraction``) and scale per voxel to the whole volume;
the voxel-by-voxel MIRACLE loop is timed on a smaller subsample (``--loop-voxels``) and
extrapolated the same way. All timings are CPU seconds of this process on one thread
(``time.process_time``), which other users of the machine do not inflate; wall seconds are
printed beside them.

Compared:
  1. our vectorised MIRACLE vs the voxel-by-voxel golden-section loop     (target ≥ 10×)
  2. network inference (estimate_bssfp, all four nets) vs our MIRACLE        (target ≥ 10×)
  3. time per training epoch (400k samples: 360k train + 40k validation, batch 128; measured on
     --train-samples and scaled per sample; simulation timed separately)
  4. "simulate + one PINN epoch + infer the volume" vs MIRACLE on the volume
  5. peak resident memory after each stage

Run: ``OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_bssfp.py [--fraction 0.05]``
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time
from pathlib import Path

import numpy as np
import torch

from bids_qmri.modalities.bssfp.estimate import estimate_bssfp
from bids_qmri.fitting.miracle import miracle_reference
from bids_qmri.physics.bssfp import configurations, remove_receiver_phase, seed_protocol
from bids_qmri.physics.noise import add_complex_noise
from bids_qmri.modalities.bssfp.training import (
    TrainConfig,
    sample_parameters,
    signal_to_features,
    simulate_signal,
    train_bssfp_net,
)

VOLUME = (176, 176, 128)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Timer:
    def __enter__(self):
        self.cpu, self.wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.cpu = time.process_time() - self.cpu
        self.wall = time.perf_counter() - self.wall


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fraction", type=float, default=0.05, help="fraction of the volume's voxels to time")
    ap.add_argument("--loop-voxels", type=int, default=300, help="voxels for the voxel-by-voxel loop")
    ap.add_argument("--train-samples", type=int, default=100_000, help="samples for the timed epoch")
    ap.add_argument("--snr", type=float, default=25.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    protocol = seed_protocol(12)
    n_volume = int(np.prod(VOLUME))
    n = max(1000, int(round(args.fraction * n_volume)))
    scale = n_volume / n
    g = torch.Generator().manual_seed(args.seed)
    par = sample_parameters("invivo", n, g, tr=protocol.tr)
    par["B0"] = torch.empty(n, dtype=torch.float64).uniform_(-20, 20, generator=g)
    s = add_complex_noise(simulate_signal(par, protocol), args.snr, g)
    F = configurations(remove_receiver_phase(s), protocol.phase_increments_rad()).numpy()
    b1 = par["B1"].numpy()
    print(f"volume {VOLUME} = {n_volume} voxels; timing {n} voxels ({n / n_volume:.1%}), scaled ×{scale:.1f}")
    res = {"volume": VOLUME, "n_volume": n_volume, "n_timed": n, "threads": 1}

    with Timer() as t_mir:
        maps_m, prov_m = estimate_bssfp("miracle", F, b1, protocol)
    mir_per_voxel = t_mir.cpu / n
    res["miracle"] = {"cpu_s_per_voxel": mir_per_voxel, "volume_cpu_s": mir_per_voxel * n_volume,
                      "wall_s_timed": t_mir.wall, "median_rounds": prov_m["settings"]["median_rounds"],
                      "peak_rss_mb": peak_rss_mb()}

    k = min(args.loop_voxels, n)
    fm = np.abs(F[:k]) / np.linalg.norm(F[:k], axis=1, keepdims=True)
    with Timer() as t_loop:
        ref1, ref2 = miracle_reference(fm, b1[:k], tr=protocol.tr, te=protocol.te, flip_rad=protocol.flip_rad)
    loop_per_voxel = t_loop.cpu / k
    agree = float(np.nanmax(np.abs(ref1 - maps_m["T1map"][:k]) / ref1))
    res["miracle_loop"] = {"cpu_s_per_voxel": loop_per_voxel, "volume_cpu_s": loop_per_voxel * n_volume,
                           "voxels_timed": k, "max_rel_diff_T1_vs_vectorised": agree}

    for method in ("svnn", "pinn", "svnncomplex", "pinncomplex"):
        estimate_bssfp(method, F[:10], b1[:10], protocol, model_dir=args.model_dir)  # load once
        with Timer() as t_net:
            estimate_bssfp(method, F, b1, protocol, model_dir=args.model_dir)
        res[method] = {"cpu_s_per_voxel": t_net.cpu / n, "volume_cpu_s": t_net.cpu / n * n_volume,
                       "speedup_vs_miracle": mir_per_voxel / (t_net.cpu / n), "peak_rss_mb": peak_rss_mb()}

    epoch = {}
    for method in ("svnn", "pinn", "svnncomplex", "pinncomplex"):
        kind = "complex" if method.endswith("complex") else "magnitude"
        with Timer() as t_sim:  # the simulation train_bssfp_net does before the first epoch
            gs = torch.Generator().manual_seed(args.seed)
            ps = sample_parameters("uniform", args.train_samples, gs, tr=protocol.tr, with_b0=kind == "complex")
            signal_to_features(simulate_signal(ps, protocol), ps["B1"], protocol, kind)
        marks = []
        cfg = TrainConfig(method=method, n_samples=args.train_samples, max_epochs=1, seed=args.seed, progress=False)
        start = time.process_time()
        train_bssfp_net(protocol, cfg, epoch_callback=lambda *a: marks.append(time.process_time()))
        n_train = args.train_samples - round(cfg.val_fraction * args.train_samples)
        epoch_cpu = (marks[0] - start) - t_sim.cpu
        epoch[method] = {"epoch_cpu_s_400k": epoch_cpu / n_train * 360_000,
                         "simulate_cpu_s_400k": t_sim.cpu * 400_000 / args.train_samples,
                         "measured_on_samples": args.train_samples}
    res["training_epoch"] = epoch
    pinn = res["pinn"]
    one_epoch_total = epoch["pinn"]["simulate_cpu_s_400k"] + epoch["pinn"]["epoch_cpu_s_400k"] + pinn["volume_cpu_s"]
    res["simulate_train1_infer_vs_miracle"] = {"pinn_total_cpu_s": one_epoch_total,
                                               "miracle_volume_cpu_s": res["miracle"]["volume_cpu_s"],
                                               "ratio": res["miracle"]["volume_cpu_s"] / one_epoch_total}
    res["peak_rss_mb"] = peak_rss_mb()

    r = res
    print(f"1. MIRACLE vectorised: {r['miracle']['cpu_s_per_voxel'] * 1e6:.1f} µs/voxel → volume {r['miracle']['volume_cpu_s']:.0f} s CPU "
          f"(median {r['miracle']['median_rounds']:.0f} rounds)")
    print(f"   voxel loop ({k} voxels, extrapolated): {loop_per_voxel * 1e6:.0f} µs/voxel → volume {loop_per_voxel * n_volume / 3600:.2f} h CPU")
    print(f"   RATIO loop / vectorised = {loop_per_voxel / mir_per_voxel:.1f}× (target ≥ 10×); max |ΔT1|/T1 = {agree:.1e}")
    for method in ("svnn", "pinn", "svnncomplex", "pinncomplex"):
        print(f"2. {method:12s} inference {r[method]['cpu_s_per_voxel'] * 1e6:.2f} µs/voxel → volume {r[method]['volume_cpu_s']:.1f} s; "
              f"RATIO MIRACLE / {method} = {r[method]['speedup_vs_miracle']:.1f}× (target ≥ 10×)")
    for method, e in epoch.items():
        print(f"3. {method:12s} one epoch (400k samples, batch 128): {e['epoch_cpu_s_400k']:.1f} s CPU; simulation {e['simulate_cpu_s_400k']:.2f} s")
    sti = r["simulate_train1_infer_vs_miracle"]
    print(f"4. simulate 400k + one PINN epoch + infer volume: {sti['pinn_total_cpu_s']:.1f} s vs MIRACLE volume "
          f"{sti['miracle_volume_cpu_s']:.1f} s → RATIO {sti['ratio']:.1f}×")
    print(f"5. peak RSS: after MIRACLE {r['miracle']['peak_rss_mb']:.0f} MB, after inference {r['pinncomplex']['peak_rss_mb']:.0f} MB, "
          f"end {r['peak_rss_mb']:.0f} MB")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=lambda o: None if isinstance(o, float) and math.isnan(o) else o))
    return res


if __name__ == "__main__":
    main()
