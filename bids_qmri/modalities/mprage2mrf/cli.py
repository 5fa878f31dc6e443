"""mprage2mrf's part of ``bids_qmri-train``: the T1w protocol (``--sidecar`` of a T1w, or the
synthetic dataset's MPRAGE), the phantom participants and the network size."""

from __future__ import annotations

import argparse
import json

from bids_qmri.errors import EXIT_USAGE


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from .training import Mprage2MRFTrainConfig

    d = Mprage2MRFTrainConfig()
    g = parser.add_argument_group("mprage2mrf (seven U-Nets, MPRAGE -> MRF SVD coefficients; --sidecar: a T1w "
                                  "sidecar, default the synthetic dataset's MPRAGE)")
    g.add_argument("--mprage2mrf-participants", type=int, default=d.n_train,
                   help="phantom participants simulated for training")
    g.add_argument("--mprage2mrf-val-participants", type=int, default=d.n_val,
                   help="phantom participants for validation (best weights kept)")
    g.add_argument("--mprage2mrf-resolution", type=float, default=d.resolution_mm,
                   help="phantom voxel size (mm) of the training pairs")
    g.add_argument("--mprage2mrf-base", type=int, default=d.base, help="U-Net base filters (seed 002: 16)")
    g.add_argument("--mprage2mrf-depth", type=int, default=d.depth,
                   help="U-Net pooling levels (seed 002: 4, 16 -> 256 filters)")
    g.add_argument("--mprage2mrf-population", default=d.population, metavar="P[+P...]",
                   help="phantom population of the training participants' tissue values: seed004 (seed 004 Table "
                        "1's broad spread, the phantom's default) or healthy (a healthy adult cohort's "
                        "between-subject spread; synth.phantom.POPULATIONS); healthy+seed004 alternates them")
    g.add_argument("--mprage2mrf-long-t2-weight", type=float, default=d.long_t2_weight, metavar="W",
                   help=f"count the voxels whose true T2 is >= {d.long_t2_s:g} s (CSF-rich) W times in the loss "
                        "(1: off, seed 002's plain MSE; also --lr-schedule and --keep apply)")
    g.add_argument("--mprage2mrf-budget-minutes", type=float, default=None,
                   help="stop after this much wall time (checked after every epoch; the card records the epochs)")


def train_from_args(args, parser):
    from .protocol import MPRAGEProtocol, synthetic_protocol
    from .training import Mprage2MRFTrainConfig, train_mprage2mrf

    if args.sidecar is not None:
        try:
            protocol = MPRAGEProtocol.from_dict(json.loads(args.sidecar.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            parser.exit(EXIT_USAGE, f"bids_qmri-train: error: {args.sidecar}: not a usable MPRAGE T1w sidecar "
                                    f"({exc})\n")
    else:
        protocol = synthetic_protocol()
    given = {"epochs": args.epochs, "patience": args.patience, "batch_size": args.batch_size, "lr": args.lr,
             "snr": args.snr, "lr_schedule": args.lr_schedule, "keep": args.keep}
    try:
        cfg = Mprage2MRFTrainConfig(
            n_train=args.mprage2mrf_participants, n_val=args.mprage2mrf_val_participants,
            resolution_mm=args.mprage2mrf_resolution, base=args.mprage2mrf_base, depth=args.mprage2mrf_depth,
            seed=args.seed, threads=args.threads, population=args.mprage2mrf_population,
            long_t2_weight=args.mprage2mrf_long_t2_weight,
            init_from=str(args.init_from) if args.init_from else None,
            max_seconds=None if args.mprage2mrf_budget_minutes is None else 60.0 * args.mprage2mrf_budget_minutes,
            **{k: v for k, v in given.items() if v is not None})
        net, card = train_mprage2mrf(protocol, cfg)
    except ValueError as exc:
        parser.exit(EXIT_USAGE, f"bids_qmri-train: error: {exc}\n")
    card.pop("history", None)
    return protocol, net, card
