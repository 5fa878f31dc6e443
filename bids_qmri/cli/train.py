"""``bids_qmri-train``: train a pc-bSSFP network for a protocol from simulation (SPEC §2, §7).

The protocol comes from ``--tr/--te/--flip-angle/--npc`` (or ``--phase-increments``) or from a
BIDS sidecar JSON (``--sidecar``). Writes ``<method>_npc<N>_<protocol key>.safetensors`` and its
model card ``.json`` into ``--out-dir`` (the layout ``--model-dir`` and the bundled models use).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from bids_qmri import __version__
from bids_qmri.errors import EXIT_OK, EXIT_USAGE

log = logging.getLogger("bids_qmri.cli.train")


def build_parser() -> argparse.ArgumentParser:
    from bids_qmri.training.bssfp import DISTRIBUTIONS, METHODS, PINN_FEATURE_SCALES, TrainConfig

    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="bids_qmri-train",
        description="Train an SVNN/PINN (magnitude or complex) for a pc-bSSFP protocol from "
                    "on-the-fly simulation and write it with its model card.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--method", required=True, choices=sorted(METHODS))
    g = p.add_argument_group("protocol (either a sidecar or the values)")
    g.add_argument("--sidecar", type=Path, help="BIDS JSON sidecar of the bSSFP series")
    g.add_argument("--tr", type=float, help="RepetitionTimeExcitation in seconds")
    g.add_argument("--te", type=float, help="EchoTime in seconds")
    g.add_argument("--flip-angle", type=float, help="nominal flip angle in degrees")
    g.add_argument("--npc", type=int, help="number of phase cycles with default increments π(2j−1)/Npc")
    g.add_argument("--phase-increments", type=float, nargs="+", metavar="DEG",
                   help="explicit phase increments in degrees (instead of --npc)")
    t = p.add_argument_group("training")
    t.add_argument("--distribution", default=d.distribution, choices=sorted(DISTRIBUTIONS))
    t.add_argument("--samples", type=int, default=d.n_samples)
    t.add_argument("--epochs", type=int, default=d.max_epochs, help="maximum number of epochs")
    t.add_argument("--patience", type=int, default=d.patience, help="early-stopping patience (epochs)")
    t.add_argument("--batch-size", type=int, default=d.batch_size)
    t.add_argument("--lr", type=float, default=d.lr)
    t.add_argument("--lr-schedule", default=d.lr_schedule, choices=["constant", "cosine"])
    t.add_argument("--theta-margin", type=float, default=d.theta_margin,
                   help="complex nets: fraction of π left out of training at both ends of θ ∈ (−π, π)")
    t.add_argument("--init-from", type=Path, default=None, metavar="WEIGHTS",
                   help="continue training from this .safetensors network (same method and distribution)")
    t.add_argument("--pinn-feature-scale", default=d.pinn_feature_scale, choices=list(PINN_FEATURE_SCALES),
                   help="PINN loss in raw feature units (none, the seeds') or in the network's standardised "
                        "input units (input_std; better conditioned for the complex nets, where ΔB0 dominates)")
    t.add_argument("--keep", default=d.keep, choices=["best", "last"],
                   help="weights returned: lowest validation loss (best, default) or the final epoch (last; "
                        "for annealed schedules whose validation loss is too noisy to select on)")
    t.add_argument("--snr", type=float, default=None, help="training noise SNR (seed definition); default noise-free")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--origin", default="trained with bids_qmri-train",
                   help="provenance text recorded in the card (e.g. 'bundled')")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out-dir", type=Path, help="where the weights and card go")
    where.add_argument("--model-dir", type=Path,
                       help="install the model where `bids_qmri --model-dir DIR` finds it (DIR/<protocol key>/); "
                            "there it replaces the bundled model of the same method and protocol")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("--version", action="version", version=f"bids_qmri-train {__version__}")
    return p


def _protocol(args, parser):
    from bids_qmri.physics.bssfp import BSSFPProtocol

    try:
        if args.sidecar is not None:
            try:
                meta = json.loads(args.sidecar.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                parser.exit(EXIT_USAGE, f"bids_qmri-train: error: {args.sidecar}: cannot read the sidecar ({exc}) — give a valid JSON file\n")
            if args.phase_increments:
                meta["PhaseIncrements"] = args.phase_increments
            return BSSFPProtocol.from_sidecar(meta, npc=args.npc)
        if None in (args.tr, args.te, args.flip_angle) or not (args.npc or args.phase_increments):
            parser.exit(EXIT_USAGE, "bids_qmri-train: error: give --sidecar, or --tr, --te, --flip-angle and --npc (or --phase-increments)\n")
        if args.phase_increments:
            return BSSFPProtocol(args.tr, args.te, args.flip_angle, tuple(args.phase_increments))
        return BSSFPProtocol.with_default_increments(args.tr, args.te, args.flip_angle, args.npc)
    except ValueError as exc:
        parser.exit(EXIT_USAGE, f"bids_qmri-train: error: {exc}\n")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from bids_qmri.utils.logs import setup_logging

    setup_logging(args.verbose)
    protocol = _protocol(args, parser)

    from bids_qmri.models.registry import cache_dir, model_stem, save_model
    from bids_qmri.utils.atomic import write_json_atomic
    from bids_qmri.training.bssfp import TrainConfig, train_bssfp_net

    try:
        cfg = TrainConfig(
            method=args.method, distribution=args.distribution, n_samples=args.samples,
            max_epochs=args.epochs, patience=args.patience, batch_size=args.batch_size, lr=args.lr,
            lr_schedule=args.lr_schedule, theta_margin=args.theta_margin,
            init_from=str(args.init_from) if args.init_from else None,
            pinn_feature_scale=args.pinn_feature_scale, keep=args.keep, snr=args.snr, seed=args.seed, threads=args.threads,
        )
    except ValueError as exc:
        parser.exit(EXIT_USAGE, f"bids_qmri-train: error: {exc}\n")
    net, card = train_bssfp_net(protocol, cfg)
    stem = model_stem(args.method, protocol)
    out_dir = cache_dir(args.model_dir, protocol) if args.model_dir else args.out_dir
    weights = save_model(net, card, out_dir, stem, origin=args.origin)
    print(f"{weights} (epochs {card['training']['epochs_run']}, best {card['training']['best_epoch']}, "
          f"validation loss {card['validation_loss']:.4g})")
    if args.model_dir:
        write_json_atomic(out_dir / "protocol.json", protocol.as_dict())
        print(f"bids_qmri --model-dir {args.model_dir} uses it for {protocol.describe()} ({args.method})")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
