"""pc-bSSFP's parts of the command lines: ``bids_qmri-train`` (the protocol and the network
settings) and ``bids_qmri-insilico bssfp`` (seed 000 Fig. 2–3, seed 001 Fig. 5)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from bids_qmri.errors import EXIT_OK, EXIT_USAGE


# ------------------------------------------------------------------------ bids_qmri-train
def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from .training import DEFAULT_DISTRIBUTION, DISTRIBUTIONS, PINN_FEATURE_SCALES, TARGET_SCALES, TrainConfig

    d = TrainConfig()
    g = parser.add_argument_group("pc-bSSFP protocol (--sidecar, or these values)")
    g.add_argument("--tr", type=float, help="RepetitionTimeExcitation in seconds")
    g.add_argument("--te", type=float, help="EchoTime in seconds")
    g.add_argument("--flip-angle", type=float, help="nominal flip angle in degrees")
    g.add_argument("--npc", type=int, help="number of phase cycles with default increments π(2j−1)/Npc")
    g.add_argument("--phase-increments", type=float, nargs="+", metavar="DEG",
                   help="explicit phase increments in degrees (instead of --npc)")
    t = parser.add_argument_group("pc-bSSFP networks (svnn, pinn, svnncomplex, pinncomplex)")
    t.add_argument("--distribution", default=DEFAULT_DISTRIBUTION, choices=sorted(DISTRIBUTIONS),
                   help="T1/T2/B1 training distribution: brain (the default models': T1 0.25–5 s, T2 15 ms–2.5 s, "
                        "B1 0.6–1.4, half log-uniform, half uniform over the seed's tissue range) or uniform "
                        "(the seed models': T1 0.36–2.08 s, T2 20–120 ms)")
    t.add_argument("--targets", default=d.targets, choices=list(TARGET_SCALES),
                   help="T1/T2 outputs scaled linearly or logarithmically over their range (auto: log for the "
                        "brain and loguniform distributions)")
    t.add_argument("--theta-margin", type=float, default=d.theta_margin,
                   help="complex nets: fraction of π left out of training at both ends of θ ∈ (−π, π)")
    t.add_argument("--pinn-feature-scale", default=d.pinn_feature_scale, choices=list(PINN_FEATURE_SCALES),
                   help="PINN loss in raw feature units (none, the seeds') or in the network's standardised "
                        "input units (input_std; better conditioned for the complex nets, where ΔB0 dominates)")
    t.add_argument("--snr-range", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="per-sample training noise instead of --snr: SNR log-uniform over [LO, HI] (seed "
                        "definition), redrawn every batch")
    t.add_argument("--noise-free-fraction", type=float, default=d.noise_free_fraction,
                   help="with --snr-range: share of every batch left noise-free (keeps the noise-free accuracy)")
    t.add_argument("--noise-input", action="store_true",
                   help="noise-conditioned net: the noise level eta = sigma_F/||F|| is one more input (needs "
                        "--snr-range or --snr; from a net without it, --init-from starts eta's weights at zero)")


def _protocol(args, parser):
    from bids_qmri.physics.bssfp import BSSFPProtocol

    try:
        if args.sidecar is not None:
            try:
                meta = json.loads(args.sidecar.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                parser.exit(EXIT_USAGE, f"bids_qmri-train: error: {args.sidecar}: cannot read the sidecar ({exc}) "
                                        "— give a valid JSON file\n")
            if args.phase_increments:
                meta["PhaseIncrements"] = args.phase_increments
            return BSSFPProtocol.from_sidecar(meta, npc=args.npc)
        if None in (args.tr, args.te, args.flip_angle) or not (args.npc or args.phase_increments):
            parser.exit(EXIT_USAGE, "bids_qmri-train: error: give --sidecar, or --tr, --te, --flip-angle and --npc "
                                    "(or --phase-increments)\n")
        if args.phase_increments:
            return BSSFPProtocol(args.tr, args.te, args.flip_angle, tuple(args.phase_increments))
        return BSSFPProtocol.with_default_increments(args.tr, args.te, args.flip_angle, args.npc)
    except ValueError as exc:
        parser.exit(EXIT_USAGE, f"bids_qmri-train: error: {exc}\n")


def train_from_args(args, parser):
    """``(protocol, net, card)`` for the shared ``bids_qmri-train`` (which saves them)."""
    from .training import TrainConfig, train_bssfp_net

    protocol = _protocol(args, parser)
    given = {"n_samples": args.samples, "max_epochs": args.epochs, "patience": args.patience,
             "batch_size": args.batch_size, "lr": args.lr, "lr_schedule": args.lr_schedule, "keep": args.keep,
             "snr": args.snr}
    try:
        cfg = TrainConfig(
            method=args.method, distribution=args.distribution, theta_margin=args.theta_margin,
            init_from=str(args.init_from) if args.init_from else None,
            pinn_feature_scale=args.pinn_feature_scale, targets=args.targets, seed=args.seed, threads=args.threads, device=args.device,
            snr_range=tuple(args.snr_range) if args.snr_range else None, noise_free_fraction=args.noise_free_fraction, noise_input=args.noise_input,
            **{k: v for k, v in given.items() if v is not None},
        )
    except ValueError as exc:
        parser.exit(EXIT_USAGE, f"bids_qmri-train: error: {exc}\n")
    net, card = train_bssfp_net(protocol, cfg)
    return protocol, net, card


# ---------------------------------------------------------------------- bids_qmri-insilico
def _snr(text: str) -> float:
    if text.lower() in ("inf", "infinity", "none"):
        return math.inf
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"SNR must be positive or 'inf', got {text}")
    return value


def add_insilico_command(sub) -> None:
    from .estimate import BSSFP_METHODS

    p = sub.add_parser(
        "bssfp",
        help="pc-bSSFP: Monte Carlo CoD/relative error vs SNR, relative error vs off-resonance",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("out_dir", type=Path)
    p.add_argument("--methods", nargs="+", default=list(BSSFP_METHODS), choices=BSSFP_METHODS)
    p.add_argument("--snr", nargs="+", type=_snr, default=[math.inf, 50, 40, 30, 25, 20, 15, 10],
                   help="test SNRs (seed definition; 'inf' = noise-free)")
    p.add_argument("--mc", type=int, default=5000, help="Monte Carlo noise draws per SNR")
    p.add_argument("--grid", type=int, default=200, help="linear T1×T2 grid size per axis")
    p.add_argument("--invivo", type=int, default=40000, help="size of the in-vivo-like test set")
    p.add_argument("--npc", nargs="+", type=int, default=[12, 6, 4], help="phase cycles for the θ sweep")
    p.add_argument("--theta-methods", nargs="+", default=list(BSSFP_METHODS), choices=BSSFP_METHODS)
    p.add_argument("--theta-points", type=int, default=61)
    p.add_argument("--theta-grid", type=int, default=20, help="T1×T2 grid size per axis in the θ sweep")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="cache for models trained on the fly (only needed off the bundled protocol)")
    p.add_argument("--onthefly", nargs=4, type=float, metavar=("TR", "TE", "FA", "NPC"), default=None,
                   help="also train models on the fly for this protocol (s, s, deg, cycles) and report "
                        "their noise-free CoD (needs --model-dir)")
    p.add_argument("--models", default="seed", choices=("seed", "default"),
                   help="bundled network set: seed (the seed papers' training range, which reproduces their "
                        "figures) or default (brain tissue with CSF partial volume; --bssfp-models)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_run_insilico)


def _run_insilico(args, parser) -> int:
    if args.mc < 1 or args.grid < 2 or args.invivo < 2 or args.theta_points < 1 or args.theta_grid < 2:
        parser.exit(EXIT_USAGE, "bids_qmri-insilico: error: --mc, --grid, --invivo, --theta-points and "
                                "--theta-grid must be positive (grids at least 2)\n")
    import torch

    from bids_qmri.physics.bssfp import BSSFPProtocol

    from .insilico import run_bssfp_insilico

    otf = None
    if args.onthefly is not None:
        tr, te, fa, npc = args.onthefly
        otf = BSSFPProtocol.with_default_increments(tr, te, fa, int(npc))
    torch.set_num_threads(1)
    written = run_bssfp_insilico(
        args.out_dir, methods=args.methods, snrs=args.snr, n_mc=args.mc, grid_n=args.grid,
        n_invivo=args.invivo, npcs=args.npc, theta_methods=args.theta_methods,
        n_theta=args.theta_points, theta_grid_n=args.theta_grid, model_dir=args.model_dir, seed=args.seed,
        onthefly_protocol=otf, model_set=args.models,
    )
    for path in written:
        print(path)
    return EXIT_OK
