"""MPRAGE -> MRF synthesis (seed 002): seven 2D U-Nets turn a skull-stripped MPRAGE (T1w) into
the first four MRF SVD coefficients, which the MRF plug-in's dictionary matcher maps to T1/T2.

A plug-in of its own (its input is the T1w, not an MRF series). It reuses the ``mrf`` plug-in's
public pieces (``MRFProtocol``, the dictionary and ``estimate_dictmatch``) by importing them: a
plug-in may build on another plug-in; only the shared layers never name one.

The pieces: ``unet`` (the networks and the rescale table), ``protocol`` (the T1w's MPRAGE
protocol), ``simulate`` (phantom training pairs), ``training`` (on ``training.loop``), ``cli``
(``bids_qmri-train --method mprage2mrf``).

Inputs: the session's first T1w (the one the anatomy uses) when its sidecar has the MPRAGE
timing; the workflow takes the anatomy's preprocessed T1w and brain mask through its
``inputnode``. Not a default method (``--methods mprage2mrf`` runs it): it is a synthesis, not a
measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bids_qmri.modalities.base import MapSpec, Method, Modality, RunOption

SUFFIX = "T1w"


@dataclass
class T1wInput:
    """The T1w (MPRAGE) a participant's mprage2mrf maps are synthesised from."""

    acq: str | None
    files: list[Path]
    metadata: dict = field(default_factory=dict)


def _collect(sess, flists, layout, problems, check_content):
    from .protocol import protocol_problem

    files = flists.get(SUFFIX, [])
    if not files:
        return []
    first = files[0]  # the anatomy workflow uses the first T1w too
    meta = first.get_metadata()
    problem = protocol_problem(meta)
    if problem:
        if check_content:
            sess.notes.append(f"{Path(first.path).name}: no mprage2mrf maps: {problem[0]} ({problem[1]})")
        return []
    return [T1wInput(first.entities.get("acquisition"), [Path(first.path)], dict(meta))]


def _plan_row(item, sess, config):
    from .protocol import MPRAGEProtocol

    return item.files[0].name, MPRAGEProtocol.from_dict(item.metadata).describe()


def _protocol(item):
    from .protocol import MPRAGEProtocol

    return MPRAGEProtocol.from_dict(item.metadata)


def _workflow(item, sess, config, name):
    from .workflow import init_mprage2mrf_wf

    return init_mprage2mrf_wf(item, sess.subject, sess.session, config, name=name)


def _planned_outputs(item, sess, config):
    from bids_qmri.bids.derivatives import derivative_path

    kw = dict(subject=sess.subject, session=sess.session, acq=item.acq)
    out = [derivative_path("", **kw, suffix=SUFFIX, desc="ref"), derivative_path("", **kw, suffix="mask", desc="brain")]
    for m in (config.methods or {}).get(MODALITY.name, ()):
        out += [derivative_path("", **kw, datatype=spec.datatype, suffix=spec.suffix, desc=m)
                for spec in MODALITY.method(m).maps]
    return out


def _train(protocol, seed=0, device="cpu"):
    from .training import Mprage2MRFTrainConfig, train_mprage2mrf

    return train_mprage2mrf(protocol, Mprage2MRFTrainConfig(seed=seed))


def _estimate(data, mask, protocol, context):
    from .estimate import estimate_mprage2mrf

    return estimate_mprage2mrf(data, mask, protocol, context)


def _protocol_from_dict(d):
    from .protocol import MPRAGEProtocol

    return MPRAGEProtocol.from_dict(d)


def _add_train(parser):
    from .cli import add_train_arguments

    add_train_arguments(parser)


def _train_from_args(args, parser):
    from .cli import train_from_args

    return train_from_args(args, parser)


T1 = MapSpec("T1map", "s", "longitudinal relaxation time (synthesised MRF, dictionary matching)", quantity="T1")
T2 = MapSpec("T2map", "s", "transverse relaxation time (synthesised MRF, dictionary matching)", quantity="T2")

METHODS = (
    Method("mprage2mrf",
           "seven 2D U-Nets (SV1 real; SV2-4 real and imaginary) synthesise the first four MRF SVD coefficients "
           "from the skull-stripped MPRAGE normalised to [0, 1], rescaled with the training min/max table, then "
           "dictionary matching over the FISP-EPG dictionary of the model's MRF schedule at B1 = 1",
           "McGee KP, Sui Y, Witte RJ, et al. Synthesis of MR fingerprinting information from magnitude-only MR "
           "imaging data using a parallelized, multi network U-Net convolutional neural network. Front Radiol "
           "2024;4:1498411. doi:10.3389/fradi.2024.1498411",
           (T1, T2), _estimate, train=_train, default=False),
)

MODALITY = Modality(
    name="mprage2mrf", title="MPRAGE to MRF synthesis", suffixes=(SUFFIX,), required_metadata={},
    collect=_collect, plan_row=_plan_row, ref_suffix=SUFFIX,
    methods=METHODS, protocol=_protocol, protocol_from_dict=_protocol_from_dict,
    init_workflow=_workflow, planned_outputs=_planned_outputs,
    run_options=(
        RunOption("--mprage2mrf-refine", "mprage2mrf_refine", "off", choices=("on", "off"),
                  help="mprage2mrf: Gauss-Newton refinement of the matched T1/T2 (as --mrf-refine; off by default: "
                       "the synthesised coefficients are smooth and the refinement costs an EPG simulation per voxel)"),
        RunOption("--mprage2mrf-train-on-cohort", "mprage2mrf_train_on_cohort", "off", choices=("on", "off"),
                  help="mprage2mrf: fine-tune the U-Nets on this dataset's participants that have both a T1w and MRF "
                       "maps (read from the output folder: run the participant level with the MRF maps first) and "
                       "map with it; leave-one-out: a participant's maps never come from a model trained on its own "
                       "data; models cached per training set in --model-dir"),
        RunOption("--mprage2mrf-cohort-epochs", "mprage2mrf_cohort_epochs", 10, type=int,
                  help="mprage2mrf: fine-tuning epochs over the cohort's slices (--mprage2mrf-train-on-cohort on)"),
        RunOption("--mprage2mrf-grid-steps", "mprage2mrf_grid_steps", 80, type=int,
                  help="mprage2mrf: log-spaced dictionary grid points over T1 and T2 (as --mrf-grid-steps)"),
    ),
    protocol_keys=("InversionTime", "RepetitionTimePreparation", "FlipAngle"),
    add_train_arguments=_add_train, train_from_args=_train_from_args,
)

MODALITIES = (MODALITY,)
