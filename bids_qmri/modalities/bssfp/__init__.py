"""pc-bSSFP relaxometry (seeds 000/001): T1, T2 and ΔB0 from phase-cycled balanced SSFP with
MIRACLE and four networks (SVNN, PINN and their complex-valued variants).

The modality's declaration (``bids_qmri.modalities.base``); the pieces live beside it:
``inputs`` (BIDS files and the plan), ``workflow`` (nipype), ``interfaces`` (preprocessing
nodes), ``estimate`` (the methods), ``net`` / ``training`` / ``models`` (the networks),
``cli`` (``bids_qmri-train`` and ``bids_qmri-insilico bssfp``), ``insilico`` (seed experiments).
"""

from __future__ import annotations

from functools import partial

from bids_qmri.modalities.base import MapSpec, Method, Modality, RunOption

from . import inputs


def _estimate(method, data, mask, protocol, context):
    from .estimate import estimate

    return estimate(method, data, mask, protocol, context)


def _train(method, protocol, seed=0, device="cpu"):
    from .models import train_on_the_fly

    return train_on_the_fly(method, protocol, seed=seed, device=device)


def _protocol(item):
    from bids_qmri.physics.bssfp import BSSFPProtocol

    return BSSFPProtocol.from_input(item)


def _protocol_from_dict(d: dict):
    from bids_qmri.physics.bssfp import BSSFPProtocol

    return BSSFPProtocol.from_sidecar(d)


def _workflow(item, sess, config, name):
    from bids_qmri.bids.collect import b1_for

    from .workflow import init_bssfp_wf

    return init_bssfp_wf(item, b1_for(sess, item), sess.subject, sess.session, config, name=name)


def _add_train_arguments(parser):
    from .cli import add_train_arguments

    return add_train_arguments(parser)


def _train_from_args(args, parser):
    from .cli import train_from_args

    return train_from_args(args, parser)


def _add_insilico(sub):
    from .cli import add_insilico_command

    return add_insilico_command(sub)


T1 = MapSpec("T1map", "s", "longitudinal relaxation time", quantity="T1")
T2 = MapSpec("T2map", "s", "transverse relaxation time", quantity="T2")
B0 = MapSpec("fieldmap", "Hz", "off-resonance (ΔB0)", datatype="fmap", quantity="B0")

_BIRK = ("Birk F, Mahler L, Steiglechner J, Wang Q, Scheffler K, Heule R. Flexible and cost-effective deep learning "
         "for accelerated multi-parametric relaxometry using phase-cycled bSSFP. Sci Rep 2025;15:4825. "
         "doi:10.1038/s41598-025-88579-z (preprint: doi:10.21203/rs.3.rs-4049684/v1)")
METHODS = (
    Method("miracle",
           "MIRACLE: T1 and T2 from the magnitudes of the SSFP configurations F-1, F0, F1 with B1-scaled flip "
           "angle; the fixed point of the alternating golden-section searches in closed form, golden section "
           "where it lies outside [0, 5] s (vectorised over voxels)",
           "Nguyen D, Bieri O. Motion-insensitive rapid configuration relaxometry. Magn Reson Med 2017;78:518-526. "
           "doi:10.1002/mrm.26384",
           (T1, T2), partial(_estimate, "miracle")),
    Method("svnn", "SVNN: MLP 4-64-64-2 on |F-1|, |F0|, |F1|, B1 trained on simulated signals with a parameter loss",
           _BIRK, (T1, T2), partial(_estimate, "svnn"), partial(_train, "svnn")),
    Method("pinn", "PINN: MLP 4-64-64-2 on |F-1|, |F0|, |F1|, B1 trained on simulated signals with a "
                   "physics-informed signal loss",
           _BIRK, (T1, T2), partial(_estimate, "pinn"), partial(_train, "pinn")),
    Method("svnncomplex", "SVNN complex: MLP 6-256-256-3 on Re/Im of F-1, F0, F1 and B1 (T1, T2, off-resonance), "
                          "parameter loss",
           _BIRK, (T1, T2, B0), partial(_estimate, "svnncomplex"), partial(_train, "svnncomplex")),
    Method("pinncomplex", "PINN complex: MLP 6-256-256-3 on Re/Im of F-1, F0, F1 and B1 (T1, T2, off-resonance), "
                          "physics-informed signal loss",
           _BIRK, (T1, T2, B0), partial(_estimate, "pinncomplex"), partial(_train, "pinncomplex")),
)

MODALITY = Modality(
    name="bssfp",
    title="pc-bSSFP",
    suffixes=("bSSFP",),
    required_metadata={"bSSFP": inputs.REQUIRED},
    collect=inputs.collect,
    protocol=_protocol,
    protocol_from_dict=_protocol_from_dict,
    methods=METHODS,
    init_workflow=_workflow,
    planned_outputs=inputs.planned_outputs,
    plan_row=inputs.plan_row,
    ref_suffix="bSSFP",
    uses_b1=True,
    protocol_keys=("RepetitionTimeExcitation", "EchoTime", "FlipAngle", "PhaseIncrements"),
    bidsignore=("*_bSSFP.*",),
    citations=(
        _BIRK,
        "Veraart J, Novikov DS, Christiaens D, Ades-Aron B, Sijbers J, Fieremans E. Denoising of diffusion MRI using random matrix theory. NeuroImage 2016;142:394-406. doi:10.1016/j.neuroimage.2016.08.016 (MP-PCA of the pc-bSSFP phase cycles)",
        "Kellner E, Dhital B, Kiselev VG, Reisert M. Gibbs-ringing artifact removal based on local subvoxel-shifts. Magn Reson Med 2016;76(5):1574-1581. doi:10.1002/mrm.26054",
        "Garyfallidis E, Brett M, Amirbekian B, et al. Dipy, a library for the analysis of diffusion MRI data. Front Neuroinform 2014;8:8. doi:10.3389/fninf.2014.00008 (MP-PCA and Gibbs-ringing implementations)",
    ),
    run_options=(
        RunOption("--bssfp-denoise", "bssfp_denoise", "mppca", choices=("mppca", "none"),
                  help="denoising of the raw pc-bSSFP phase cycles before motion correction: MP-PCA on the "
                       "real and imaginary parts (default), or none"),
        RunOption("--bssfp-models", "bssfp_models", "default", choices=("default", "seed"),
                  help="bundled pc-bSSFP networks: default (trained on brain tissue with CSF partial volume, "
                       "T1 0.25-5 s, T2 15 ms-2.5 s, B1 0.6-1.4, log-scaled outputs) or seed (the seed papers' "
                       "range T1 0.36-2.08 s, T2 20-120 ms, which clips CSF partial volume; reproduces their "
                       "figures)"),
    ),
    add_train_arguments=_add_train_arguments,
    train_from_args=_train_from_args,
    add_insilico_commands=_add_insilico,
)

MODALITIES = (MODALITY,)
