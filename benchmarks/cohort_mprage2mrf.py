"""Does cohort fine-tuning (``--mprage2mrf-train-on-cohort``) help? Leave-one-out on a small
synthetic cohort (issue 15).

Phantom participants never used in training (``--seeds``), each with an MPRAGE (``physics.mprage``,
noise) and its own measured MRF (``eval_mprage2mrf.measured_mrf``: the dataset's MRF with noise,
``dictmatch`` with the true B1). For each participant the bundled model is fine-tuned, exactly as
the cohort option does (``cohort.fine_tune`` on ``cohort.slices_from_maps`` of the other
participants' T1w and dictmatch T1/T2/M0 maps; on the phantom grid, so no registration), and
applied to that participant's MPRAGE. Region-level (default atlas) T1/T2 of the bundled and the
fine-tuned synthesis against the truth and against the participant's own dictmatch: CCC with the
clustered bootstrap, mean difference (truth - synthesis), each participant's offset.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/cohort_mprage2mrf.py [--seeds 9100 9101 9102] [--epochs 10] [--json OUT]``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bids_qmri.anatomy.atlases import resolve_atlas
from bids_qmri.group.stats import agreement
from bids_qmri.modalities.base import EstimateContext
from bids_qmri.modalities.mprage2mrf.cohort import _stack, fine_tune, slices_from_maps
from bids_qmri.modalities.mprage2mrf.estimate import match_coefficients, synthesise
from bids_qmri.modalities.mprage2mrf.protocol import synthetic_protocol
from bids_qmri.modalities.mprage2mrf.simulate import simulate_pair
from bids_qmri.modalities.mrf.protocol import MRFProtocol

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the evaluation's phantom MRF and atlas sampling
from eval_mprage2mrf import held_out_model, measured_mrf, region_labels  # noqa: E402


def region_means(maps_by_name: dict, brain, labels, atlas, min_voxels: int) -> list[dict]:
    rows = []
    for idx in atlas.table["index"]:
        sel = brain & (labels == idx)
        for m in maps_by_name.values():
            sel = sel & np.isfinite(m["T1map"]) & np.isfinite(m["T2map"])
        if sel.sum() < min_voxels:
            continue
        rows.append({"region": int(idx), **{f"{q}_{name}": 1e3 * float(m[f"{q}map"][sel].mean())
                                             for name, m in maps_by_name.items() for q in ("T1", "T2")}})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[9100, 9101, 9102])
    p.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs (the cohort option's default)")
    p.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate (the cohort option's)")
    p.add_argument("--grid-steps", type=int, default=80)
    p.add_argument("--min-voxels", type=int, default=5)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    c0, w0 = time.process_time(), time.perf_counter()
    protocol = synthetic_protocol()
    model, net, card = held_out_model(p, args.model, args.seeds)
    resolution = card.get("training", {}).get("resolution_mm", 3.0)
    mrf = MRFProtocol.from_dict(card["mrf_protocol"])
    atlas = resolve_atlas(None)
    timings = {}
    with tempfile.TemporaryDirectory() as tmp:
        ctx = EstimateContext(model_dir=Path(tmp), options={"mprage2mrf_grid_steps": args.grid_steps})
        people = {}
        for seed in args.seeds:
            pair = simulate_pair(seed, protocol=protocol, resolution_mm=resolution)
            dm = measured_mrf(pair, seed, mrf, snr=25.0, grid_steps=args.grid_steps, model_dir=Path(tmp), threads=1)
            stacks = slices_from_maps(pair.mprage, pair.brain, *(np.nan_to_num(dm[k]) for k in ("T1map", "T2map", "M0map")),
                                      pair.affine, net.multiple)
            people[seed] = (pair, dm, stacks)
            print(f"seed {seed}: simulated, {len(stacks[0])} slices", flush=True)
        timings["simulation_cpu_s"] = round(time.process_time() - c0, 1)
        rows = []
        for seed in args.seeds:
            pair, dm, _ = people[seed]
            others = [s for s in args.seeds if s != seed]
            c1 = time.process_time()
            tuned, result, _ = fine_tune(net, _stack([people[s][2] for s in others]), epochs=args.epochs, lr=args.lr,
                                         seed=0, threads=1)
            timings[f"fine_tune_cpu_s_{seed}"] = round(time.process_time() - c1, 1)
            maps = {"true": {"T1map": pair.t1, "T2map": pair.t2}, "dictmatch": dm}
            for name, model_net in (("bundled", net), ("cohort", tuned)):
                coeffs = synthesise(model_net, pair.mprage, pair.brain)
                maps[name], _ = match_coefficients(coeffs, pair.brain, model_net.basis(), mrf, ctx)
            labels = region_labels(pair.template_mm, atlas)
            for r in region_means(maps, pair.brain, labels, atlas, args.min_voxels):
                rows.append({"seed": seed, **r})
            print(f"seed {seed}: fine-tuned on {others} (best epoch {result.best_epoch}, loss {result.best_loss:.4f}), "
                  f"{timings[f'fine_tune_cpu_s_{seed}']} CPU-s", flush=True)
    seeds = np.array([r["seed"] for r in rows])
    rng = np.random.default_rng(0)
    out = {"model": str(model), "seeds": args.seeds, "epochs": args.epochs, "lr": args.lr, "resolution_mm": resolution,
           "n_regions": len(rows), "agreement": {}}
    for q in ("T1", "T2"):
        for ref in ("true", "dictmatch"):
            for est in ("bundled", "cohort") + (("dictmatch",) if ref == "true" else ()):
                x = np.array([r[f"{q}_{ref}"] for r in rows])
                y = np.array([r[f"{q}_{est}"] for r in rows])
                a = agreement(x, y, seeds, n_bootstrap=10_000, rng=rng)
                out["agreement"][f"{q}_{est}_vs_{ref}"] = {
                    "ccc": round(a.ccc, 3), "ccc_ci": [round(a.ccc_ci_low, 3), round(a.ccc_ci_high, 3)],
                    "mean_diff_ms": round(a.mean_diff, 1),
                    "mean_diff_ci_ms": [round(a.mean_diff_ci_low, 1), round(a.mean_diff_ci_high, 1)],
                    "participant_offsets_ms": {int(s): round(float((y - x)[seeds == s].mean()), 1) for s in args.seeds}}
    out["timings"] = {**timings, "total_cpu_s": round(time.process_time() - c0, 1),
                      "wall_s": round(time.perf_counter() - w0, 1)}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps({**out, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
