"""``bids_qmri-train``: train a network for a protocol from simulation (SPEC §2, §7).

``--method`` names the network (the modality that owns it is found in the registry; ``--modality``
disambiguates a method name two modalities share). The protocol comes from a BIDS sidecar
(``--sidecar``) or the modality's own options; the training settings left unset take the
modality's defaults (the seed papers'). Writes ``<stem>.safetensors`` and its model card ``.json``
into ``--out-dir``, or installs them where ``bids_qmri --model-dir DIR`` finds them (``--model-dir``),
ahead of the bundled model of the same method and protocol.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from bids_qmri import __version__
from bids_qmri.errors import EXIT_OK, EXIT_USAGE

log = logging.getLogger("bids_qmri.cli.train")


def _trainable():
    from bids_qmri import modalities as registry

    return [m for m in registry.modalities() if m.train_from_args is not None]


def build_parser() -> argparse.ArgumentParser:
    from bids_qmri.training.loop import LR_SCHEDULES

    trainable = _trainable()
    methods = sorted({meth.name for m in trainable for meth in m.methods if meth.train is not None})
    p = argparse.ArgumentParser(
        prog="bids_qmri-train",
        description="Train a network for an acquisition protocol from on-the-fly simulation and write it "
                    "with its model card. Methods: " + "; ".join(
                        f"{m.name}: {', '.join(x.name for x in m.methods if x.train)}" for m in trainable),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--method", required=True, choices=methods)
    p.add_argument("--modality", choices=[m.name for m in trainable], default=None,
                   help="the modality of --method, when two modalities offer a method of that name")
    p.add_argument("--sidecar", type=Path, help="BIDS JSON sidecar of the series whose protocol to train for")
    t = p.add_argument_group("training (unset: the modality's defaults, the seed papers')")
    t.add_argument("--samples", type=int, default=None)
    t.add_argument("--epochs", type=int, default=None, help="maximum number of epochs")
    t.add_argument("--patience", type=int, default=None, help="early-stopping patience (epochs)")
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--lr-schedule", default=None, choices=list(LR_SCHEDULES))
    t.add_argument("--keep", default=None, choices=["best", "last"],
                   help="weights returned: lowest validation loss (best) or the final epoch (last; for "
                        "annealed schedules whose validation loss is too noisy to select on)")
    t.add_argument("--snr", type=float, default=None, help="training noise SNR (seed definition); default noise-free")
    t.add_argument("--init-from", type=Path, default=None, metavar="WEIGHTS",
                   help="continue training from this .safetensors network (same method and distribution)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    t.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"],
                   help="where the network trains (simulation stays on the CPU; CPU results are reproducible)")
    for modality in trainable:
        if modality.add_train_arguments is not None:
            modality.add_train_arguments(p)
    p.add_argument("--origin", default="trained with bids_qmri-train",
                   help="provenance text recorded in the card (e.g. 'bundled')")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out-dir", type=Path, help="where the weights and card go")
    where.add_argument("--model-dir", type=Path,
                       help="install the model where `bids_qmri --model-dir DIR` finds it "
                            "(DIR/<modality>/<protocol key>/); there it replaces the bundled model of the same "
                            "method and protocol")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("--version", action="version", version=f"bids_qmri-train {__version__}")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from bids_qmri.utils.logs import setup_logging

    setup_logging(args.verbose)
    owners = [m for m in _trainable() if any(x.name == args.method and x.train for x in m.methods)]
    if args.modality:
        owners = [m for m in owners if m.name == args.modality]
    if len(owners) != 1:
        parser.exit(EXIT_USAGE, f"bids_qmri-train: error: --method {args.method} belongs to "
                                f"{', '.join(m.name for m in owners) or 'no modality'}: name one with --modality\n")
    modality = owners[0]
    if args.device != "cpu":
        from bids_qmri.errors import UsageError
        from bids_qmri.utils.device import resolve_device

        try:
            args.device = resolve_device(args.device)
        except UsageError as exc:
            parser.exit(EXIT_USAGE, f"bids_qmri-train: error: {exc}\n")

    from bids_qmri.models.registry import cache_dir, model_stem, save_model
    from bids_qmri.utils.atomic import write_json_atomic

    protocol, net, card = modality.train_from_args(args, parser)
    stem = model_stem(args.method, protocol)
    out_dir = cache_dir(args.model_dir, modality.name, protocol) if args.model_dir else args.out_dir
    weights = save_model(net, card, out_dir, stem, origin=args.origin)
    print(f"{weights} (epochs {card['training']['epochs_run']}, best {card['training']['best_epoch']}, "
          f"validation loss {card['validation_loss']:.4g})")
    if args.model_dir:
        write_json_atomic(out_dir / "protocol.json", protocol.as_dict())
        print(f"bids_qmri --model-dir {args.model_dir} uses it for {protocol.describe()} ({args.method})")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
