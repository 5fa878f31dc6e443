"""Default pc-bSSFP nets before/after noise training: seed 001 Fig. 5's noise-free grid error and
the CoD at low SNR, beside MIRACLE, on the same noise draws (issue 18).

Per method and Npc (seed protocol TR 4.8 ms, TE 2.4 ms, 15°, default increments):
- *Fig. 5 grid*: noise-free |relative error| over the 20×20 seed-range grid × 31 θ
  (``insilico.theta_sweep``), mean over θ of the per-θ mean (the number TRAINING.md quotes) and of
  the per-θ median; bounds 1 / 1.5 / 3.5 % at Npc 12 / 6 / 4 (complex nets).
- *CoD*: seed 001's CoD of the Monte Carlo mean (``insilico.monte_carlo``, ``insilico.cod``) on the
  50×50 linear grid and 4000 in-vivo-like samples, 50 draws per SNR; every method sees the same
  draws (the generator is reseeded per set, SNR and Npc).

Each ``--models LABEL=DIR`` is a ``--model-dir`` whose user-installed nets replace the bundled ones
(``bids_qmri-train --model-dir DIR``); ``LABEL=bundled`` is the bundled default set.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_bssfp_noise_training.py \\
        --models bundled=bundled tuned=/tmp/cand --methods svnncomplex --npc 12 --out /tmp/eval.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bids_qmri.modalities.bssfp.insilico import cod, invivo_test_set, linear_grid, monte_carlo, theta_sweep
from bids_qmri.physics.bssfp import seed_protocol

FIG5_BOUND = {12: 1.0, 6: 1.5, 4: 3.5}


def fig5(method, protocol, model_dir):
    df = theta_sweep(method, protocol, n_theta=31, grid_n=20, model_dir=model_dir, model_set="default")
    out = {}
    for name, d in df.groupby("parameter"):
        out[name] = {"mean": round(float(d["mean_abs_rel_err_pct"].mean()), 3),
                     "median": round(float(d["median_abs_rel_err_pct"].mean()), 3)}
    return out


def cods(method, protocol, model_dir, sets, snrs, n_mc, seed):
    out = {}
    for set_name, par in sets.items():
        for snr in snrs:
            gen = torch.Generator().manual_seed(seed * 1000 + int(snr) * 10 + protocol.npc)
            res = monte_carlo(method, par, protocol, snr, n_mc, gen, model_dir=model_dir, seed=seed,
                              model_set="default")
            out[f"{set_name} SNR {snr:g}"] = {
                name: round(cod(par[name].numpy(), res[key][0]), 4) for name, key in (("T1", "T1map"), ("T2", "T2map"))
            }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["bundled=bundled"], metavar="LABEL=DIR")
    p.add_argument("--methods", nargs="+", default=["svnn", "pinn", "svnncomplex", "pinncomplex"])
    p.add_argument("--npc", nargs="+", type=int, default=[12, 6, 4])
    p.add_argument("--snr", nargs="+", type=float, default=[15, 10])
    p.add_argument("--mc", type=int, default=50)
    p.add_argument("--grid", type=int, default=50)
    p.add_argument("--invivo", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--miracle-cache", type=Path, default=None,
                   help="JSON of MIRACLE's CoD from an earlier run with the same draws (computed and written if absent)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    sets = {"grid": linear_grid(args.grid), "invivo": invivo_test_set(args.invivo, args.seed)}
    results = {"settings": {k: str(v) for k, v in vars(args).items()}, "miracle": {}, "nets": {}}
    cached = json.loads(args.miracle_cache.read_text()) if args.miracle_cache and args.miracle_cache.is_file() else {}
    for npc in args.npc:
        protocol = seed_protocol(npc)
        key = str(npc)
        if key not in cached:
            t0, c0 = time.perf_counter(), time.process_time()
            cached[key] = cods("miracle", protocol, None, sets, args.snr, args.mc, args.seed)
            print(f"miracle npc {npc}: {cached[key]} ({time.process_time() - c0:.0f} CPU-s, "
                  f"{time.perf_counter() - t0:.0f} s wall)", flush=True)
            if args.miracle_cache:
                args.miracle_cache.write_text(json.dumps(cached, indent=1))
        results["miracle"][key] = cached[key]
        for spec in args.models:
            label, _, where = spec.partition("=")
            model_dir = None if where in ("", "bundled") else Path(where)
            for method in args.methods:
                c0 = time.process_time()
                row = {"fig5": fig5(method, protocol, model_dir),
                       "cod": cods(method, protocol, model_dir, sets, args.snr, args.mc, args.seed)}
                row["cpu_s"] = round(time.process_time() - c0, 1)
                results["nets"].setdefault(label, {}).setdefault(method, {})[key] = row
                bound = FIG5_BOUND.get(npc, np.inf)
                f5 = row["fig5"]
                ok = "ok" if max(f5["T1"]["mean"], f5["T2"]["mean"]) < bound else "OVER"
                vs = "; ".join(f"{k} {v['T1']:.4f}/{v['T2']:.4f} (M {cached[key][k]['T1']:.4f}/{cached[key][k]['T2']:.4f})"
                               for k, v in row["cod"].items())
                print(f"{label:10s} {method:12s} npc {npc:2d} fig5 T1 {f5['T1']['mean']:.3f} ({f5['T1']['median']:.3f}) "
                      f"T2 {f5['T2']['mean']:.3f} ({f5['T2']['median']:.3f}) [{ok} < {bound}] | CoD {vs}", flush=True)
                args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
