"""The relaxometry series' parts of ``bids_qmri-train`` (RIM and ResNet for an IRT1 or MESE
series: the time points, a CPU budget, the architecture)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bids_qmri.errors import EXIT_USAGE


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from .training import RelaxTrainConfig

    d = RelaxTrainConfig()
    g = parser.add_argument_group("IRT1 / MESE series: rim, resnet (--modality irt1 or mese; --sidecar: a map "
                                  "sidecar with InversionTimes or EchoTime list, or these values)")
    g.add_argument("--times", type=float, nargs="+", metavar="S",
                   help="inversion times (irt1) or echo times (mese) of the series, in seconds")
    g.add_argument("--iterations", type=int, default=None,
                   help=f"mini-batches to train (default {d.iterations}, seed 004)")
    g.add_argument("--budget-minutes", type=float, default=None,
                   help="stop after this much wall time (checked after every epoch of --iterations-per-epoch "
                        "mini-batches; the card records the iterations run)")
    g.add_argument("--iterations-per-epoch", type=int, default=d.iterations_per_epoch,
                   help="mini-batches between validations")
    g.add_argument("--anatomy-resolution", type=float, default=d.resolution_mm,
                   help="voxel size (mm) of the digital brain the training patches are cut from")
    g.add_argument("--rim-hidden", type=int, default=d.hidden, help="RIM feature channels (seed 004: 36)")
    g.add_argument("--rim-steps", type=int, default=d.steps, help="RIM steps J (seed 004: 6)")
    g.add_argument("--rim-gru-kernel", type=int, default=d.gru_kernel, help="kernel of the RIM's GRU convolutions")
    g.add_argument("--rim-gradient", choices=["gauss_newton", "raw"], default=d.rim_gradient,
                   help="the likelihood gradient the RIM sees: divided per voxel and parameter by the Gauss-Newton "
                        "curvature (gauss_newton) or as is (raw, seed 004)")
    g.add_argument("--relax-structures", action="store_true",
                   help="add one-voxel points and lines to every training patch (against blurring small structures)")
    g.add_argument("--relax-structure-weight", type=float, default=d.structure_weight, metavar="W",
                   help="multiply the squared error on the structures' voxels by W (with --relax-structures; "
                        "seed 004 eq. 6: 1)")
    g.add_argument("--rim-snr-weight", type=float, default=d.snr_weight, metavar="P",
                   help="weight each training patch's squared error by (sigma_min/sigma)^P, sigma its noise level "
                        "(1 at SNR 100, 1/39^P at SNR 3): P > 0 gives the low-SNR patches' large errors less weight, "
                        "P < 0 more; -4 <= P <= 4 (seed 004 eq. 6: 0)")
    g.add_argument("--rim-bias-weight", type=float, default=d.bias_weight, metavar="LAMBDA",
                   help="add LAMBDA x the mean over steps, patches and parameters of the squared mean error over "
                        "each patch's loss voxels (the patch's bias; ln T1's is about its relative bias) to the RIM "
                        "loss (with --rim-snr-weight P each patch's squares weighted as its voxels); 0 <= LAMBDA <= 1000 "
                        "(seed 004 eq. 6: 0)")
    g.add_argument("--rim-bias-groups", choices=["patch", "tissue"], default=d.bias_groups,
                   help="the --rim-bias-weight term's means: over each patch's loss voxels (patch), or per patch "
                        "and dominant tissue, each weighted by its voxel count (tissue: the bias of one tissue "
                        "draw, not a mix in which tissues' biases of opposite sign cancel)")
    g.add_argument("--average-last", type=int, default=d.average_last, metavar="N",
                   help="keep the arithmetic mean of the last N epochs' RIM weights instead of one epoch's "
                        "(smooths the epoch-to-epoch swing of a constant learning rate; 0: off)")
    g.add_argument("--rim-b-weight", type=float, default=d.b_weight,
                   help="weight of B's squared error in the IRT1 loss (seed 004 eq. 6: 1)")
    g.add_argument("--resnet-channels", type=int, nargs="+", default=list(d.resnet_channels),
                   help="widths of the ResNet's residual blocks (seed 004: 40 40 80 80 160 320 160 80 80 40 6)")


def _protocol(args, parser, modality: str):
    from .inputs import SeriesProtocol

    key = "InversionTime" if modality == "irt1" else "EchoTime"
    if args.sidecar is not None:
        try:
            proto = SeriesProtocol.from_dict(json.loads(args.sidecar.read_text()))
        except (OSError, ValueError, KeyError) as exc:
            parser.exit(EXIT_USAGE, f"bids_qmri-train: error: {args.sidecar}: no InversionTimes / EchoTime list "
                                    f"({exc}) — give a map sidecar of the series, or --times\n")
        if proto.time_key != key:
            parser.exit(EXIT_USAGE, f"bids_qmri-train: error: {args.sidecar} describes a {proto.time_key} series, "
                                    f"not {modality} — pass the other --modality\n")
        return proto
    if not args.times:
        parser.exit(EXIT_USAGE, "bids_qmri-train: error: give --times (seconds) or --sidecar for the series\n")
    times = tuple(sorted(float(t) for t in args.times))
    if times[0] <= 0 or times[-1] > 30 or len(set(times)) != len(times):
        parser.exit(EXIT_USAGE, "bids_qmri-train: error: --times must be distinct positive times in seconds "
                                "(not milliseconds)\n")
    return SeriesProtocol(key, times)


def train_from_args_for(modality: str):
    def train_from_args(args, parser):
        from .training import RelaxTrainConfig, train_relax_net

        protocol = _protocol(args, parser, modality)
        given = {"iterations": args.iterations, "batch_size": args.batch_size, "lr": args.lr,
                 "lr_schedule": args.lr_schedule, "keep": args.keep}
        try:
            cfg = RelaxTrainConfig(
                method=args.method, seed=args.seed, threads=args.threads,
                iterations_per_epoch=args.iterations_per_epoch, resolution_mm=args.anatomy_resolution,
                max_seconds=None if args.budget_minutes is None else 60.0 * args.budget_minutes,
                hidden=args.rim_hidden, steps=args.rim_steps, gru_kernel=args.rim_gru_kernel,
                rim_gradient=args.rim_gradient, structures=args.relax_structures,
                structure_weight=args.relax_structure_weight, b_weight=args.rim_b_weight,
                snr_weight=args.rim_snr_weight, bias_weight=args.rim_bias_weight,
                bias_groups=args.rim_bias_groups,
                average_last=args.average_last,
                init_from=str(args.init_from) if args.init_from else None,
                resnet_channels=tuple(args.resnet_channels), **{k: v for k, v in given.items() if v is not None})
            net, card = train_relax_net("ir" if modality == "irt1" else "t2", protocol.times, cfg)
        except ValueError as exc:
            parser.exit(EXIT_USAGE, f"bids_qmri-train: error: {exc}\n")
        card.pop("history", None)
        return protocol, net, card

    return train_from_args


# ---------------------------------------------------------------------- bids_qmri-insilico
def add_insilico_command(sub) -> None:
    from bids_qmri.synth.dataset import IRT1_TIS, MESE_TES

    from .insilico import DEFAULT_SNRS

    p = sub.add_parser(
        "rim",
        help="IRT1/MESE: RIM, ResNet and MLE bias and CV vs SNR, blur test, one RIM across TI lists (seed 004)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("out_dir", type=Path)
    p.add_argument("--models", nargs="+", default=["ir", "t2"], choices=["ir", "t2"])
    p.add_argument("--ir-times", nargs="+", type=float, default=list(IRT1_TIS), metavar="S",
                   help="inversion times (s); default: the synthetic dataset's")
    p.add_argument("--t2-times", nargs="+", type=float, default=list(MESE_TES), metavar="S",
                   help="echo times (s); default: the synthetic dataset's")
    p.add_argument("--methods", nargs="+", default=["rim", "resnet", "mle"], choices=["rim", "resnet", "mle"])
    p.add_argument("--snr", nargs="+", type=float, default=list(DEFAULT_SNRS))
    p.add_argument("--mc", type=int, default=100, help="noise realisations per SNR")
    p.add_argument("--size", type=int, default=64,
                   help="test image: the central SIZE×SIZE pixels (1.5 mm) of the axial slice with the most brain; "
                        "0: the whole slice (seed 004: a whole 256×256 slice)")
    p.add_argument("--noise", choices=["rician", "gaussian"], default="rician",
                   help="rician: magnitude of complex Gaussian noise (as the networks are trained); gaussian: real "
                        "Gaussian noise added to the magnitude model (seed 004 eq. 1)")
    p.add_argument("--blur-snr", type=float, default=10.0, help="SNR of the blur test (seed 004 Fig. 3: 10)")
    p.add_argument("--blur-mc", type=int, default=1600,
                   help="blur test: noise realisations for the RIM and ResNet (a 1-voxel structure's bias is one "
                        "pixel's mean over them; 1600 gives the RIM's hypo point a standard error of ≈ 0.3 %%, "
                        "reported as rel_bias_se); the MLE (slow) keeps --mc")
    p.add_argument("--mle-lambda-b", type=float, default=50.0,
                   help="IR MLE: Laplacian regularisation of B per image, as seed 004's MLE (its λ_B = 500 is in "
                        "another scaling); 0: voxel-wise fits")
    p.add_argument("--lists-snr", type=float, default=10.0)
    p.add_argument("--model-dir", type=Path, default=None,
                   help="cache for networks trained on the fly (only needed off the bundled TI/TE lists)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_run_insilico)


def _run_insilico(args, parser) -> int:
    if (args.mc < 2 or args.blur_mc < 2 or 0 < args.size < 32 or args.size < 0 or min(args.snr) <= 0
            or args.mle_lambda_b < 0):
        parser.exit(EXIT_USAGE, "bids_qmri-insilico: error: --mc and --blur-mc must be ≥ 2, --size 0 (whole slice) "
                                "or ≥ 32, SNRs positive and --mle-lambda-b ≥ 0\n")
    import torch

    from .insilico import run_relax_insilico

    torch.set_num_threads(1)
    models = {k: tuple(args.ir_times if k == "ir" else args.t2_times) for k in args.models}
    written = run_relax_insilico(args.out_dir, models=models, methods=tuple(args.methods), snrs=tuple(args.snr),
                                 n_mc=args.mc, size=args.size or None, blur_snr=args.blur_snr,
                                 lists_snr=args.lists_snr, model_dir=args.model_dir, seed=args.seed, noise=args.noise,
                                 mle_lambda_b=args.mle_lambda_b, blur_n_mc=args.blur_mc)
    for path in written:
        print(path)
    return 0
