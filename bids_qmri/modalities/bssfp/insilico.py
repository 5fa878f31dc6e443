"""In-silico validation of pc-bSSFP relaxometry (seed 000 Fig. 2–3, seed 001 Fig. 5).

1. Monte Carlo accuracy versus SNR: a linear T1×T2 grid and an in-vivo-like test set (B1 = 1,
   on resonance), complex Gaussian noise at each SNR, ``n_mc`` draws; per method the MC mean and
   SD of the estimates, relative error maps ε = (μ_MC − y)/y·100 and the coefficient of
   determination CoD = 1 − Σ(y − μ_MC)²/Σ(y − ȳ)².
2. Off-resonance: noise-free relative error versus θ = 2π·ΔB0·TR ∈ (−π, π) for Npc 12/6/4.

Every estimate goes through ``estimate_bssfp`` (the code the app runs). Results are TSV + PNG.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bids_qmri.modalities.bssfp.estimate import BSSFP_METHODS, estimate_bssfp
from bids_qmri.physics.bssfp import BSSFPProtocol, configurations, remove_receiver_phase, seed_protocol
from bids_qmri.physics.noise import add_complex_noise, noise_sigma
from bids_qmri.modalities.bssfp.net import configuration_noise_sigma
from bids_qmri.modalities.bssfp.training import DISTRIBUTIONS, sample_parameters, simulate_signal
from bids_qmri.utils.atomic import atomic_path

__all__ = ["DEFAULT_SNRS", "cod", "linear_grid", "monte_carlo", "run_bssfp_insilico", "theta_sweep"]

log = logging.getLogger("bids_qmri.modalities.bssfp.insilico")

DEFAULT_SNRS = (math.inf, 50, 40, 30, 25, 20, 15, 10)
PARAMS = (("T1", "T1map"), ("T2", "T2map"))


def linear_grid(n: int, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """The seed's linear n×n T1/T2 grid over the uniform range (B1 = 1, on resonance)."""
    (t1_lo, t1_hi), (t2_lo, t2_hi) = DISTRIBUTIONS["uniform"]["T1"], DISTRIBUTIONS["uniform"]["T2"]
    t1, t2 = torch.meshgrid(
        torch.linspace(t1_lo, t1_hi, n, dtype=dtype), torch.linspace(t2_lo, t2_hi, n, dtype=dtype), indexing="ij"
    )
    t1, t2 = t1.reshape(-1), t2.reshape(-1)
    return {"T1": t1, "T2": t2, "B1": torch.ones_like(t1), "B0": torch.zeros_like(t1)}


def invivo_test_set(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 7919)
    par = sample_parameters("invivo", n, g, tr=seed_protocol().tr)
    par["B1"] = torch.ones_like(par["T1"])
    return par


def cod(y: np.ndarray, y_hat: np.ndarray) -> float:
    """Coefficient of determination over the finite estimates (seed 000 eq. 6)."""
    ok = np.isfinite(y_hat)
    if ok.sum() < 2:
        return math.nan
    y, y_hat = y[ok], y_hat[ok]
    return float(1 - np.sum((y - y_hat) ** 2) / np.sum((y - y.mean()) ** 2))


def monte_carlo(
    method: str,
    params: dict[str, torch.Tensor],
    protocol: BSSFPProtocol,
    snr: float,
    n_mc: int,
    generator: torch.Generator,
    *,
    model_dir=None,
    seed: int = 0,
    chunk_voxels: int = 1 << 19,
    model_set: str = "seed",
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MC mean and SD per parameter map ({"T1map": (mean, sd), ...}); NaN estimates are skipped."""
    s = simulate_signal(params, protocol)
    n, npc = s.shape
    phi = protocol.phase_increments_rad()
    b1 = params["B1"].numpy()
    draws = 1 if not math.isfinite(snr) else n_mc
    per_chunk = max(1, chunk_voxels // n)
    # the test noise, known here: what a noise-conditioned net is told (0 = noise-free)
    sigma_f = configuration_noise_sigma(noise_sigma(snr), npc) if math.isfinite(snr) else 0.0
    acc: dict[str, list[np.ndarray]] = {}
    for start in range(0, draws, per_chunk):
        k = min(per_chunk, draws - start)
        sk = s.unsqueeze(0).expand(k, n, npc).reshape(-1, npc)
        if math.isfinite(snr):
            sk = add_complex_noise(sk, snr, generator)
        f = configurations(remove_receiver_phase(sk), phi).numpy()
        maps, _ = estimate_bssfp(method, f, np.tile(b1, k), protocol, model_dir=model_dir, seed=seed,
                                 model_set=model_set, range_check=False, noise_sigma=sigma_f)
        for key, v in maps.items():
            v = v.reshape(k, n).astype(np.float64)
            fin = np.isfinite(v)
            a = acc.setdefault(key, [np.zeros(n), np.zeros(n), np.zeros(n)])
            a[0] += fin.sum(0)
            a[1] += np.where(fin, v, 0).sum(0)
            a[2] += np.where(fin, v * v, 0).sum(0)
    out = {}
    for key, (cnt, s1, s2) in acc.items():
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(cnt > 0, s1 / np.maximum(cnt, 1), np.nan)
            var = np.where(cnt > 1, (s2 - cnt * mean**2) / np.maximum(cnt - 1, 1), np.nan)
        out[key] = (mean, np.sqrt(np.clip(var, 0, None)))
    return out


def theta_sweep(
    method: str, protocol: BSSFPProtocol, *, n_theta: int, grid_n: int, model_dir=None, seed: int = 0,
    model_set: str = "seed",
) -> pd.DataFrame:
    """Noise-free |relative error| of T1 and T2 versus θ over a grid_n × grid_n T1/T2 grid."""
    grid = linear_grid(grid_n)
    theta = np.linspace(-math.pi, math.pi, n_theta + 2)[1:-1]
    n = grid["T1"].numel()
    par = {k: v.repeat(n_theta) for k, v in grid.items()}
    par["B0"] = torch.as_tensor(np.repeat(theta / (2 * math.pi * protocol.tr), n))
    s = simulate_signal(par, protocol)
    f = configurations(remove_receiver_phase(s), protocol.phase_increments_rad()).numpy()
    maps, _ = estimate_bssfp(method, f, par["B1"].numpy(), protocol, model_dir=model_dir, seed=seed,
                                 model_set=model_set, range_check=False, noise_sigma=0.0)
    rows = []
    for name, key in PARAMS:
        rel = np.abs(maps[key].astype(np.float64) / par[name].numpy() - 1).reshape(n_theta, n) * 100
        for i, th in enumerate(theta):
            r = rel[i][np.isfinite(rel[i])]
            rows.append({
                "npc": protocol.npc, "method": method, "theta_rad": th, "parameter": name,
                "mean_abs_rel_err_pct": float(r.mean()) if r.size else math.nan,
                "median_abs_rel_err_pct": float(np.median(r)) if r.size else math.nan,
                "p95_abs_rel_err_pct": float(np.percentile(r, 95)) if r.size else math.nan,
                "n_failed": int(n - r.size),
            })
    return pd.DataFrame(rows)


def onthefly_check(
    protocol: BSSFPProtocol, *, methods, model_dir, grid_n: int = 50, seed: int = 0, model_set: str = "seed"
) -> pd.DataFrame:
    """Train (or reuse) on-the-fly models for a non-bundled protocol; noise-free CoD on the grid."""
    import time

    from bids_qmri.modalities.bssfp.models import ON_THE_FLY, get_model

    grid = linear_grid(grid_n)
    s = simulate_signal(grid, protocol)
    f = configurations(remove_receiver_phase(s), protocol.phase_increments_rad()).numpy()
    rows = []
    for method in methods:
        t0 = time.process_time()
        _, card = get_model(method, protocol, model_dir=model_dir, seed=seed, model_set=model_set)
        train_cpu = time.process_time() - t0
        maps, _ = estimate_bssfp(method, f, grid["B1"].numpy(), protocol, model_dir=model_dir, seed=seed,
                                 model_set=model_set, range_check=False, noise_sigma=0.0)
        for name, key in PARAMS:
            rows.append({"protocol": protocol.describe(), "protocol_key": protocol.key(), "method": method,
                         "parameter": name, "cod": cod(grid[name].numpy(), maps[key].astype(np.float64)),
                         "train_cpu_s": round(train_cpu, 2), "reused": bool(card.get("reused")),
                         "epochs_run": card["training"]["epochs_run"], "settings": str(ON_THE_FLY[method])})
    return pd.DataFrame(rows)


def _save_tsv(df: pd.DataFrame, path: Path) -> Path:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep="\t", index=False, na_rep="n/a")
    return path


def _save_fig(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def _plot_cod(df: pd.DataFrame, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(df["set"]))
    fig, axes = plt.subplots(len(sets), 2, figsize=(10, 3.6 * len(sets)), squeeze=False)
    for i, st in enumerate(sets):
        for j, (name, _) in enumerate(PARAMS):
            ax = axes[i, j]
            for method, d in df[(df["set"] == st) & (df["parameter"] == name)].groupby("method", sort=False):
                x = d["snr"].replace(math.inf, 100.0)
                ax.plot(x, d["cod"], "o-", label=method)
            ax.set_xscale("log")
            ax.set_xlabel("SNR (inf plotted at 100)")
            ax.set_ylabel(f"CoD {name}")
            ax.set_title(f"{st} test set, {name}")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return _save_fig(fig, path)


def _plot_relerr_maps(maps: dict, grid_n: int, snr: float, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (t1_lo, t1_hi), (t2_lo, t2_hi) = DISTRIBUTIONS["uniform"]["T1"], DISTRIBUTIONS["uniform"]["T2"]
    methods = list(maps)
    fig, axes = plt.subplots(2, len(methods), figsize=(3.2 * len(methods), 6), squeeze=False)
    for j, m in enumerate(methods):
        for i, (name, _) in enumerate(PARAMS):
            ax = axes[i, j]
            im = ax.imshow(maps[m][name].reshape(grid_n, grid_n), origin="lower", aspect="auto",
                           extent=[t2_lo * 1e3, t2_hi * 1e3, t1_lo * 1e3, t1_hi * 1e3], cmap="RdBu_r", vmin=-10, vmax=10)
            ax.set_title(f"{m}: ε_rel {name} (%)", fontsize=9)
            ax.set_xlabel("T2 (ms)")
            ax.set_ylabel("T1 (ms)")
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"relative error of the MC mean, SNR {snr:g}")
    fig.tight_layout()
    return _save_fig(fig, path)


def _plot_theta(df: pd.DataFrame, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    npcs = list(dict.fromkeys(df["npc"]))
    fig, axes = plt.subplots(2, len(npcs), figsize=(4 * len(npcs), 6.5), squeeze=False)
    for j, npc in enumerate(npcs):
        for i, (name, _) in enumerate(PARAMS):
            ax = axes[i, j]
            for method, d in df[(df["npc"] == npc) & (df["parameter"] == name)].groupby("method", sort=False):
                ax.plot(d["theta_rad"], d["mean_abs_rel_err_pct"], label=method)
            ax.set_yscale("log")
            ax.set_title(f"Npc {npc}: mean |ε_rel| {name}")
            ax.set_xlabel("θ (rad)")
            ax.set_ylabel("%")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return _save_fig(fig, path)


def run_bssfp_insilico(
    out_dir,
    *,
    methods=BSSFP_METHODS,
    snrs=DEFAULT_SNRS,
    n_mc: int = 5000,
    grid_n: int = 200,
    n_invivo: int = 40000,
    npcs=(12, 6, 4),
    theta_methods=BSSFP_METHODS,
    n_theta: int = 61,
    theta_grid_n: int = 20,
    map_snrs=(math.inf, 25),
    model_dir=None,
    seed: int = 0,
    progress: bool | None = None,
    onthefly_protocol: BSSFPProtocol | None = None,
    model_set: str = "seed",
) -> list[Path]:
    """Run both experiments on the seed protocol and write TSV tables and PNG figures, with the
    networks of the bundled ``model_set`` (``seed``: the models that reproduce seed 001's figures)."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    protocol = seed_protocol(12)
    gen = torch.Generator().manual_seed(seed)
    sets = {"grid": linear_grid(grid_n), "invivo": invivo_test_set(n_invivo, seed)}
    cod_rows, summary_rows, map_rows, maps_for_plot = [], [], [], {}
    jobs = [(st, snr, m) for st in sets for snr in snrs for m in methods]
    for st, snr, method in tqdm(jobs, desc="bSSFP Monte Carlo", disable=None if progress is None else not progress):
        par = sets[st]
        res = monte_carlo(method, par, protocol, snr, n_mc, gen, model_dir=model_dir, seed=seed,
                                 model_set=model_set)
        for name, key in PARAMS:
            y = par[name].numpy()
            mean, sd = res[key]
            rel = (mean - y) / y * 100
            cod_rows.append({"set": st, "snr": snr, "method": method, "parameter": name,
                             "cod": cod(y, mean), "n": len(y), "n_failed": int((~np.isfinite(mean)).sum()),
                             "n_mc": 1 if not math.isfinite(snr) else n_mc})
            fin = rel[np.isfinite(rel)]
            summary_rows.append({"set": st, "snr": snr, "method": method, "parameter": name,
                                 "mean_abs_rel_err_pct": float(np.mean(np.abs(fin))) if fin.size else math.nan,
                                 "median_abs_rel_err_pct": float(np.median(np.abs(fin))) if fin.size else math.nan,
                                 "median_rel_sd_pct": float(np.nanmedian(sd / mean * 100)) if np.isfinite(sd / mean).any() else math.nan})
            if st == "grid" and snr in map_snrs:
                maps_for_plot.setdefault(snr, {}).setdefault(method, {})[name] = rel
                map_rows.append(pd.DataFrame({"snr": snr, "method": method, "parameter": name, "T1_true": par["T1"].numpy(),
                                              "T2_true": par["T2"].numpy(), "mc_mean": mean, "mc_sd": sd, "rel_err_pct": rel}))
    written = [
        _save_tsv(pd.DataFrame(cod_rows), out_dir / "bssfp_cod.tsv"),
        _save_tsv(pd.DataFrame(summary_rows), out_dir / "bssfp_relerr_summary.tsv"),
        _plot_cod(pd.DataFrame(cod_rows), out_dir / "bssfp_cod.png"),
    ]
    if map_rows:
        written.append(_save_tsv(pd.concat(map_rows, ignore_index=True), out_dir / "bssfp_relerr_grid.tsv"))
    for snr, mp in maps_for_plot.items():
        tag = "inf" if not math.isfinite(snr) else f"{snr:g}"
        written.append(_plot_relerr_maps(mp, grid_n, snr, out_dir / f"bssfp_relerr_snr-{tag}.png"))
    theta_frames = []
    for npc in npcs:
        p = BSSFPProtocol.with_default_increments(protocol.tr, protocol.te, protocol.flip_deg, npc)
        for method in theta_methods:
            theta_frames.append(theta_sweep(method, p, n_theta=n_theta, grid_n=theta_grid_n, model_dir=model_dir, seed=seed,
                                 model_set=model_set))
    if theta_frames:
        df = pd.concat(theta_frames, ignore_index=True)
        written.append(_save_tsv(df, out_dir / "bssfp_relerr_theta.tsv"))
        written.append(_plot_theta(df, out_dir / "bssfp_relerr_theta.png"))
    if onthefly_protocol is not None:
        if model_dir is None:
            raise ValueError("the on-the-fly check needs --model-dir (where the trained models are cached)")
        df = onthefly_check(onthefly_protocol, methods=[m for m in methods if m != "miracle"],
                            model_dir=model_dir, seed=seed,
                                 model_set=model_set)
        written.append(_save_tsv(df, out_dir / "bssfp_onthefly.tsv"))
    log.info("wrote %s", ", ".join(p.name for p in written))
    return written
