"""In-silico validation of the relaxometry estimators (seed 004 Fig. 2, 3 and 9):
``bids_qmri-insilico rim``.

What seed 004 measures, and how this module follows it:

- Test image (§5.1.1: "a 2D slice of a virtual brain model ... matrix size 256×256", parameters
  "generated with the process described in Section 4.2"): the axial slice of the digital brain
  with the most brain voxels, at 1.5 mm; its central ``size``×``size`` pixels (the whole slice
  when ``size`` covers it). Table 1 values drawn once per tissue, uniform within the tissue, with
  the training's voxel variation (``simulate``), B = 1.9 (a typical draw of 2 − half-normal(0.2)).
- Noise (§4.2, eq. 1): σ = ``A_REFERENCE``/SNR in Table 1 units (proton-density units with CSF
  = 1; the seed's σ = 0.0065 is its SNR 100: 0.65/σ, white matter's A), the same σ for every
  series point, so SNR is relative to A, not to the series' maximum. ``noise="rician"``
  (default; the networks are trained on Rician magnitudes, as real magnitude images are) takes
  the magnitude of complex Gaussian noise; ``noise="gaussian"`` adds real Gaussian noise to the
  magnitude model, as seed 004's eq. 1 does.
- Statistics (eqs. 7–8, Fig. 2): per voxel over ``n_mc`` realisations (seed: 100), relative
  bias mean/truth − 1 and CV SD/mean; tables give their median and quartiles over the brain
  mask's voxels (all tissues, edges included, as the seed's boxplots "over all pixels in the
  brain mask").
- Blur test (§5.1.2, Fig. 3; SNR 10, 100 realisations): a hypo-intense point (T1 = 400 ms) in
  grey matter, a hyper-intense point, a horizontal and a vertical hyper-intense line (T1 =
  1200 ms) in white matter; per-voxel bias and CV, median over the structure and over its
  8-neighbourhood, with the structures (E2) and without (E1). The seed's target: the RIM's worst
  structure, the hypo point, at 3.43 % (E1 0.68 %). The seed gives no line length (Fig. 3b
  only): 7 voxels here. T2 has no blur test in the seed; the T2 structures keep its ratios to
  the host tissue (hypo 30 ms in GM ≈ 400/1400, hyper 120 ms in WM ≈ 1200/780).

Estimators: the RIM and the ResNet through ``estimate.infer_volume`` (the code a run uses;
realisations are the slices), the MLE through ``mle.fit_inversion_recovery`` / ``fit_t2_decay``
(Gaussian likelihood, as seed 004's). Seed 004's T1 MLE regularises B with a Laplacian (§4.4.1,
λ_B = 500 in its own scaling): ``mle_lambda_b`` > 0 fits each realisation's image with
``mle.fit_inversion_recovery_volume`` at that λ_B (0: voxel-wise, faster).

1. ``relax_bias_cv.tsv`` (+ PNG): Fig. 2, bias and CV vs SNR for A, B, T1 (IR) and A, T2 (T2).
2. ``relax_blur.tsv``: Fig. 3, the four structures, regions structure / neighbourhood, E1 / E2,
   with ``rel_bias_se`` (a point's bias is one pixel's mean over the realisations: at the RIM's
   ≈ 11 % CV there, 100 realisations give a standard error of ≈ 1.1 %, too coarse for seed 004's
   3.43 %; the CLI's ``--blur-mc`` default, 1600, gives ≈ 0.3 %; the MLE keeps ``--mc``).
3. ``relax_ti_lists.tsv``: Fig. 9, the RIM of one TI list applied to other TI lists (seed 004's
   23 and 31 TIs) beside the MLE, at one SNR.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import rim
from .estimate import infer_volume
from .inputs import SeriesProtocol
from .simulate import A_REFERENCE, PHANTOM_TISSUES, anatomy, tissue_maps

__all__ = ["DEFAULT_SNRS", "NOISE_MODELS", "SEED_TI_LISTS", "STRUCTURES", "blur_test", "monte_carlo",
           "run_relax_insilico", "test_image"]

log = logging.getLogger("bids_qmri.modalities.relax.insilico")

DEFAULT_SNRS = (3, 5, 10, 30, 60, 100)
#: seed 004 Table 2 inversion times (s)
SEED_TI_LISTS = {
    "seed23": tuple(t / 1000 for t in (172, 204, 237, 270, 303, 335, 368, 401, 434, 467, 499, 532, 565, 598, 630, 663,
                                       696, 729, 761, 794, 827, 860, 893)),
    "seed31": tuple(t / 1000 for t in (139, 166, 193, 219, 246, 272, 299, 325, 352, 379, 405, 432, 458, 485, 511, 538,
                                       565, 591, 618, 644, 671, 697, 724, 751, 777, 804, 838, 857, 883, 915, 937)),
}
NOISE_MODELS = ("rician", "gaussian")
#: seed 004 §5.1.2: structure -> (host tissue, pixel offsets, value per relaxation time in s);
#: T2 values are our analogues (same ratio to the host tissue's Table 1 mean as the T1 ones)
LINE = range(-3, 4)
STRUCTURES = {
    "point_hypo": ("GM", [(0, 0)], {"T1": 0.4, "T2": 0.03}),
    "point_hyper": ("WM", [(0, 0)], {"T1": 1.2, "T2": 0.12}),
    "line_horz": ("WM", [(0, d) for d in LINE], {"T1": 1.2, "T2": 0.12}),
    "line_vert": ("WM", [(d, 0) for d in LINE], {"T1": 1.2, "T2": 0.12}),
}
#: B of the test image: a typical draw of training's 2 − half-normal(0.2)
TEST_B = 1.9


def test_image(kind: str, size: int | None, seed: int, resolution_mm: float = 1.5) -> dict:
    """Noise-free truth of seed 004 §5.1.1: ``{"params": [Q, H, W] physical (A in Table 1 units),
    "brain": [H, W] bool, "fractions": {tissue: [H, W]}}`` on the central ``size``×``size`` pixels
    (whole slice if ``None`` or larger) of the axial slice with the most brain voxels."""
    anat = anatomy(resolution_mm)
    z = int(anat.brain.sum((0, 1)).argmax())
    frac, brain = anat.fractions[..., z].astype(np.float64), anat.brain[..., z]
    if size is not None:
        centre = np.argwhere(brain).mean(0).round().astype(int)
        window = []
        for c, n in zip(centre, brain.shape):
            lo = int(np.clip(c - size // 2, 0, max(n - size, 0)))
            window.append(slice(lo, lo + size))
        frac, brain = frac[:, window[0], window[1]], brain[window[0], window[1]]
    maps = tissue_maps(frac, np.random.default_rng([seed, 2004]))
    names = rim.PARAMETERS[kind]
    values = {"A": maps["A"], "B": np.full_like(maps["A"], TEST_B), "T1": maps["T1"], "T2": maps["T2"]}
    params = torch.as_tensor(np.stack([values[n] for n in names]), dtype=torch.float64)
    return {"params": params, "brain": torch.as_tensor(brain & (maps["A"] > 0.05)),
            "fractions": dict(zip(PHANTOM_TISSUES, frac))}


def _signal(params: torch.Tensor, times, kind: str) -> torch.Tensor:
    """Noise-free magnitudes ``[N, H, W]`` of physical ``params`` ``[Q, H, W]``."""
    return rim.signal_model(rim.to_network(params, kind)[None], torch.as_tensor(times, dtype=params.dtype), kind)[0]


def _noisy(clean: torch.Tensor, sigma: float, n: int, gen: torch.Generator, noise: str = "rician") -> torch.Tensor:
    """``n`` realisations ``[n, N, H, W]``: Rician magnitudes, or the magnitude model plus real
    Gaussian noise (seed 004 eq. 1)."""
    if noise not in NOISE_MODELS:
        raise ValueError(f"unknown noise model {noise!r}; use one of {', '.join(NOISE_MODELS)}")
    shape = (n, *clean.shape)
    re = clean[None] + sigma * torch.randn(shape, generator=gen, dtype=clean.dtype)
    if noise == "gaussian":
        return re
    im = sigma * torch.randn(shape, generator=gen, dtype=clean.dtype)
    return torch.hypot(re, im)


def _estimate(method: str, net, noisy: torch.Tensor, brain: np.ndarray, times, kind: str,
              mle_lambda_b: float = 0.0) -> np.ndarray:
    """Estimates ``[n, Q, H, W]`` (NaN where none) of every realisation."""
    n = noisy.shape[0]
    names = rim.PARAMETERS[kind]
    if method == "mle" and kind == "ir" and mle_lambda_b > 0:
        from .mle import fit_inversion_recovery_volume

        # seed 004's MLE: B regularised by a Laplacian, one realisation (image) at a time so
        # that the Laplacian never couples realisations
        out = np.full((n, len(names), *brain.shape), np.nan)
        for i in range(n):
            fit = fit_inversion_recovery_volume(noisy[i].permute(1, 2, 0)[:, :, None, :].numpy(), brain[:, :, None],
                                                np.asarray(times), lambda_b=mle_lambda_b)
            for q, name in enumerate(names):
                out[i, q] = fit[name][..., 0]
        return out
    if method == "mle":
        from .mle import fit_inversion_recovery, fit_t2_decay

        rows = noisy.permute(0, 2, 3, 1)[:, torch.as_tensor(brain)].reshape(-1, noisy.shape[1]).numpy()
        fit = (fit_inversion_recovery if kind == "ir" else fit_t2_decay)(rows, np.asarray(times))
        out = np.full((n, len(names), *brain.shape), np.nan)
        for q, name in enumerate(names):
            out[:, q][:, brain] = fit[name].reshape(n, -1)
        return out
    volume = noisy.permute(2, 3, 0, 1).float().numpy()  # [H, W, n, N]: realisations as slices
    mask = np.repeat(brain[:, :, None], n, axis=2)
    maps, _ = infer_volume(net, volume, mask, times, kind, slices_per_batch=8)
    return np.stack([np.moveaxis(maps[name], 2, 0) for name in names], 1).astype(np.float64)


def _voxel_stats(est: np.ndarray, truth: np.ndarray, where: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Relative bias and CV per voxel of ``where`` for every parameter -> ``[Q, V]`` each."""
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # voxels the MLE never fitted stay NaN
        mean = np.nanmean(est, 0)
        sd = np.nanstd(est, 0)
    return (mean / truth - 1)[:, where], (sd / np.abs(mean))[:, where]


def _summary(values: np.ndarray) -> dict:
    v = values[np.isfinite(values)]
    if not v.size:
        return {"median": math.nan, "q25": math.nan, "q75": math.nan}
    q25, med, q75 = np.percentile(v, [25, 50, 75])
    return {"median": float(med), "q25": float(q25), "q75": float(q75)}


def monte_carlo(kind: str, times, nets: dict, *, snrs=DEFAULT_SNRS, n_mc: int = 100, size: int | None = 64,
                seed: int = 0, image: dict | None = None, noise: str = "rician",
                mle_lambda_b: float = 0.0, on_step: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Fig. 2 rows: method, snr, parameter, bias and CV (median, quartiles over brain voxels).
    ``on_step(label)`` is called after each method's estimates at each SNR (progress)."""
    image = image or test_image(kind, size, seed)
    params, brain = image["params"], image["brain"].numpy()
    clean = _signal(params, times, kind)
    truth = params.numpy()
    rows = []
    for snr in snrs:
        gen = torch.Generator().manual_seed(seed * 1000 + int(snr))
        noisy = _noisy(clean, A_REFERENCE / snr, n_mc, gen, noise)
        for method, net in nets.items():
            est = _estimate(method, net, noisy, brain, times, kind, mle_lambda_b)
            if on_step is not None:
                on_step(f"{kind} {len(times)} times, SNR {snr:g}: {method}")
            bias, cv = _voxel_stats(est, truth, brain)
            failed = float(np.isnan(est[:, -1][:, brain]).mean())
            for q, name in enumerate(rim.PARAMETERS[kind]):
                b, c = _summary(bias[q]), _summary(cv[q])
                rows.append({"model": kind, "method": method, "snr": snr, "parameter": name,
                             "rel_bias_median": b["median"], "rel_bias_q25": b["q25"], "rel_bias_q75": b["q75"],
                             "cv_median": c["median"], "cv_q25": c["q25"], "cv_q75": c["q75"],
                             "failed_fraction": failed, "n_mc": n_mc, "voxels": int(brain.sum()), "noise": noise,
                             "mle_lambda_b": mle_lambda_b})
    return pd.DataFrame(rows)


def _structures(image: dict) -> dict[str, np.ndarray]:
    """Masks of the ``STRUCTURES``, each where its footprint and the 8-neighbourhood around it are
    most purely its host tissue (nearest the centre among equals), inside the brain, ≥ 5 pixels
    from the border and ≥ 10 pixels from the structures placed before it."""
    from scipy import ndimage

    brain = image["brain"].numpy()
    h, w = brain.shape
    out, placed = {}, []
    for name, (tissue, offsets, _) in STRUCTURES.items():
        footprint = np.zeros((9, 9), bool)
        for dr, dc in offsets:
            footprint[4 + dr, 4 + dc] = True
        footprint = ndimage.binary_dilation(footprint, np.ones((3, 3), bool))
        # the worst host fraction over the structure and its neighbourhood, per centre
        purity = ndimage.minimum_filter(np.where(brain, image["fractions"][tissue], 0.0), footprint=footprint,
                                        mode="constant")
        purity[:5], purity[-5:], purity[:, :5], purity[:, -5:] = -1, -1, -1, -1
        for r, c in placed:
            purity[max(r - 9, 0):r + 10, max(c - 9, 0):c + 10] = -1
        # among the purest centres, the one nearest the image centre (away from the zero padding)
        rows, cols = np.nonzero(purity >= purity.max() - 1e-6)
        best = int(np.argmin((rows - h / 2) ** 2 + (cols - w / 2) ** 2))
        r, c = int(rows[best]), int(cols[best])
        placed.append((r, c))
        m = np.zeros((h, w), bool)
        for dr, dc in offsets:
            m[r + dr, c + dc] = True
        out[name] = m
    return out


def blur_test(kind: str, times, nets: dict, *, snr: float = 10, n_mc: int = 100, size: int | None = 64,
              seed: int = 0, noise: str = "rician", mle_lambda_b: float = 0.0,
              mle_n_mc: int | None = None, on_step: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Fig. 3 rows: structure, region (structure / neighbourhood), scenario E1/E2, method; per-voxel
    relative bias and CV over the realisations, their median (seed 004) and mean over the region.

    ``n_mc`` realisations for the learned methods; the MLE (slow) fits the first ``mle_n_mc`` of
    them (default all). ``rel_bias_se``: the standard error of a voxel's relative bias,
    SD/(√n_mc·truth) over the realisations, median over the region's voxels; for the 1-voxel points
    it is exactly the standard error of ``rel_bias_median`` (seed 004's hypo point: one pixel's mean
    over the realisations, ≈ CV/√n_mc). ``on_step(label)`` is called after each method's estimates
    of each scenario (progress)."""
    from scipy import ndimage

    image = test_image(kind, size, seed)
    params, brain = image["params"], image["brain"].numpy()
    structs = _structures(image)
    e2 = params.clone()
    tname = rim.PARAMETERS[kind][-1]
    for name, m in structs.items():
        e2[-1][torch.as_tensor(m)] = STRUCTURES[name][2][tname]
    rows = []
    for scenario, p in (("E1", params), ("E2", e2)):
        gen = torch.Generator().manual_seed(seed * 1000 + 77)
        noisy = _noisy(_signal(p, times, kind), A_REFERENCE / snr, n_mc, gen, noise)
        for method, net in nets.items():
            n = min(n_mc, mle_n_mc or n_mc) if method == "mle" else n_mc
            est = _estimate(method, net, noisy[:n], brain, times, kind, mle_lambda_b)
            if on_step is not None:
                on_step(f"{kind} blur test {scenario}: {method}")
            for name, m in structs.items():
                ring = ndimage.binary_dilation(m, np.ones((3, 3), bool)) & ~m & brain
                for region, where in (("structure", m), ("neighbourhood", ring)):
                    bias, cv = _voxel_stats(est, p.numpy(), where)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)  # voxels the MLE never fitted
                        se = (np.nanstd(est[:, -1], 0, ddof=1) / np.sqrt(np.isfinite(est[:, -1]).sum(0))
                              / p[-1].numpy())[where]
                    rows.append({"model": kind, "method": method, "snr": snr, "scenario": scenario, "structure": name,
                                 "host": STRUCTURES[name][0], "region": region, "parameter": tname,
                                 "voxels": int(where.sum()),
                                 "rel_bias_median": float(np.nanmedian(bias[-1])),
                                 "rel_bias_mean": float(np.nanmean(bias[-1])),
                                 "rel_bias_se": float(np.nanmedian(se)),
                                 "cv_median": float(np.nanmedian(cv[-1])), "cv_mean": float(np.nanmean(cv[-1])),
                                 "n_mc": n, "noise": noise, "mle_lambda_b": mle_lambda_b})
    return pd.DataFrame(rows)


def ti_lists(net, model_times, *, snr: float = 10, n_mc: int = 50, size: int | None = 64, seed: int = 0,
             noise: str = "rician", mle_lambda_b: float = 0.0,
             on_step: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Fig. 9 rows: the RIM trained for ``model_times`` on other TI lists, beside the MLE."""
    lists = {"model": tuple(model_times), **SEED_TI_LISTS}
    image = test_image("ir", size, seed)
    rows = []
    for label, times in lists.items():
        df = monte_carlo("ir", times, {"rim": net, "mle": None}, snrs=(snr,), n_mc=n_mc, seed=seed, image=image,
                         noise=noise, mle_lambda_b=mle_lambda_b, on_step=on_step)
        df = df[df["parameter"] == "T1"].assign(ti_list=label, n_times=len(times))
        rows.append(df)
    return pd.concat(rows, ignore_index=True)


def _plot_bias_cv(df: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bids_qmri.modalities.bssfp.insilico import _save_fig

    groups = list(dict.fromkeys(zip(df["model"], df["parameter"])))
    fig, axes = plt.subplots(2, len(groups), figsize=(3.2 * len(groups), 6), squeeze=False)
    for j, (model, par) in enumerate(groups):
        d = df[(df["model"] == model) & (df["parameter"] == par)]
        for method, dm in d.groupby("method", sort=False):
            for i, key in enumerate(("rel_bias", "cv")):
                ax = axes[i, j]
                ax.errorbar(dm["snr"], 100 * dm[f"{key}_median"],
                            yerr=[100 * (dm[f"{key}_median"] - dm[f"{key}_q25"]),
                                  100 * (dm[f"{key}_q75"] - dm[f"{key}_median"])], marker="o", capsize=3,
                            label=method)
                ax.set_xscale("log")
                ax.set_xlabel("SNR")
                ax.set_ylabel(("relative bias" if key == "rel_bias" else "CV") + " (%)")
                ax.set_title(f"{model}: {par}")
                ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return _save_fig(fig, path)


def run_relax_insilico(out_dir, *, models: dict, methods=("rim", "resnet", "mle"), snrs=DEFAULT_SNRS, n_mc: int = 100,
                       size: int | None = 64, blur_snr: float = 10, lists_snr: float = 10, model_dir=None,
                       seed: int = 0, allow_training: bool = True, noise: str = "rician",
                       mle_lambda_b: float = 0.0, blur_n_mc: int | None = None,
                       progress: bool | None = None) -> list[Path]:
    """``models``: ``{"ir": times, "t2": times}`` (seconds) — the series to test; the networks come
    from the model registry (bundled, ``model_dir`` or trained on the fly). ``blur_n_mc``: the blur
    test's realisations for the learned methods (default ``n_mc``); the MLE keeps ``n_mc`` there.
    ``progress``: a bar over the estimation steps (``None``: on a terminal only); every step is also
    logged at INFO with its time (``-v``), since the defaults take tens of CPU minutes."""
    from tqdm.auto import tqdm

    from bids_qmri.modalities.bssfp.insilico import _save_tsv

    from .models import get_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_lists = 1 + len(SEED_TI_LISTS)
    total = sum(len(snrs) * len(methods) + 2 * len(methods) + (2 * n_lists if kind == "ir" and "rim" in methods else 0)
                for kind in models)
    done, last = 0, time.perf_counter()  # our own count: a disabled bar does not count

    def on_step(label: str) -> None:
        nonlocal done, last
        now, done = time.perf_counter(), done + 1
        bar.update(1)
        bar.set_postfix_str(label, refresh=False)
        log.info("step %d/%d (%.0f s): %s", done, total, now - last, label)
        last = now

    mc, blur, lists = [], [], []
    with tqdm(total=total, desc="IRT1/MESE in silico", unit="step",
              disable=None if progress is None else not progress) as bar:
        for kind, times in models.items():
            protocol = SeriesProtocol("InversionTime" if kind == "ir" else "EchoTime", tuple(float(t) for t in times))
            nets = {}
            for method in methods:
                if method == "mle":
                    nets[method] = None
                else:
                    nets[method], card = get_model(method, protocol, model_dir=model_dir, seed=seed,
                                                   allow_training=allow_training)
                    log.info("%s %s: %s", kind, method, card.get("path"))
            opts = {"size": size, "seed": seed, "noise": noise, "mle_lambda_b": mle_lambda_b, "on_step": on_step}
            mc.append(monte_carlo(kind, protocol.times, nets, snrs=snrs, n_mc=n_mc, **opts))
            blur.append(blur_test(kind, protocol.times, nets, snr=blur_snr, n_mc=blur_n_mc or n_mc, mle_n_mc=n_mc,
                                  **opts))
            if kind == "ir" and "rim" in nets:
                lists.append(ti_lists(nets["rim"], protocol.times, snr=lists_snr, n_mc=max(2, n_mc // 2), **opts))
    mc_df = pd.concat(mc, ignore_index=True)
    written = [_save_tsv(mc_df, out_dir / "relax_bias_cv.tsv"), _plot_bias_cv(mc_df, out_dir / "relax_bias_cv.png"),
               _save_tsv(pd.concat(blur, ignore_index=True), out_dir / "relax_blur.tsv")]
    if lists:
        written.append(_save_tsv(pd.concat(lists, ignore_index=True), out_dir / "relax_ti_lists.tsv"))
    return written
