"""Relaxometry series (seed 004): inversion-recovery T1 (``IRT1``, ``inv-<i>``) and multi-echo
spin-echo T2 (``MESE``, ``echo-<i>``), mapped by maximum likelihood (``mle``, the default) and by
the learned estimators of seed 004: the recurrent inference machine (``rim``) and the ResNet
baseline (``resnet``), run when ``--methods`` names them (``rim``, ``simulate``, ``training``,
``models``, ``cli``).

Two modalities in one folder: they share the collector (``inputs``), the workflow (load, motion
correction between the files, brain mask, estimate, derivatives) and the batched solver
(``mle``); they differ in the model and the maps.
"""

from __future__ import annotations

from functools import partial

from bids_qmri.modalities.base import MapSpec, Method, Modality, RunOption

from . import inputs


def _estimate_ir(data, mask, protocol, context):
    from .estimate import estimate_ir

    return estimate_ir(data, mask, protocol, context)


def _estimate_t2(data, mask, protocol, context):
    from .estimate import estimate_t2

    return estimate_t2(data, mask, protocol, context)


def _estimate_learned(method, data, mask, protocol, context):
    from .estimate import estimate_learned

    return estimate_learned(method, data, mask, protocol, context)


def _train(method, protocol, seed=0, device="cpu"):
    from .models import train_on_the_fly

    return train_on_the_fly(method, protocol, seed=seed)


def _add_train_arguments(parser):
    from .cli import add_train_arguments

    return add_train_arguments(parser)


def _train_from_args(modality, args, parser):
    from .cli import train_from_args_for

    return train_from_args_for(modality)(args, parser)


def _add_insilico(sub):
    from .cli import add_insilico_command

    return add_insilico_command(sub)


def _learned(kind_maps):
    rim_text = ("recurrent inference machine: 6 steps of a convolutional GRU cell on the estimate and the autograd "
                "likelihood gradient, slice by slice (seed 004)")
    resnet_text = "ResNet baseline: residual blocks of 3x3 convolutions from the series to the maps (seed 004)"
    return (Method("rim", rim_text, REFERENCE, kind_maps[0], partial(_estimate_learned, "rim"), partial(_train, "rim"),
                   default=False),
            Method("resnet", resnet_text, REFERENCE, kind_maps[1], partial(_estimate_learned, "resnet"),
                   partial(_train, "resnet"), default=False))


def _collector(kind):
    def collect(sess, flists, layout, problems, check_content):
        return inputs.collect(kind, sess, flists, layout, problems, check_content)

    return collect


def _workflow(item, sess, config, name):
    from .workflow import init_relax_wf

    modality = IRT1 if item.kind == "IRT1" else MESE
    return init_relax_wf(item, modality, sess.subject, sess.session, config, name=name)


def _planned_outputs(item, sess, config):
    from bids_qmri.bids.derivatives import derivative_path

    modality = IRT1 if item.kind == "IRT1" else MESE
    kw = dict(subject=sess.subject, session=sess.session, acq=item.acq)
    out = [derivative_path("", **kw, suffix=modality.ref_suffix, desc="ref"),
           derivative_path("", **kw, suffix="mask", desc="brain"),
           derivative_path("", **kw, suffix=modality.ref_suffix, extension=".tsv", desc="motion")]
    for m in (config.methods or {}).get(modality.name, ()):
        out += [derivative_path("", **kw, datatype=spec.datatype, suffix=spec.suffix, desc=m)
                for spec in modality.method(m).maps]
    return out


REFERENCE = ("Sabidussi ER, Klein S, Caan MWA, Bazrafkan S, den Dekker AJ, Sijbers J, Niessen WJ, Poot DHJ. "
             "Recurrent inference machines as inverse problem solvers for MR relaxometry. Med Image Anal "
             "2021;74:102220. doi:10.1016/j.media.2021.102220")
CITATIONS = (
    REFERENCE,
    "Barral JK, Gudmundson E, Stikov N, Etezadi-Amoli M, Stoica P, Nishimura DG. A robust methodology for in vivo "
    "T1 mapping. Magn Reson Med 2010;64(4):1057-1067. doi:10.1002/mrm.22497 (polarity restoration)",
)
M0 = MapSpec("M0map", "arbitrary", "signal amplitude A of the model (proton density × receive gain, T1 "
                                   "weighting of the repetition time included)")
IR_MAPS = (MapSpec("T1map", "s", "longitudinal relaxation time", quantity="T1"), M0,
           MapSpec("IEmap", "1", "inversion efficiency B of |A(1 - B exp(-TI/T1))| (2 = perfect inversion)",
                   bids_suffix=False))
T2_MAPS = (MapSpec("T2map", "s", "transverse relaxation time", quantity="T2"), M0)

IRT1 = Modality(
    name="irt1",
    title="inversion-recovery T1",
    suffixes=("IRT1",),
    required_metadata={"IRT1": ("InversionTime",)},
    collect=_collector(inputs.IRT1),
    plan_row=inputs.plan_row,
    ref_suffix="IRT1",
    methods=(Method(
        "mle", "maximum-likelihood fit of |A(1 - B exp(-TI/T1))| (batched Levenberg-Marquardt, polarity restoration)",
        REFERENCE,
        IR_MAPS, _estimate_ir), *_learned((IR_MAPS, IR_MAPS))),
    protocol=inputs.protocol,
    protocol_from_dict=inputs.SeriesProtocol.from_dict,
    init_workflow=_workflow,
    planned_outputs=_planned_outputs,
    protocol_keys=("InversionTimes",),
    bidsignore=("*_desc-ref_IRT1.*", "*_desc-motion_IRT1.*"),
    citations=CITATIONS,
    run_options=(
        RunOption("--relax-likelihood", "relax_likelihood", "gaussian", choices=("gaussian", "rician"),
                  help="likelihood of the inversion-recovery and multi-echo T2 fits: gaussian (least squares, "
                       "seed 004) or rician (magnitude noise, for low-SNR tails)"),
        RunOption("--relax-sigma", "relax_sigma", None, type=float,
                  help="noise σ per real channel in image units for the Rician likelihood; unset: estimated "
                       "from the series' background voxels"),
        RunOption("--relax-lambda-b", "relax_lambda_b", 0.0, type=float,
                  help="Laplacian regularisation λ_B of the inversion efficiency B (seed 004), in nats per "
                       "unit² of the Laplacian; 0: voxel-wise"),
        RunOption("--relax-train-iterations", "relax_train_iterations", None, type=int,
                  help="rim/resnet for a series without a bundled model: mini-batches of 24 patches to train on "
                       "the fly (default: rim 200, resnet 600; about 8 and 5 CPU minutes on one thread)"),
    ),
    add_train_arguments=_add_train_arguments,
    train_from_args=partial(_train_from_args, "irt1"),
    add_insilico_commands=_add_insilico,
)

MESE = Modality(
    name="mese",
    title="multi-echo spin-echo T2",
    suffixes=("MESE",),
    required_metadata={"MESE": ("EchoTime",)},
    collect=_collector(inputs.MESE),
    plan_row=inputs.plan_row,
    ref_suffix="MESE",
    methods=(Method(
        "mle", "maximum-likelihood fit of |A exp(-TE/T2)| (log-linear start, batched Levenberg-Marquardt)",
        REFERENCE,
        T2_MAPS, _estimate_t2), *_learned((T2_MAPS, T2_MAPS))),
    protocol=inputs.protocol,
    protocol_from_dict=inputs.SeriesProtocol.from_dict,
    init_workflow=_workflow,
    planned_outputs=_planned_outputs,
    protocol_keys=("EchoTime",),
    bidsignore=("*_desc-ref_MESE.*", "*_desc-motion_MESE.*"),
    citations=CITATIONS,
    train_from_args=partial(_train_from_args, "mese"),
)

MODALITIES = (IRT1, MESE)
