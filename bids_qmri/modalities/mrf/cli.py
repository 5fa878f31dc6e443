"""MRF's part of ``bids_qmri-train``: ``--modality mrf --method mrfnet --loss {mse,crb}`` for a
schedule (``--sidecar`` of the MRF series, or the default FISP schedule of ``--mrf-frames``
frames) and the basis the data will be read in (``--mrf-basis``: the series' basis TSV for
coefficient input; otherwise the dictionary's own SVD basis at ``--mrf-b1`` values, which is what
``bids_qmri`` computes for frames input without a B1 map at B1 = 1)."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bids_qmri.errors import EXIT_USAGE


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("MR fingerprinting: mrfnet (--modality mrf; --sidecar: the MRF series' JSON)")
    g.add_argument("--loss", default="crb", choices=["crb", "mse"],
                   help="mrfnet training loss: Cramer-Rao-bound weighted (crb, seed 003) or plain MSE")
    g.add_argument("--mrf-frames", type=int, default=None,
                   help="without --sidecar: the default FISP schedule (physics.epg.default_fisp_schedule) of this "
                        "many frames")
    g.add_argument("--mrf-basis", type=Path, default=None,
                   help="the series' basis TSV (coefficient input); default: the dictionary's own SVD basis")
    g.add_argument("--mrf-b1", type=float, nargs="+", default=[1.0],
                   help="B1 grid values the own basis is computed over (the B1 values the data use; 1 without a "
                        "B1 map)")
    g.add_argument("--mrf-grid-steps", type=int, default=80, help="dictionary grid of the own basis")
    g.add_argument("--mrf-svd-energy", type=float, default=0.999, help="energy kept by the own basis")
    g.add_argument("--mrf-cache", type=Path, default=None,
                   help="where the own basis' dictionary Gram matrices are cached (default: a temporary folder)")


def _fail(parser, text: str):
    parser.exit(EXIT_USAGE, f"bids_qmri-train: error: {text}\n")


def _protocol(args, parser):
    import numpy as np

    from bids_qmri.physics import epg

    from .protocol import MRFProtocol, schedule_problem

    if args.sidecar is not None:
        try:
            meta = json.loads(args.sidecar.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            _fail(parser, f"{args.sidecar}: cannot read the sidecar ({exc}) — give the MRF series' JSON")
        problem = schedule_problem(meta)
        if problem:
            _fail(parser, f"{args.sidecar}: {problem[0]} — {problem[1]}")
        return MRFProtocol.from_dict(meta)
    if not args.mrf_frames or args.mrf_frames < 2:
        _fail(parser, "give --sidecar (the MRF series' JSON) or --mrf-frames N (the default FISP schedule)")
    s = epg.default_fisp_schedule(int(args.mrf_frames))
    return MRFProtocol(tuple(float(v) for v in np.degrees(s["flip_rad"].numpy())),
                       tuple(float(v) for v in s["tr"].numpy()), float(s["te"]), float(s["ti"]))


def training_basis(protocol, *, basis_tsv: Path | None = None, b1_values=(1.0,), grid_steps: int = 80,
                   energy: float = 0.999, cache_dir: Path | None = None):
    """The basis mrfnet reads: the given TSV's, or the dictionary's own SVD at ``b1_values``."""
    import numpy as np
    import torch

    from bids_qmri.bids.basis import read_basis_tsv

    from . import dictionary as mrfdict

    if basis_tsv is not None:
        basis = read_basis_tsv(basis_tsv).to(torch.complex64)
        if basis.shape[0] != protocol.n_frames:
            raise ValueError(f"{basis_tsv} has {basis.shape[0]} rows but the schedule has {protocol.n_frames} frames")
        return basis
    grid = mrfdict.DictionaryGrid(t1_steps=grid_steps, t2_steps=grid_steps)
    values = grid.b1_values[np.unique(grid.b1_index(np.asarray(b1_values, dtype=float)))]
    with tempfile.TemporaryDirectory() as tmp:
        basis, _ = mrfdict.own_basis(protocol.schedule(), grid, values, Path(cache_dir or tmp), energy=energy)
    return basis


def train_from_args(args, parser):
    """``(protocol, net, card)`` for the shared ``bids_qmri-train`` (which saves them)."""
    from .net import NetProtocol, basis_key, train_mrfnet

    protocol = _protocol(args, parser)
    try:
        basis = training_basis(protocol, basis_tsv=args.mrf_basis, b1_values=args.mrf_b1,
                               grid_steps=args.mrf_grid_steps, energy=args.mrf_svd_energy, cache_dir=args.mrf_cache)
    except ValueError as exc:
        _fail(parser, f"{exc} — give the basis the coefficients were computed with")
    net_protocol = NetProtocol(protocol, basis_key(basis), args.loss)
    given = {"n_samples": args.samples, "max_epochs": args.epochs, "patience": args.patience,
             "batch_size": args.batch_size, "lr": args.lr}
    if args.snr is not None:
        if args.snr <= 0:
            _fail(parser, "--snr must be positive")
        given["snr_range"] = (args.snr, args.snr)
    import torch

    torch.set_num_threads(max(1, int(args.threads)))
    net, card = train_mrfnet(net_protocol, basis, seed=args.seed, **{k: v for k, v in given.items() if v is not None})
    return net_protocol, net, card
