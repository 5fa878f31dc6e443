"""``bids_qmri-insilico mrf``: accuracy and precision of the MRF methods versus SNR, and their
Cramér–Rao efficiency (seeds 002/003).

For a few tissue-like (T1, T2) points, fingerprints of the default FISP schedule (B1 = 1, M0 = 1)
get complex Gaussian noise of σ = mean|s| / (√2·SNR) per channel (the seed definition of SNR
relative to the mean signal magnitude), are compressed on the dictionary's own SVD basis and
mapped by ``dictmatch`` without and with refinement and by ``mrfnet`` trained with the MSE and
with the CRB-weighted loss. Per tissue, SNR and method: median relative
bias, coefficient of variation and RMSE of T1 and T2, and the CRB efficiency
``CRB(log T) / var(log T̂)`` (1 for an efficient unbiased estimator; NaN when grid matching puts
every draw on one node) with the normalised CRB loss
``mean((log T̂ − log T)² / CRB)`` (seed 003 Eq. 6), the bounds from ``physics.crb`` for the
parameters (log T1, log T2, Re M0, Im M0) of the frames.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

LOGGER = logging.getLogger("bids_qmri.modalities.mrf.insilico")

#: (T1, T2) in seconds: white matter, grey matter and a long-T2 (CSF-partial-volume) point.
TISSUES = {"WM": (0.85, 0.06), "GM": (1.4, 0.09), "long": (2.5, 0.4)}
METHODS = {"dictmatch": {"mrf_refine": "off"}, "dictmatch+refine": {"mrf_refine": "on"},
           "mrfnet-mse": {"mrf_net_loss": "mse"}, "mrfnet-crb": {"mrf_net_loss": "crb"}}


def _crb_log(schedule: dict, t1: float, t2: float, sigma: float) -> np.ndarray:
    """CRB (variances) of (log T1, log T2) for frames with unknown complex M0 (= 1 here)."""
    from bids_qmri.physics import crb, epg

    def fn(theta):
        sig = epg.fisp_mrf(theta[0].exp(), theta[1].exp(), torch.ones((), dtype=theta.dtype), **schedule)
        return sig * torch.complex(theta[2], theta[3])

    params = torch.tensor([[math.log(t1), math.log(t2), 1.0, 0.0]], dtype=torch.float64)
    return crb.crb(fn, params, sigma).numpy()[0, :2]


def run_mrf_insilico(out_dir: Path, *, snrs=(100.0, 50.0, 25.0, 10.0), n_mc: int = 200, frames: int = 1000,
                     grid_steps: int = 80, seed: int = 0, model_dir: Path | None = None,
                     methods=tuple(METHODS), net_samples: int | None = None,
                     net_epochs: int | None = None) -> list[Path]:
    """Writes ``mrf_insilico.tsv`` and ``mrf_insilico.png`` into ``out_dir``; returns their paths."""
    import pandas as pd

    from bids_qmri.bids.derivatives import save_tsv
    from bids_qmri.modalities.base import EstimateContext
    from bids_qmri.physics import epg

    from .estimate import estimate_dictmatch, estimate_mrfnet, grid_from_options
    from .protocol import MRFProtocol

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sched = epg.default_fisp_schedule(frames)
    protocol = MRFProtocol(tuple(float(v) for v in np.degrees(sched["flip_rad"].numpy())),
                           tuple(float(v) for v in sched["tr"].numpy()), float(sched["te"]), float(sched["ti"]))
    schedule = protocol.schedule()
    cache = Path(model_dir) if model_dir else out_dir / "models"
    gen = torch.Generator().manual_seed(int(seed))
    rows = []
    for tissue, (t1, t2) in TISSUES.items():
        clean = epg.fisp_mrf(torch.tensor(t1, dtype=torch.float64), torch.tensor(t2, dtype=torch.float64), 1.0,
                             **schedule)
        for snr in snrs:
            sigma = float(clean.abs().mean()) / (math.sqrt(2) * snr)
            noise = torch.complex(torch.randn(n_mc, frames, generator=gen, dtype=torch.float64),
                                  torch.randn(n_mc, frames, generator=gen, dtype=torch.float64))
            signal = (clean[None, :] + sigma * noise).numpy().reshape(n_mc, 1, 1, frames)
            bound = _crb_log(schedule, t1, t2, sigma)
            for method in methods:
                net_opts = {"mrf_net_samples": net_samples, "mrf_net_epochs": net_epochs}
                ctx = EstimateContext(model_dir=cache, seed=seed,
                                      options={"mrf_grid_steps": grid_steps, **METHODS[method], **net_opts})
                estimate = estimate_mrfnet if method.startswith("mrfnet") else estimate_dictmatch
                maps, _ = estimate({"signal": signal, "b1": np.ones((n_mc, 1, 1))},
                                   np.ones((n_mc, 1, 1), bool), protocol, ctx)
                row = {"tissue": tissue, "T1_true_s": t1, "T2_true_s": t2, "snr": snr, "method": method, "n": n_mc}
                for k, (name, true) in enumerate((("T1", t1), ("T2", t2))):
                    est = maps[f"{name}map"].ravel().astype(np.float64)
                    est = est[np.isfinite(est)]
                    log_err = np.log(est) - math.log(true)
                    row[f"{name}_median_bias_pct"] = 100 * float(np.median(est / true - 1))
                    row[f"{name}_cv_pct"] = 100 * float(np.std(est) / true)
                    row[f"{name}_rmse_pct"] = 100 * float(np.sqrt(np.mean((est / true - 1) ** 2)))
                    var = float(np.var(log_err))  # 0 when every draw lands on one grid node
                    row[f"{name}_crb_efficiency"] = float(bound[k] / var) if var > 0 else float("nan")
                    row[f"{name}_normalised_crb_loss"] = float(np.mean(log_err**2) / bound[k])
                rows.append(row)
                LOGGER.info("%s SNR %g %s: T1 bias %.2f %%, CV %.2f %%", tissue, snr, method,
                            row["T1_median_bias_pct"], row["T1_cv_pct"])
    table = pd.DataFrame(rows)
    tsv = save_tsv(out_dir / "mrf_insilico.tsv", table.round(6))
    grid = grid_from_options({"mrf_grid_steps": grid_steps})
    png = _plot(table, out_dir / "mrf_insilico.png", f"FISP {frames} frames, grid {grid.t1_steps}x{grid.t2_steps}")
    return [Path(tsv), png]


def _plot(table, out_png: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bids_qmri.utils.atomic import atomic_path

    fig, axes = plt.subplots(2, 3, figsize=(11, 6), squeeze=False)
    for col, (stat, label) in enumerate((("median_bias_pct", "median bias (%)"), ("cv_pct", "CV (%)"),
                                         ("crb_efficiency", "CRB efficiency"))):
        for r, name in enumerate(("T1", "T2")):
            ax = axes[r, col]
            for (tissue, method), g in table.groupby(["tissue", "method"], sort=False):
                ax.plot(g["snr"], g[f"{name}_{stat}"], marker="o", ms=3,
                        ls="-" if "refine" in method else "--", label=f"{tissue} {method}")
            ax.set_xscale("log")
            ax.set_xlabel("SNR", fontsize=8)
            ax.set_ylabel(f"{name} {label}", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=90, bbox_inches="tight", format="png")
    plt.close(fig)
    return out_png


def add_insilico_command(sub) -> None:
    p = sub.add_parser("mrf", help="MRF: accuracy, precision and CRB efficiency vs SNR (dictmatch, +refine, "
                                   "mrfnet MSE vs CRB loss)")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--snr", nargs="+", type=float, default=[100.0, 50.0, 25.0, 10.0])
    p.add_argument("--mc", type=int, default=200, help="noise draws per tissue and SNR")
    p.add_argument("--frames", type=int, default=1000, help="frames of the default FISP schedule")
    p.add_argument("--grid-steps", type=int, default=80, help="dictionary T1 and T2 grid points")
    p.add_argument("--model-dir", type=Path, default=None, help="dictionary cache (default: OUT_DIR/models)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--net-samples", type=int, default=None, help="mrfnet training samples (default: the app's)")
    p.add_argument("--net-epochs", type=int, default=None, help="mrfnet training epochs (default: the app's)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_run)


def _run(args, parser) -> int:
    from bids_qmri.errors import EXIT_OK, EXIT_USAGE

    if args.mc < 2 or args.frames < 10 or args.grid_steps < 4 or any(not s > 0 for s in args.snr):
        parser.exit(EXIT_USAGE, "bids_qmri-insilico: error: --mc >= 2, --frames >= 10, --grid-steps >= 4 and "
                                "positive --snr values are needed\n")
    torch.set_num_threads(1)
    for path in run_mrf_insilico(args.out_dir, snrs=tuple(args.snr), n_mc=args.mc, frames=args.frames,
                                 grid_steps=args.grid_steps, seed=args.seed, model_dir=args.model_dir,
                                 methods=tuple(args.methods), net_samples=args.net_samples,
                                 net_epochs=args.net_epochs):
        print(path)
    return EXIT_OK
