"""qMT's part of ``bids_qmri-train``: ``--modality qmt --method {qmtnet,qmtnetmse}`` (seed 003's
CRB-loss network and its MSE twin) for a hybrid-state schedule and the basis the data are read in.

Schedule and basis: ``--sidecar`` (the qMT series' JSON) with ``--qmt-basis`` (its basis TSV, for
coefficient data), or ``--sidecar`` alone (frame data: the training basis ``bids_qmri`` computes
for the schedule, ``estimate.training_basis``), or neither: the synthetic dataset's schedule and
basis (``synth.dataset.qmt_basis()``, what the bundled networks are trained for). The training set
is simulated (``--samples``; CRBs by ``physics.qmt.hybrid_state_jacobian``) and kept in
``--qmt-cache`` when given, or read from ``--qmt-train-set`` files (``scripts/simulate_qmt_set.py``
parts, concatenated; the last ``--qmt-val-fraction`` held out).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bids_qmri.errors import EXIT_USAGE

from .protocol import synthetic_protocol


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("qMT: qmtnet, qmtnetmse (--modality qmt; --sidecar: the qMT series' JSON)")
    g.add_argument("--qmt-basis", type=Path, default=None,
                   help="the series' basis TSV (coefficient data); default: the training basis of the --sidecar "
                        "schedule, or without --sidecar the synthetic dataset's schedule and basis")
    g.add_argument("--qmt-train-set", type=Path, nargs="+", default=None, metavar="SET.pt",
                   help="precomputed training-set parts (scripts/simulate_qmt_set.py) instead of --samples")
    g.add_argument("--qmt-val-samples", type=int, default=None,
                   help="held-out samples (default: 512 when simulating, 15%% of --qmt-train-set)")
    g.add_argument("--qmt-lr-step", type=int, default=40, help="epochs between halvings of the learning rate")
    g.add_argument("--qmt-minutes", type=float, default=None, help="wall-time budget of the training loop")
    g.add_argument("--qmt-widen", nargs="+", default=None, metavar="NAME=FACTOR",
                   help="draw the simulated training set from wider distributions (e.g. m0s=2 T1=2 T2s=2 Rx=2: SD and "
                        "truncation limits x factor about the mean, clipped to physical limits); validation stays on "
                        "seed 003's")
    g.add_argument("--qmt-cache", type=Path, default=None,
                   help="where simulated training sets (with their CRBs) are cached")


def _fail(parser, text: str):
    parser.exit(EXIT_USAGE, f"bids_qmri-train: error: {text}\n")


def _protocol_and_basis(args, parser):
    import torch

    from bids_qmri.bids.basis import read_basis_tsv

    from .protocol import QMTProtocol, schedule_problem

    if args.sidecar is None:
        if args.qmt_basis is not None:
            _fail(parser, "--qmt-basis needs --sidecar (the schedule the basis belongs to)")
        return synthetic_protocol()
    try:
        meta = json.loads(args.sidecar.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        _fail(parser, f"{args.sidecar}: cannot read the sidecar ({exc}) — give the qMT series' JSON")
    if not isinstance(meta, dict) or (problem := schedule_problem(meta)):
        problem = problem if isinstance(meta, dict) else ("not a JSON object", "give the qMT series' JSON")
        _fail(parser, f"{args.sidecar}: {problem[0]} — {problem[1]}")
    if args.qmt_basis is not None:
        try:
            basis = read_basis_tsv(args.qmt_basis).to(torch.complex128)
        except ValueError as exc:
            _fail(parser, f"{exc} — give the basis TSV the coefficients were computed with")
        protocol = QMTProtocol.from_dict(meta, basis=basis)
        if basis.shape[0] != protocol.n_tr:
            _fail(parser, f"{args.qmt_basis} has {basis.shape[0]} rows but the schedule has {protocol.n_tr} TRs")
        return protocol, basis
    from .estimate import net_protocol, training_basis  # the basis bids_qmri projects frame data on

    protocol = QMTProtocol.from_dict(meta)
    basis = training_basis(protocol, args.qmt_cache)
    return net_protocol(protocol, basis), basis


def _read_sets(paths, n_val, parser):
    """Concatenate ``simulate_set`` parts -> (train, val) dicts (the last ``n_val`` samples held out)."""
    import torch

    parts = []
    for path in paths:
        try:
            parts.append(torch.load(path, weights_only=True))
        except Exception as exc:  # noqa: BLE001 - any unreadable file is one line for the user
            _fail(parser, f"{path}: not a qMT training-set file ({' '.join(str(exc).split())[:100]})")
        if not {"theta", "coeffs", "crb_unit", "seconds"} <= set(parts[-1]):
            _fail(parser, f"{path}: not a qMT training-set file with CRBs (scripts/simulate_qmt_set.py writes them)")
    n = sum(len(p["theta"]) for p in parts)
    n_val = max(1, int(0.15 * n)) if n_val is None else n_val
    if not 0 < n_val < n:
        _fail(parser, f"--qmt-val-samples must lie in [1, {n - 1}] for {n} samples")
    data = {k: torch.cat([p[k] for p in parts]) for k in ("theta", "coeffs", "crb_unit")}
    # each part's widening (simulate.widened_distributions; absent: seed 003's), per sample
    data["widen"] = torch.cat([torch.as_tensor(p.get("widen", torch.ones(7, dtype=torch.float64)))
                               .reshape(-1, 7).expand(len(p["theta"]), -1) for p in parts])
    seconds = sum(float(p["seconds"]) for p in parts)
    cpu = sum(float(p.get("cpu_seconds", p["seconds"])) for p in parts)

    def split(sl, m):
        out = {k: v[sl] for k, v in data.items()}
        out["seconds"] = torch.tensor(seconds * m / n, dtype=torch.float64)
        out["cpu_seconds"] = torch.tensor(cpu * m / n, dtype=torch.float64)
        return out

    return split(slice(0, n - n_val), n - n_val), split(slice(n - n_val, n), n_val)


def train_from_args(args, parser):
    """``(protocol, net, card)`` for the shared ``bids_qmri-train`` (which saves them)."""
    import torch

    from .training import train_qmtnet

    protocol, basis = _protocol_and_basis(args, parser)
    widen = None
    if getattr(args, "qmt_widen", None):
        if args.qmt_train_set:
            _fail(parser, "--qmt-widen applies to a simulated set; --qmt-train-set parts record their own widening")
        from .simulate import parse_widen

        try:
            widen = parse_widen(args.qmt_widen)
        except ValueError as exc:
            _fail(parser, f"--qmt-{exc}")
    train_set = val_set = None
    if args.qmt_train_set:
        if args.samples is not None:
            _fail(parser, "give --samples (simulate) or --qmt-train-set (precomputed), not both")
        train_set, val_set = _read_sets(args.qmt_train_set, args.qmt_val_samples, parser)
        if train_set["coeffs"].shape[1] != basis.shape[1]:
            _fail(parser, f"the training set has {train_set['coeffs'].shape[1]} coefficients but the basis has "
                          f"rank {basis.shape[1]}")
    for name in ("samples", "epochs", "batch_size", "qmt_val_samples", "qmt_lr_step"):
        value = getattr(args, name)
        if value is not None and value < 1:
            _fail(parser, f"--{name.replace('_', '-')} must be at least 1")
    if args.lr is not None and not args.lr > 0:
        _fail(parser, "--lr must be positive")
    given = {"n_train": args.samples, "n_val": None if args.qmt_train_set else args.qmt_val_samples,
             "max_epochs": args.epochs, "patience": args.patience, "batch_size": args.batch_size, "lr": args.lr,
             "lr_step": args.qmt_lr_step, "lr_schedule": args.lr_schedule,
             "init_from": args.init_from, "widen": widen,
             "max_seconds": None if args.qmt_minutes is None else 60.0 * args.qmt_minutes}
    if args.patience is None and args.epochs is not None:
        given["patience"] = args.epochs  # the seed trains a fixed number of epochs
    torch.set_num_threads(max(1, int(args.threads)))
    try:
        net, card = train_qmtnet(args.method, protocol, basis, train_set=train_set, val_set=val_set, seed=args.seed,
                                 cache_dir=args.qmt_cache, progress=False,
                                 **{k: v for k, v in given.items() if v is not None})
    except ValueError as exc:  # a bad --init-from (ModelFileError is one), an unknown schedule: one line
        _fail(parser, str(exc))
    return protocol, net, card
