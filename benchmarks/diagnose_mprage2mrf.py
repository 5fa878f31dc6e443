"""What limits mprage2mrf's region-level agreement on held-out phantoms (issue 15).

1. Error decomposition: per atlas region the synthesis minus the truth, split into each
   participant's offset (the mean over its regions) and the region-to-region rest, overall and
   per region class (the tissue with the largest mean fraction in the region); the CCC the
   synthesis would reach with each participant's offset removed.
2. Oracles that know the anatomy: every voxel's true tissue fractions mixed (as the phantom mixes
   them: relaxation rates) with (a) the population mean tissue values (knows the anatomy, not the
   participant's draw), (b) the tissue values a regression on the MPRAGE's tissue contrast
   predicts (all a normalised MPRAGE can say about the draw), (c) the participant's true drawn
   tissue means (only the smooth within-tissue fields missing).
3. Identifiability of the draws from the normalised MPRAGE: Monte Carlo participants drawn as the
   phantom draws them; pure-tissue MPRAGE signals at B1 = 1; the intensity ratios GM/WM and CSF/WM
   (what survives the division by the brain maximum) as features; R^2 (held-out half) of a
   quadratic regression for each tissue's T1 and T2. T2 does not enter the MPRAGE signal at all.
4. Input normalisation: the brain maximum against robust statistics (99th percentile, the WM
   median) across participants and resolutions.

``--population healthy``: participants and Monte Carlo draws from the healthy adult cohort
(``synth.phantom.POPULATIONS``) instead of the phantom's default.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/diagnose_mprage2mrf.py [--model W] [--seeds 9000 9001 9002] [--population P] [--json OUT]``
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
from bids_qmri.group.stats import agreement, ccc
from bids_qmri.modalities.base import EstimateContext
from bids_qmri.modalities.mprage2mrf.estimate import match_coefficients, synthesise
from bids_qmri.modalities.mprage2mrf.protocol import synthetic_protocol
from bids_qmri.modalities.mprage2mrf.simulate import simulate_pair
from bids_qmri.modalities.mrf.protocol import MRFProtocol
from bids_qmri.physics.mprage import mprage_signal
from bids_qmri.synth import phantom as ph

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the evaluation's atlas sampling, not a copy of it
from eval_mprage2mrf import held_out_model, region_labels  # noqa: E402

CLASSES = ph.BRAIN_TISSUES


def phantom_of(seed: int, resolution: float, population: str = ph.DEFAULT_POPULATION):
    """The phantom ``simulate_pair(seed)`` draws (same random stream: fractions and tissue means)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 2002]))
    return ph.make_phantom(rng, resolution, population=population)


def mixture(fractions: dict, values: dict) -> np.ndarray:
    """Relaxation time map from tissue fractions and per-tissue times, mixed as rates (as the phantom)."""
    total = sum(fractions[t].astype(np.float64) for t in ph.TISSUES)
    rate = sum(fractions[t].astype(np.float64) / values[t] for t in ph.TISSUES)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(rate > 0, total / rate, np.nan)


def tissue_features(t1: dict, pd: dict, protocol, b1: float = 1.0) -> np.ndarray:
    """[N, 2]: GM/WM and CSF/WM pure-tissue MPRAGE intensity ratios (scale-free, as after normalisation)."""
    kw = protocol.signal_kwargs()
    s = {t: mprage_signal(torch.as_tensor(t1[t], dtype=torch.float64), torch.as_tensor(pd[t], dtype=torch.float64),
                          b1, **kw).numpy() for t in CLASSES}
    return np.stack([s["GM"] / s["WM"], s["CSF"] / s["WM"]], axis=-1)


def draw_population(rng, n: int, population: str = ph.DEFAULT_POPULATION) -> dict:
    """``n`` participants' tissue means as ``draw_tissue_parameters`` draws them (between-participant part)."""
    out = {}
    for p in ("T1", "T2", "PD"):
        out[p] = {}
        for t in CLASSES:
            mu = ph.TISSUE_PARAMETERS[t][p][0]
            out[p][t] = np.clip(mu + ph.between_sd(t, p, population) * rng.standard_normal(n), *ph.BOUNDS[p])
    for t in CLASSES:
        out["T2"][t] = np.minimum(out["T2"][t], 0.9 * out["T1"][t])
    return out


def quadratic(f: np.ndarray) -> np.ndarray:
    cols = [np.ones(len(f))] + [f[:, i] for i in range(f.shape[1])]
    cols += [f[:, i] * f[:, j] for i in range(f.shape[1]) for j in range(i, f.shape[1])]
    return np.stack(cols, axis=1)


def identifiability(protocol, n: int = 20_000, seed: int = 0, population: str = ph.DEFAULT_POPULATION):
    """Regressions of each tissue's T1/T2 draw on the MPRAGE contrast features -> (R^2 table, predictor)."""
    rng = np.random.default_rng(seed)
    pop = draw_population(rng, n, population)
    f = tissue_features(pop["T1"], pop["PD"], protocol)
    X = quadratic(f)
    half = n // 2
    r2, coefs = {}, {}
    for p in ("T1", "T2"):
        for t in CLASSES:
            y = pop[p][t]
            beta, *_ = np.linalg.lstsq(X[:half], y[:half], rcond=None)
            resid = y[half:] - X[half:] @ beta
            r2[f"{p}_{t}"] = round(float(1 - resid.var() / y[half:].var()), 3)
            coefs[(p, t)] = beta

    def predict(tissue_means: dict) -> dict:
        t1 = {t: np.array([tissue_means[t]["T1"]]) for t in CLASSES}
        pd = {t: np.array([tissue_means[t]["PD"]]) for t in CLASSES}
        x = quadratic(tissue_features(t1, pd, protocol))
        return {p: {t: float((x @ coefs[(p, t)])[0]) for t in CLASSES} for p in ("T1", "T2")}

    return r2, predict


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[9000, 9001, 9002])
    p.add_argument("--grid-steps", type=int, default=80)
    p.add_argument("--min-voxels", type=int, default=5)
    p.add_argument("--population", choices=ph.POPULATIONS, default=ph.DEFAULT_POPULATION,
                   help="phantom population of the participants (and of the Monte Carlo draws)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    c0, w0 = time.process_time(), time.perf_counter()
    protocol = synthetic_protocol()
    model, net, card = held_out_model(p, args.model, args.seeds)
    resolution = card.get("training", {}).get("resolution_mm", 3.0)
    mrf = MRFProtocol.from_dict(card["mrf_protocol"])
    atlas = resolve_atlas(None)
    r2, predict = identifiability(protocol, population=args.population)
    rows, norm = [], []
    with tempfile.TemporaryDirectory() as tmp:
        ctx = EstimateContext(model_dir=Path(tmp), options={"mprage2mrf_grid_steps": args.grid_steps})
        for seed in args.seeds:
            pair = simulate_pair(seed, protocol=protocol, resolution_mm=resolution, population=args.population)
            phantom = phantom_of(seed, resolution, args.population)
            assert np.array_equal(phantom.brain_mask, pair.brain)  # the same participant
            maps, _ = match_coefficients(synthesise(net, pair.mprage, pair.brain), pair.brain, net.basis(), mrf, ctx)
            fr = phantom.fractions
            means = phantom.tissue_means
            population = {q: {t: ph.TISSUE_PARAMETERS[t][q][0] for t in ph.TISSUES} for q in ("T1", "T2")}
            contrast = predict(means)
            oracles = {
                "population": {q: mixture(fr, population[q]) for q in ("T1", "T2")},
                "contrast": {q: mixture(fr, {**population[q], **contrast[q]}) for q in ("T1", "T2")},
                "drawn_means": {q: mixture(fr, {t: means[t][q] for t in ph.TISSUES}) for q in ("T1", "T2")},
            }
            wm = pair.brain & (fr["WM"] > 0.9)
            gm = pair.brain & (fr["GM"] > 0.9)
            csf = pair.brain & (fr["CSF"] > 0.9)
            v = pair.mprage[pair.brain]
            top = float(v.max())  # ratios: whatever normalise_mprage's scale
            norm.append({"seed": seed, "p99_over_max": round(float(np.percentile(v, 99)) / top, 3),
                         "wm_median_over_max": round(float(np.median(pair.mprage[wm])) / top, 3),
                         "gm_median_over_max": round(float(np.median(pair.mprage[gm])) / top, 3),
                         "csf_median_over_max": round(float(np.median(pair.mprage[csf])) / top, 3),
                         "gm_over_wm": round(float(np.median(pair.mprage[gm]) / np.median(pair.mprage[wm])), 3),
                         "drawn": {t: {q: round(means[t][q], 3) for q in ("T1", "T2", "PD")} for t in CLASSES}})
            labels = region_labels(pair.template_mm, atlas)
            for idx in atlas.table["index"]:
                sel = pair.brain & (labels == idx) & np.isfinite(maps["T1map"]) & np.isfinite(maps["T2map"])
                if sel.sum() < args.min_voxels:
                    continue
                row = {"seed": seed, "region": int(idx),
                       "class": CLASSES[int(np.argmax([fr[t][sel].mean() for t in CLASSES]))]}
                for q in ("T1", "T2"):
                    row[f"{q}_true"] = 1e3 * float(phantom.params[q][sel].mean())
                    row[f"{q}_dl"] = 1e3 * float(maps[f"{q}map"][sel].mean())
                    for name, o in oracles.items():
                        row[f"{q}_{name}"] = 1e3 * float(o[q][sel].mean())
                rows.append(row)
            print(f"seed {seed}: {sum(r['seed'] == seed for r in rows)} regions", flush=True)
    seeds = np.array([r["seed"] for r in rows])
    out = {"model": str(model), "seeds": args.seeds, "population": args.population, "resolution_mm": resolution,
           "n_regions": len(rows),
           "identifiability_r2": r2, "normalisation": norm, "decomposition": {}, "ccc": {}}
    rng = np.random.default_rng(0)
    for q in ("T1", "T2"):
        true = np.array([r[f"{q}_true"] for r in rows])
        for est in ("dl", "population", "contrast", "drawn_means"):
            y = np.array([r[f"{q}_{est}"] for r in rows])
            a = agreement(true, y, seeds, n_bootstrap=2000, rng=rng)
            out["ccc"][f"{q}_{est}"] = {"ccc": round(a.ccc, 3), "ccc_ci": [round(a.ccc_ci_low, 3), round(a.ccc_ci_high, 3)],
                                      "mean_diff_ms": round(a.mean_diff, 1)}
        dl = np.array([r[f"{q}_dl"] for r in rows])
        err = dl - true
        offsets = {int(s): float(err[seeds == s].mean()) for s in args.seeds}
        within = err - np.array([offsets[int(s)] for s in seeds])
        # the synthesis with each participant's mean error removed: what the region-to-region error alone allows
        out["ccc"][f"{q}_dl_offsets_removed"] = {"ccc": round(ccc(true, dl - np.array([offsets[int(s)] for s in seeds])), 3)}
        dec = {"offset_ms": {s: round(o, 1) for s, o in offsets.items()},
               "rms_offset_ms": round(float(np.sqrt(np.mean(np.array(list(offsets.values())) ** 2))), 1),
               "rms_within_ms": round(float(np.sqrt(np.mean(within ** 2))), 1),
               "rms_total_ms": round(float(np.sqrt(np.mean(err ** 2))), 1), "by_class": {}}
        cls = np.array([r["class"] for r in rows])
        for c in CLASSES:
            k = cls == c
            if not k.any():
                continue
            per = {int(s): round(float(err[k & (seeds == s)].mean()), 1) for s in args.seeds if (k & (seeds == s)).any()}
            dec["by_class"][c] = {"regions": int(k.sum()), "offset_ms": per,
                                  "rms_within_ms": round(float(np.sqrt(np.mean(
                                      (err[k] - np.array([per[int(s)] for s in seeds[k]])) ** 2))), 1),
                                  "true_mean_ms": round(float(true[k].mean()), 1)}
        out["decomposition"][q] = dec
    out["cpu_s"] = round(time.process_time() - c0, 1)
    out["wall_s"] = round(time.perf_counter() - w0, 1)
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps({**out, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
