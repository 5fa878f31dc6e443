"""``bids_qmri-insilico <experiment> OUT_DIR``: the seed papers' in-silico experiments (SPEC §2).

Each experiment is a subcommand that writes TSV tables and PNG figures into OUT_DIR.
``bssfp``: Monte Carlo accuracy versus SNR (MIRACLE, SVNN, PINN, complex nets) on the linear
T1/T2 grid and an in-vivo-like test set, and relative error versus off-resonance for Npc 12/6/4.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from bids_qmri import __version__
from bids_qmri.errors import EXIT_OK, EXIT_USAGE
from bids_qmri.fitting.bssfp import BSSFP_METHODS


def _snr(text: str) -> float:
    if text.lower() in ("inf", "infinity", "none"):
        return math.inf
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"SNR must be positive or 'inf', got {text}")
    return value


def _add_bssfp(sub):
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
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_run_bssfp)


def _run_bssfp(args, parser) -> int:
    if args.mc < 1 or args.grid < 2 or args.invivo < 2 or args.theta_points < 1 or args.theta_grid < 2:
        parser.exit(EXIT_USAGE, "bids_qmri-insilico: error: --mc, --grid, --invivo, --theta-points and "
                                "--theta-grid must be positive (grids at least 2)\n")
    import torch

    from bids_qmri.insilico.bssfp import run_bssfp_insilico
    from bids_qmri.physics.bssfp import BSSFPProtocol

    otf = None
    if args.onthefly is not None:
        tr, te, fa, npc = args.onthefly
        otf = BSSFPProtocol.with_default_increments(tr, te, fa, int(npc))
    torch.set_num_threads(1)
    written = run_bssfp_insilico(
        args.out_dir, methods=args.methods, snrs=args.snr, n_mc=args.mc, grid_n=args.grid,
        n_invivo=args.invivo, npcs=args.npc, theta_methods=args.theta_methods,
        n_theta=args.theta_points, theta_grid_n=args.theta_grid, model_dir=args.model_dir, seed=args.seed,
        onthefly_protocol=otf,
    )
    for path in written:
        print(path)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bids_qmri-insilico",
        description="Reproduce the seed papers' in-silico experiments; writes TSV tables and PNG plots.",
    )
    parser.add_argument("--version", action="version", version=f"bids_qmri-insilico {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    _add_bssfp(sub)
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
