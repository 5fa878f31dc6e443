"""MR fingerprinting (seed 002; SPEC §3, §6): FISP frames as a part pair, or SVD coefficients with
their basis table, mapped by dictionary matching (``dictmatch``, with Gauss–Newton refinement
inside the winning grid cell).

The pieces: ``protocol`` (the schedule, its checks), ``dictionary`` (grid, FISP-EPG atoms, SVD,
disk cache), ``estimate`` (the methods), ``net`` (mrfnet), ``cli`` (``bids_qmri-train --modality mrf
--method mrfnet``), ``interfaces`` + ``workflow`` (nipype). The solver is the generic
``bids_qmri.fitting.dictmatch``.
"""

from __future__ import annotations

from bids_qmri.bids.collect import collect_fingerprints, fingerprint_row
from bids_qmri.modalities.base import MapSpec, Method, Modality, RunOption

SUFFIX = "MRF"
REQUIRED = ("FlipAngle", "RepetitionTimeExcitation", "EchoTime", "InversionTime", "MRFSequenceType")


def _collect(sess, flists, layout, problems, check_content):
    from .protocol import schedule_problem

    out = []
    for item in collect_fingerprints(layout, SUFFIX, REQUIRED, flists.get(SUFFIX, []), problems, check_content):
        first = next(iter(item.part_files.values()))
        problem = schedule_problem(item.metadata)
        if problem is None and check_content:
            problem = _length_problem(item)
        if problem:
            problems.skip(first, *problem)
            continue
        out.append(item)
    return out


def _length_problem(item):
    from .protocol import MRFProtocol

    return length_problem(item, MRFProtocol.from_dict(item.metadata).n_frames)


def length_problem(item, n: int, schedule: str = "FlipAngle, RepetitionTimeExcitation"):
    """``(problem, fix)`` when the frames (or basis rows) of a fingerprint input disagree with the
    schedule's ``n`` frames (headers and the basis table only), else None; ``schedule`` names the
    sidecar lists that set ``n``."""
    from bids_qmri.bids.basis import read_basis_tsv
    from bids_qmri.bids.collect import header_volumes

    first = next(iter(item.part_files.values()))
    if item.basis_file is None:
        k = header_volumes(first)
        if k is not None and k != n:
            return (f"{k} frames but the sidecar schedule ({schedule}) has {n}",
                    f"give one value of {schedule} per frame")
        return None
    try:
        basis = read_basis_tsv(item.basis_file)
    except ValueError as exc:
        return str(exc).split(": ", 1)[-1], f"fix {item.basis_file.name}"
    k = header_volumes(first)
    if basis.shape[0] != n or (k is not None and basis.shape[1] != k):
        return (f"{item.basis_file.name} is {basis.shape[0]} frames x rank {basis.shape[1]} but the schedule has {n} "
                f"frames and the data {k} coefficients", "use the basis the coefficients were computed with")
    return None


def _plan_row(item, sess, config):
    return fingerprint_row(item, REQUIRED)


def _protocol(item):
    from .protocol import protocol

    return protocol(item)


def _protocol_from_dict(d):
    from .protocol import MRFProtocol

    return MRFProtocol.from_dict(d)


def _estimate_dictmatch(data, mask, protocol, context):
    from .estimate import estimate_dictmatch

    return estimate_dictmatch(data, mask, protocol, context)


def _estimate_mrfnet(data, mask, protocol, context):
    from .estimate import estimate_mrfnet

    return estimate_mrfnet(data, mask, protocol, context)


def _train_mrfnet(protocol, seed=0, device="cpu"):
    """mrfnet for an MRF protocol read through the dictionary's own SVD basis at B1 = 1 (CRB loss,
    the app's on-the-fly settings ``estimate.NET_TRAINING``)."""
    from . import estimate
    from .cli import training_basis
    from .net import NetProtocol, basis_key, train_mrfnet

    basis = training_basis(protocol)
    return train_mrfnet(NetProtocol(protocol, basis_key(basis), "crb"), basis, seed=seed, **estimate.NET_TRAINING)


def _add_train_arguments(parser):
    from .cli import add_train_arguments

    return add_train_arguments(parser)


def _train_from_args(args, parser):
    from .cli import train_from_args

    return train_from_args(args, parser)


def _workflow(item, sess, config, name):
    from bids_qmri.bids.collect import b1_for

    from .workflow import init_mrf_wf

    return init_mrf_wf(item, b1_for(sess, item), sess.subject, sess.session, config, name=name)


def _report_figures(fig_dir, prefix):
    out = []
    for png in sorted(fig_dir.glob(f"{prefix}_*_fingerprints.png")):
        out.append({"section": "MR fingerprinting", "title": f"Fingerprint fits: {png.name[:-len('_fingerprints.png')]}",
                    "path": png, "caption": "Measured |fingerprint| (grey; SVD coefficients expanded with their basis) "
                                            "and the fit M0 * FISP-EPG(T1, T2, B1) of the maps (red) at four voxels "
                                            "at the 10-90 % quantiles of T1."})
    return out


def _add_insilico(sub):
    from .insilico import add_insilico_command

    return add_insilico_command(sub)


def _planned_outputs(item, sess, config):
    return fingerprint_outputs(MODALITY, item, sess, config)


def fingerprint_outputs(modality, item, sess, config) -> list:
    """Files ``mrf.workflow.init_fingerprint_wf`` writes for ``modality`` (this plug-in and those built
    on it): reference image, mask, B1 as used, every map of the selected methods (and the
    magnitude image ``EstimateMaps`` writes beside a fieldmap)."""
    from bids_qmri.bids.derivatives import derivative_path

    kw = dict(subject=sess.subject, session=sess.session, acq=item.acq)
    ref = modality.ref_suffix
    out = [derivative_path("", **kw, suffix=ref, desc="ref"), derivative_path("", **kw, suffix="mask", desc="brain")]
    if sess.b1:
        out.append(derivative_path("", **kw, datatype="fmap", suffix="TB1map", desc=ref.lower()))
    for m in (config.methods or {}).get(modality.name, ()):
        for spec in modality.method(m).maps:
            out.append(derivative_path("", **kw, datatype=spec.datatype, suffix=spec.suffix, desc=m))
            if spec.suffix == "fieldmap":
                out.append(derivative_path("", **kw, datatype="fmap", suffix="magnitude"))
    return list(dict.fromkeys(out))


T1 = MapSpec("T1map", "s", "longitudinal relaxation time", quantity="T1")
T2 = MapSpec("T2map", "s", "transverse relaxation time", quantity="T2")
M0 = MapSpec("M0map", "arbitrary", "proton density x receive gain: modulus of the complex scale between the "
                                   "fingerprint and its dictionary atom")
_REFERENCE = ("Ma D, Gulani V, Seiberlich N, et al. Magnetic resonance fingerprinting. Nature 2013;495:187-192. "
              "doi:10.1038/nature11971; Jiang Y, Ma D, Seiberlich N, Gulani V, Griswold MA. MR fingerprinting "
              "using FISP with spiral readout. Magn Reson Med 2015;74:1621-1631. doi:10.1002/mrm.25559")

METHODS = (
    Method("dictmatch",
           "dictionary matching (maximum normalised inner product over a FISP-EPG dictionary at the voxel's B1, "
           "SVD-compressed, exact argmax) with Gauss-Newton refinement inside the winning grid cell",
           _REFERENCE, (T1, T2, M0), _estimate_dictmatch),
    Method("mrfnet",
           "MLP on the unit-norm SVD coefficients and B1 -> log T1, log T2 (M0 from the predicted norm), trained on the "
           "fly for the schedule and basis (CRB-weighted or MSE loss, --mrf-net-loss)",
           _REFERENCE + "; Zhang X, Duchemin Q, Liu K, et al. Cramer-Rao bound-informed training of neural networks "
                        "for quantitative MRI. Magn Reson Med 2022;88:436-448. doi:10.1002/mrm.29206",
           (T1, T2, M0), _estimate_mrfnet, _train_mrfnet, default=False),
)

MODALITY = Modality(
    name="mrf", title="MR fingerprinting", suffixes=(SUFFIX,), required_metadata={SUFFIX: REQUIRED},
    collect=_collect, plan_row=_plan_row, ref_suffix=SUFFIX,
    methods=METHODS, protocol=_protocol, protocol_from_dict=_protocol_from_dict,
    init_workflow=_workflow, planned_outputs=_planned_outputs, report_figures=_report_figures,
    add_insilico_commands=_add_insilico,
    add_train_arguments=_add_train_arguments, train_from_args=_train_from_args,
    uses_b1=True, protocol_keys=("MRFSequenceType", "EchoTime", "InversionTime"),
    bidsignore=("*_MRF.*", "*_MRFbasis.*"),
    citations=(
        "McGivney DF, Pierre E, Ma D, Jiang Y, Saybasili H, Gulani V, Griswold MA. SVD compression for magnetic "
        "resonance fingerprinting in the time domain. IEEE Trans Med Imaging 2014;33(12):2311-2322. "
        "doi:10.1109/TMI.2014.2337321",
        "Weigel M. Extended phase graphs: dephasing, RF pulses, and echoes - pure and simple. J Magn Reson Imaging "
        "2015;41(2):266-295. doi:10.1002/jmri.24619",
    ),
    run_options=(
        RunOption("--mrf-refine", "mrf_refine", "on", choices=("on", "off"),
                  help="MRF dictmatch: Gauss-Newton refinement of T1/T2 inside the winning dictionary cell at the "
                       "voxel's own B1 (on, default) or plain grid matching (off)"),
        RunOption("--mrf-refine-model", "mrf_refine_model", "dictionary", choices=("dictionary", "epg"),
                  help="MRF dictmatch refinement model: an interpolant of the dictionary's own atoms (dictionary, "
                       "default; microseconds per voxel) or the EPG simulated at the voxel's B1 (epg; milliseconds "
                       "per voxel)"),
        RunOption("--mrf-grid-steps", "mrf_grid_steps", 80, type=int,
                  help="MRF dictionary: log-spaced grid points over T1 0.1-5 s and over T2 0.01-2 s (T2 < T1); "
                       "default 80"),
        RunOption("--mrf-net-loss", "mrf_net_loss", "crb", choices=("crb", "mse"),
                  help="MRF mrfnet: training loss, Cramer-Rao-bound weighted (crb, seed 003) or plain MSE"),
        RunOption("--mrf-b1-step", "mrf_b1_step", 0.05, type=float,
                  help="MRF dictionary: B1 grid step over 0.6-1.4 (each voxel matched at its nearest B1 value); "
                       "default 0.05"),
    ),
)

MODALITIES = (MODALITY,)
