"""``bids_qmri-synth``: write a synthetic BIDS dataset with its ground truth (SPEC §2).

    bids_qmri-synth OUT_DIR [--participants N] [--sessions M] [--resolution MM] [--snr X]
                    [--seed S] [--no-motion] [--npc N] [--kinds KIND ...]
                    [--anatomy {mni152,colin27}] [--nprocs N] [-v]
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
import traceback

from .. import __version__
from ..errors import EXIT_INTERNAL, EXIT_OK, EXIT_USAGE, BidsQmriError, UsageError

PROG = "bids_qmri-synth"
LOGGER = logging.getLogger("bids_qmri.cli.synth")


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (no usage dump) and exits 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _snr(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid SNR {text!r}: give a positive number or 'inf'")
    if not value > 0 or math.isnan(value):
        raise argparse.ArgumentTypeError(f"invalid SNR {text!r}: must be positive ('inf' for no noise)")
    return value


def build_parser() -> argparse.ArgumentParser:
    from ..synth.dataset import ALL_KINDS, DEFAULT_KINDS
    from ..synth.phantom import ANATOMIES, DEFAULT_ANATOMY

    p = _OneLineParser(
        prog=PROG,
        description="Write a realistic synthetic BIDS dataset (all bids_qmri input kinds) from a "
                    "digital brain phantom, with the ground truth under "
                    "OUT_DIR/derivatives/groundtruth/.")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output directory (must not exist or be empty)")
    p.add_argument("--participants", type=int, default=2, metavar="N", help="participants (default 2)")
    p.add_argument("--sessions", type=int, default=2, metavar="M",
                   help="sessions per participant, sharing the tissue parameters (default 2; "
                        "0: no session level)")
    p.add_argument("--resolution", type=float, default=2.0, metavar="MM",
                   help="finest voxel size in mm (T1w, bSSFP, MRF, qMT, IRT1, MESE); the B1 map "
                        "is at twice this (default 2)")
    p.add_argument("--snr", type=_snr, default=25.0, metavar="X",
                   help="SNR, seed definition sigma = 0.074/(sqrt(2) SNR) for bSSFP, the same ratio to "
                        "the mean brain signal for the other kinds; 'inf' for no noise (default 25)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    p.add_argument("--no-motion", action="store_true",
                   help="no head motion between sessions, scans and volumes")
    p.add_argument("--npc", type=int, default=12, metavar="N",
                   help="bSSFP phase cycles, increments pi(2j-1)/N (default 12)")
    p.add_argument("--kinds", nargs="+", choices=ALL_KINDS, default=list(DEFAULT_KINDS),
                   metavar="KIND", help=f"input kinds to simulate (default all: {' '.join(ALL_KINDS)})")
    p.add_argument("--anatomy", choices=ANATOMIES, default=DEFAULT_ANATOMY,
                   help="the phantom's head: mni152 (the MNI152 2009 maps, the same template the "
                        "pipeline registers to: optimistic for anatomy scores) or colin27 (Colin27 "
                        "from Debian mricron-data, tissues by a Gaussian mixture on its intensities; "
                        f"never seen by the pipeline) (default {DEFAULT_ANATOMY})")
    p.add_argument("--nprocs", type=int, default=1, metavar="N",
                   help="simulate up to N participants in parallel processes (default 1; the "
                        "files are identical whatever N)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v, -vv)")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from ..utils.logs import setup_logging

    setup_logging(args.verbose)
    try:
        import torch

        from ..synth.dataset import SynthOptions, write_dataset

        torch.set_num_threads(1)  # the machine is shared; the simulation is vectorised
        options = SynthOptions(participants=args.participants, sessions=args.sessions,
                               resolution=args.resolution, snr=args.snr, seed=args.seed,
                               motion=not args.no_motion, npc=args.npc,
                               kinds=tuple(dict.fromkeys(args.kinds)), anatomy=args.anatomy)
        if args.nprocs < 1:
            raise UsageError(f"--nprocs must be at least 1, got {args.nprocs}")
        start = time.perf_counter()
        out = write_dataset(args.out_dir, options, progress=sys.stderr.isatty(), nprocs=args.nprocs)
        print(f"{PROG}: wrote {out} ({options.participants} participant(s) x "
              f"{max(options.sessions, 1)} session(s)) in {time.perf_counter() - start:.1f} s",
              file=sys.stderr)
        return EXIT_OK
    except BidsQmriError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written to {args.out_dir}", file=sys.stderr)
        return 130
    except OSError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"{PROG}: error: cannot write {args.out_dir}: {exc.strerror or exc} — "
              "choose a writable output directory with enough space", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # a bug
        traceback.print_exc()
        print(f"{PROG}: internal error ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}) "
              "— please report it with the traceback above", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
