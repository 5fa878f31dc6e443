"""Seed 003's bias / variance analysis of an estimator (§2.7, Eq. 2–5; Figs. 4–8).

``noise_realisations(net, data, snr_max, n_noise)``: estimates ``[n_noise, S, P]`` of every
test sample under ``n_noise`` complex Gaussian noise draws at ``SNR_max = |M0|/σ`` (random M0
phase per draw). ``decompose(estimates, truth, crb)``: per sample and parameter the bias (Eq. 2),
the standard deviation and ``std/√CRB``, and the CRB-normalised loss split into its bias part
``(θ̄ − θ)²/CRB`` and its variance part ``Σ(θ̂ − θ̄)²/(N·CRB)`` (Eq. 4; their sum is the mean
loss over the draws exactly, Eq. 5).
"""

from __future__ import annotations

import math

import torch

from . import simulate
from .net import features
from .training import OUT_INDEX

__all__ = ["noise_realisations", "decompose"]


def noise_realisations(net, data: dict, snr_max: float, n_noise: int = 300, *, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(int(seed))
    c = data["coeffs"].to(torch.complex128)
    s = len(c)
    out = []
    sigma = simulate.NOISE_SIGMA
    with torch.no_grad():
        for _ in range(n_noise):
            m0 = torch.polar(torch.full((s,), snr_max * sigma, dtype=torch.float64),
                             2 * math.pi * torch.rand(s, generator=gen, dtype=torch.float64))
            noise = torch.complex(torch.randn(c.shape, generator=gen, dtype=torch.float64),
                                  torch.randn(c.shape, generator=gen, dtype=torch.float64))
            out.append(net(features(c * m0[:, None] + sigma * noise)).double())
    return torch.stack(out)


def decompose(estimates: torch.Tensor, truth: torch.Tensor, crb: torch.Tensor) -> dict[str, torch.Tensor]:
    """``estimates [N, S, P]``, ``truth [S, P]``, ``crb [S, P]`` -> per-sample ``[S, P]`` tensors."""
    mean = estimates.mean(0)
    var = ((estimates - mean) ** 2).mean(0)
    bias = mean - truth
    return {"bias": bias, "std": var.sqrt(), "std_over_sqrt_crb": (var / crb).sqrt(),
            "loss_bias": bias**2 / crb, "loss_variance": var / crb,
            "loss": ((estimates - truth) ** 2 / crb).mean(0)}


def crb_at(data: dict, snr_max: float) -> torch.Tensor:
    """CRB ``[S, 3]`` of the network outputs at ``SNR_max`` (|M0| = SNR_max·σ)."""
    return data["crb_unit"][:, OUT_INDEX] / snr_max**2


def run_qmt_insilico(out_dir, *, n_test: int = 64, n_noise: int = 300, snrs=(10.0, 20.0, 50.0, 100.0, 200.0),
                     seed: int = 0, test_set=None) -> list:
    """Seed 003 Figs. 3, 5–8 for the bundled qmtnet / qmtnetmse (the synthetic dataset's schedule):
    ``qmt_insilico.tsv`` (per model and SNR_max: the loss and its bias / variance parts, per
    parameter mean |bias| and median std/√CRB), ``qmt_insilico_curves.tsv`` (training curves from
    the bundled ``_history.json``) and ``qmt_insilico.png``."""
    import json
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from bids_qmri.models.registry import get_model
    from bids_qmri.synth.dataset import _degrees, qmt_basis

    from .net import OUTPUTS
    from .protocol import QMTProtocol

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    basis, sched = qmt_basis()
    meta = {"FlipAngle": _degrees(sched["flip_rad"]),
            "RFPulseDuration": [round(float(t), 10) for t in sched["pulse_dur"]],
            "RepetitionTimeExcitation": sched["tr"], "InversionPulseDuration": sched["inversion_dur"]}
    proto = QMTProtocol.from_dict(meta, basis=basis)
    data = test_set if test_set is not None else simulate.simulate_set(n_test, sched, basis, seed=seed + 777, log=None)
    truth = data["theta"][:, OUT_INDEX]
    rows, curves = [], []
    for method in ("qmtnet", "qmtnetmse"):
        net, card = get_model("qmt", method, proto, model_dir=None, trainer=None, allow_training=False)
        hist = Path(card["path"]).with_name(Path(card["path"]).stem + "_history.json")
        if hist.is_file():
            curves += [{"model": method, **r} for r in json.loads(hist.read_text())]
        for snr in snrs:
            o = decompose(noise_realisations(net, data, snr, n_noise, seed=seed), truth, crb_at(data, snr))
            row = {"model": method, "snr_max": snr, "loss": float(o["loss"].mean()),
                   "loss_bias": float(o["loss_bias"].mean()), "loss_variance": float(o["loss_variance"].mean())}
            for i, k in enumerate(OUTPUTS):
                row[f"mean_abs_bias_{k}"] = float(o["bias"][:, i].abs().mean())
                row[f"median_std_over_sqrt_crb_{k}"] = float(o["std_over_sqrt_crb"][:, i].median())
                row[f"loss_bias_{k}"] = float(o["loss_bias"][:, i].mean())
                row[f"loss_variance_{k}"] = float(o["loss_variance"][:, i].mean())
            rows.append(row)
    table = pd.DataFrame(rows)
    tsv = out_dir / "qmt_insilico.tsv"
    table.to_csv(tsv, sep="\t", index=False, float_format="%.6g")
    paths = [tsv]
    if curves:
        ctsv = out_dir / "qmt_insilico_curves.tsv"
        pd.DataFrame(curves).to_csv(ctsv, sep="\t", index=False, float_format="%.6g")
        paths.append(ctsv)
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    for method, style in (("qmtnet", "-"), ("qmtnetmse", "--")):
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

    p = sub.add_parser("qmt", help="qMT (seed 003): bias, std/sqrt(CRB) and the loss's bias/variance parts vs "
                                   "SNR for the bundled qmtnet and qmtnetmse")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--test-samples", type=int, default=64, help="random test fingerprints (with their CRB)")
    p.add_argument("--noise", type=int, default=300, help="noise realisations per sample and SNR (seed 003: 300)")
    p.add_argument("--snr", nargs="+", type=float, default=[10.0, 20.0, 50.0, 100.0, 200.0])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_run)


def _run(args, parser) -> int:
    from bids_qmri.errors import EXIT_OK, EXIT_USAGE

    if args.noise < 2 or args.test_samples < 1 or any(not s > 0 for s in args.snr):
        parser.exit(EXIT_USAGE, "bids_qmri-insilico: error: --noise >= 2, --test-samples >= 1 and positive --snr "
                                "values are needed\n")
    torch.set_num_threads(1)
    for path in run_qmt_insilico(args.out_dir, n_test=args.test_samples, n_noise=args.noise, snrs=tuple(args.snr),
                                 seed=args.seed):
        print(path)
    return EXIT_OK
