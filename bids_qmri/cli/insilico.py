"""``bids_qmri-insilico <experiment> OUT_DIR``: the seed papers' in-silico experiments (SPEC §2).

Each experiment is a subcommand, contributed by a modality (``Modality.add_insilico_commands``),
that writes TSV tables and PNG figures into OUT_DIR; ``bids_qmri-insilico --help`` lists them.
"""

from __future__ import annotations

import argparse
import sys

from bids_qmri import __version__
from bids_qmri.errors import EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    from bids_qmri import modalities as registry

    parser = argparse.ArgumentParser(
        prog="bids_qmri-insilico",
        description="Reproduce the seed papers' in-silico experiments; writes TSV tables and PNG plots.",
    )
    parser.add_argument("--version", action="version", version=f"bids_qmri-insilico {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    for modality in registry.modalities():
        if modality.add_insilico_commands is not None:
            modality.add_insilico_commands(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from bids_qmri.utils.logs import setup_logging

    setup_logging(args.verbose)
    try:
        return args.run(args, parser)
    except (ValueError, FileNotFoundError) as exc:
        parser.exit(EXIT_USAGE, f"bids_qmri-insilico: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
