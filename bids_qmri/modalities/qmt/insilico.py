"""Seed 003's bias / variance analysis of an estimator (§2.7, Eq. 2–5; Figs. 4–8).

``noise_realisations(net, data, snr_max, n_noise)``: estimates ``[n_noise, S, P]`` of every
test sample under ``n_noise`` complex Gaussian noise draws at ``SNR_max = |M0|/σ`` (random M0
phase per draw; the draws are ``noisy_coefficients``', for any other estimator, e.g. ``qmtnls``
in ``scripts/qmt_nls_efficiency.py``). ``decompose(estimates, truth, crb)``: per sample and
parameter the bias (Eq. 2), the standard deviation and ``std/√CRB``, and the CRB-normalised loss
split into its bias part ``(θ̄ − θ)²/CRB`` and its variance part ``Σ(θ̂ − θ̄)²/(N·CRB)`` (Eq. 4;
their sum is the mean loss over the draws exactly, Eq. 5).

Test sets, as seed 003 §2.4: dataset #1 is random draws from the training distributions
(``simulate.simulate_set``; the seed's Figs. 5–8, 9 056 samples there); dataset #2 is regular grids
on 2-D slices through the 8-D parameter space with the other parameters at the training means
(``grid_theta``; the seed's Fig. 4, whose T2f mean |bias| of 5.2 vs 14.1 ms is over the T1 × T2f
slice). The seed shows std/√CRB of dataset #1 as histograms (Fig. 6) and splits the loss by CRB value
(Fig. 8); ``summarise`` gives the median and quartiles over all samples and the median over the
quarter with the lowest CRB of each parameter (where an estimator inside the prior's range can be
efficient: where √CRB exceeds the prior's SD, as for most m0s samples at SNR_max 50 on our schedule,
any such estimator has std ≪ √CRB).
"""

from __future__ import annotations

import itertools
import math

import torch

from . import simulate
from .net import OUTPUTS, features
from .training import OUT_INDEX

__all__ = ["noisy_coefficients", "noise_realisations", "decompose", "grid_theta", "summarise", "crb_at",
           "prior_bound_at", "GRID_SLICES"]

#: seed 003 test dataset #2: slice name -> the two varied parameters and their ranges (SI units). The
#: seed gives no ranges; ours are the prior mean ± 1 SD (m0s 0.04–0.20, T1 0.8–2.4 s) and, for T2f,
#: 20–200 ms (the mean − 1 SD is negative; all points keep T2f ≤ T1).
GRID_SLICES = {"T1_T2f": (("T1", 0.8, 2.4), ("T2f", 0.02, 0.2)),
               "m0s_T1": (("m0s", 0.04, 0.2), ("T1", 0.8, 2.4))}


def noisy_coefficients(data: dict, snr_max: float, n_noise: int = 300, *, seed: int = 0):
    """Yield ``n_noise`` noisy copies ``[S, R]`` (complex128) of the set's coefficients: |M0| =
    SNR_max·σ with a random phase per sample and draw, plus complex Gaussian noise of SD σ per part.
    Every estimator measured with the same ``seed`` sees the same draws."""
    gen = torch.Generator().manual_seed(int(seed))
    c = data["coeffs"].to(torch.complex128)
    s = len(c)
    sigma = simulate.NOISE_SIGMA
    for _ in range(n_noise):
        m0 = torch.polar(torch.full((s,), snr_max * sigma, dtype=torch.float64),
                         2 * math.pi * torch.rand(s, generator=gen, dtype=torch.float64))
        noise = torch.complex(torch.randn(c.shape, generator=gen, dtype=torch.float64),
                              torch.randn(c.shape, generator=gen, dtype=torch.float64))
        yield c * m0[:, None] + sigma * noise


def noise_realisations(net, data: dict, snr_max: float, n_noise: int = 300, *, seed: int = 0) -> torch.Tensor:
    """The net's estimates ``[n_noise, S, P]`` on ``noisy_coefficients``' draws."""
    with torch.no_grad():
        return torch.stack([net(features(y)).double() for y in noisy_coefficients(data, snr_max, n_noise, seed=seed)])


def decompose(estimates: torch.Tensor, truth: torch.Tensor, crb: torch.Tensor,
              prior_bound: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``estimates [N, S, P]``, ``truth [S, P]``, ``crb [S, P]`` -> per-sample ``[S, P]`` tensors;
    with ``prior_bound [S, P]`` (``prior_bound_at``) also ``std_over_sqrt_pib``, std/√B."""
    mean = estimates.mean(0)
    var = ((estimates - mean) ** 2).mean(0)
    bias = mean - truth
    out = {"bias": bias, "std": var.sqrt(), "std_over_sqrt_crb": (var / crb).sqrt(),
           "loss_bias": bias**2 / crb, "loss_variance": var / crb,
           "loss": ((estimates - truth) ** 2 / crb).mean(0)}
    if prior_bound is not None:
        out["std_over_sqrt_pib"] = (var / prior_bound).sqrt()
    return out


def grid_theta(slice_name: str, n: int) -> torch.Tensor:
    """``[n·n, 7]`` parameters (``simulate.PARAMETERS`` order) on the ``n × n`` grid of the slice
    ``GRID_SLICES[slice_name]`` (first parameter slowest); the others at the means of the training
    distributions (``simulate.DISTRIBUTIONS``; B0 = 0, the middle of its uniform range)."""
    theta = torch.tensor([simulate.DISTRIBUTIONS[k][0] if k != "B0" else 0.0 for k in simulate.PARAMETERS],
                         dtype=torch.float64).repeat(n * n, 1)
    (pa, lo_a, hi_a), (pb, lo_b, hi_b) = GRID_SLICES[slice_name]
    a, b = torch.meshgrid(torch.linspace(lo_a, hi_a, n, dtype=torch.float64),
                          torch.linspace(lo_b, hi_b, n, dtype=torch.float64), indexing="ij")
    theta[:, simulate.PARAMETERS.index(pa)] = a.reshape(-1)
    theta[:, simulate.PARAMETERS.index(pb)] = b.reshape(-1)
    return theta


def summarise(o: dict, crb: torch.Tensor, prefix: str = "") -> dict:
    """Per output parameter ``k``: ``mean_abs_bias_k``, ``median_std_over_sqrt_crb_k`` with its
    quartiles (``q25_…``, ``q75_…``), ``median_std_over_sqrt_crb_lowcrb_k`` (over the quarter of the
    samples with the lowest CRB of ``k``) and the loss parts ``loss_bias_k``, ``loss_variance_k``
    (``o``: ``decompose``'s output; ``crb [S, 3]``)."""
    row = {}
    ratio = o["std_over_sqrt_crb"]
    for i, k in enumerate(OUTPUTS):
        r = ratio[:, i]
        low = crb[:, i] <= torch.quantile(crb[:, i], 0.25)
        row[f"{prefix}mean_abs_bias_{k}"] = float(o["bias"][:, i].abs().mean())
        row[f"{prefix}median_std_over_sqrt_crb_{k}"] = float(r.median())
        row[f"{prefix}q25_std_over_sqrt_crb_{k}"] = float(torch.quantile(r, 0.25))
        row[f"{prefix}q75_std_over_sqrt_crb_{k}"] = float(torch.quantile(r, 0.75))
        row[f"{prefix}median_std_over_sqrt_crb_lowcrb_{k}"] = float(r[low].median())
        if "std_over_sqrt_pib" in o:
            rb = o["std_over_sqrt_pib"][:, i]
            row[f"{prefix}median_std_over_sqrt_pib_{k}"] = float(rb.median())
            row[f"{prefix}q25_std_over_sqrt_pib_{k}"] = float(torch.quantile(rb, 0.25))
            row[f"{prefix}q75_std_over_sqrt_pib_{k}"] = float(torch.quantile(rb, 0.75))
        row[f"{prefix}loss_bias_{k}"] = float(o["loss_bias"][:, i].mean())
        row[f"{prefix}loss_variance_{k}"] = float(o["loss_variance"][:, i].mean())
    return row


def crb_at(data: dict, snr_max: float) -> torch.Tensor:
    """CRB ``[S, 3]`` of the network outputs at ``SNR_max`` (|M0| = SNR_max·σ)."""
    return data["crb_unit"][:, OUT_INDEX] / snr_max**2


def prior_bound_at(data: dict, snr_max: float, precision: torch.Tensor) -> torch.Tensor:
    """Prior-informed bound ``[S, 3]`` of the network outputs at ``SNR_max`` (``simulate.prior_informed_bound``
    of the set's ``fisher_unit`` scaled to |M0| = SNR_max·σ: θ rows and columns × SNR_max, M0 ones × 1/σ)."""
    s = torch.tensor([float(snr_max)] * 7 + [1.0 / simulate.NOISE_SIGMA] * 2, dtype=torch.float64)
    return simulate.prior_informed_bound(data["fisher_unit"] * s[:, None] * s[None, :], precision)[:, OUT_INDEX]


def run_qmt_insilico(out_dir, *, n_test: int = 64, n_noise: int = 300, snrs=(10.0, 20.0, 50.0, 100.0, 200.0),
                     seed: int = 0, test_set=None, n_grid: int = 11, models=None) -> list:
    """Seed 003 Figs. 3–8 for the bundled qmtnet / qmtnetmse (the synthetic dataset's schedule):
    ``qmt_insilico.tsv`` (per model and SNR_max, on dataset #1: the loss and its bias / variance
    parts, per parameter ``summarise``'s columns; with ``n_grid`` > 0 the same prefixed
    ``grid_<slice>_`` on each dataset #2 slice; on dataset #1 also the quartiles of std/√B, B the
    prior-informed bound of the training distribution, ``prior_bound_at``), ``n_grid × n_grid`` points), ``qmt_insilico_grid.tsv``
    (per grid point: truth, bias, std/√CRB), ``qmt_insilico_curves.tsv`` (training curves from the
    bundled ``_history.json``) and ``qmt_insilico.png``. ``models``: ``{method: (net, card)}`` to
    evaluate instead of the bundled pair (e.g. candidate weights)."""
    import json
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from bids_qmri.models.registry import get_model
    from bids_qmri.synth.dataset import qmt_basis

    from .protocol import synthetic_protocol

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    basis, sched = qmt_basis()  # the test sets are simulated on this schedule; the protocol keys the nets
    proto, _ = synthetic_protocol()
    data = test_set if test_set is not None else simulate.simulate_set(n_test, sched, basis, seed=seed + 777,
                                                                       with_fisher=True, log=None)
    precision = simulate.prior_precision(sched["tr"]) if "fisher_unit" in data else None
    truth = data["theta"][:, OUT_INDEX]
    grids = {name: simulate.set_from_theta(grid_theta(name, n_grid), sched, basis, log=None)
             for name in GRID_SLICES} if n_grid > 0 else {}
    if models is None:
        models = {m: get_model("qmt", m, proto, model_dir=None, trainer=None, allow_training=False)
                  for m in ("qmtnet", "qmtnetmse")}
    rows, curves, grid_rows = [], [], []
    for method, (net, card) in models.items():
        hist = Path(card["path"]).with_name(Path(card["path"]).stem + "_history.json") if card.get("path") else None
        if hist is not None and hist.is_file():
            curves += [{"model": method, **r} for r in json.loads(hist.read_text())]
        for snr in snrs:
            crb = crb_at(data, snr)
            pib = prior_bound_at(data, snr, precision) if precision is not None else None
            o = decompose(noise_realisations(net, data, snr, n_noise, seed=seed), truth, crb, pib)
            row = {"model": method, "snr_max": snr, "loss": float(o["loss"].mean()),
                   "loss_bias": float(o["loss_bias"].mean()), "loss_variance": float(o["loss_variance"].mean()),
                   **summarise(o, crb)}
            for name, g in grids.items():
                gcrb, gtruth = crb_at(g, snr), g["theta"][:, OUT_INDEX]
                go = decompose(noise_realisations(net, g, snr, n_noise, seed=seed), gtruth, gcrb)
                row[f"grid_{name}_loss"] = float(go["loss"].mean())
                row.update(summarise(go, gcrb, prefix=f"grid_{name}_"))
                for j in range(len(gtruth)):
                    grid_rows.append({"model": method, "snr_max": snr, "slice": name,
                                      **{k: float(gtruth[j, i]) for i, k in enumerate(OUTPUTS)},
                                      **{f"bias_{k}": float(go["bias"][j, i]) for i, k in enumerate(OUTPUTS)},
                                      **{f"std_over_sqrt_crb_{k}": float(go["std_over_sqrt_crb"][j, i])
                                         for i, k in enumerate(OUTPUTS)}})
            rows.append(row)
    table = pd.DataFrame(rows)
    tsv = out_dir / "qmt_insilico.tsv"
    table.to_csv(tsv, sep="\t", index=False, float_format="%.6g")
    paths = [tsv]
    if grid_rows:
        gtsv = out_dir / "qmt_insilico_grid.tsv"
        pd.DataFrame(grid_rows).to_csv(gtsv, sep="\t", index=False, float_format="%.6g")
        paths.append(gtsv)
    if curves:
        ctsv = out_dir / "qmt_insilico_curves.tsv"
        pd.DataFrame(curves).to_csv(ctsv, sep="\t", index=False, float_format="%.6g")
        paths.append(ctsv)
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    for method, style in zip(models, itertools.cycle(("-", "--", ":", "-."))):
        c = [r for r in curves if r["model"] == method]
        if c:
            ax[0].semilogy([r["epoch"] for r in c], [r["val_normalised_crb_loss"] for r in c], style, label=method)
        t = table[table.model == method]
        ax[1].loglog(t.snr_max, t.loss_bias, style, label=f"{method} bias")
        ax[1].loglog(t.snr_max, t.loss_variance, style, label=f"{method} variance")
        t50 = t.iloc[(t.snr_max - 50).abs().argmin()]
        ax[2].bar([f"{k}\n{method}" for k in OUTPUTS], [t50[f"median_std_over_sqrt_crb_{k}"] for k in OUTPUTS])
    ax[0].axhline(1, color="k", lw=0.5)
    ax[0].set(xlabel="epoch", ylabel="validation CRB-normalised loss", title="training (Fig. 3)")
    ax[1].set(xlabel="SNR_max", ylabel="loss part", title="bias / variance (Fig. 7)")
    ax[2].axhline(1, color="k", lw=0.5)
    ax[2].set(ylabel="median std/sqrt(CRB)", title="SNR_max 50 (Fig. 6)")
    ax[2].tick_params(axis="x", labelsize=6)
    for a in ax[:2]:
        a.legend(fontsize=6)
    fig.tight_layout()
    png = out_dir / "qmt_insilico.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return paths + [png]


def add_insilico_command(sub) -> None:
    from pathlib import Path

    p = sub.add_parser("qmt", help="qMT (seed 003): bias, std/sqrt(CRB) (and std/sqrt(B), B the prior-informed "
                                   "bound) and the loss's bias/variance parts vs SNR for the bundled qmtnet and qmtnetmse")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--test-samples", type=int, default=64,
                   help="random test fingerprints (with their CRB), seed 003's dataset #1 (9056 there; ~22 CPU-ms "
                        "per sample at one SNR for both nets, simulated in chunks of 512)")
    p.add_argument("--noise", type=int, default=300, help="noise realisations per sample and SNR (seed 003: 300)")
    p.add_argument("--snr", nargs="+", type=float, default=[10.0, 20.0, 50.0, 100.0, 200.0])
    p.add_argument("--grid", type=int, default=11, metavar="N",
                   help="seed 003 test dataset #2: N x N points on the T1-T2f and m0s-T1 slices (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_run)


def _run(args, parser) -> int:
    from bids_qmri.errors import EXIT_OK, EXIT_USAGE

    bad_grid = args.grid < 0 or args.grid == 1
    if args.noise < 2 or args.test_samples < 1 or bad_grid or any(not s > 0 for s in args.snr):
        parser.exit(EXIT_USAGE, "bids_qmri-insilico: error: --noise >= 2, --test-samples >= 1, --grid 0 or >= 2 "
                                "and positive --snr values are needed\n")
    torch.set_num_threads(1)
    for path in run_qmt_insilico(args.out_dir, n_test=args.test_samples, n_noise=args.noise, snrs=tuple(args.snr),
                                 seed=args.seed, n_grid=args.grid):
        print(path)
    return EXIT_OK
