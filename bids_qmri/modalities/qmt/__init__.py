"""Quantitative magnetisation transfer in the hybrid state (seed 003; SPEC §3): frames as a part
pair, or SVD coefficients with their basis table, mapped by the residual MLP trained with the
Cramér–Rao-bound weighted loss (``qmtnet``, default), its MSE twin (``qmtnetmse``) and non-linear
least squares over all 8 parameters of the two-pool model (``qmtnls``, slow: not a default).

The pieces: ``protocol`` (schedule + basis hash), ``simulate`` (training sets with their CRBs),
``net`` (``ResidualMLP``), ``training`` (``train_qmtnet``), ``nls`` (``fit_nls``), ``estimate``
(the methods), ``workflow`` (nipype; the MRF plug-in's ``LoadFingerprints`` reads the part pair),
``insilico`` (``bids_qmri-insilico qmt``).
"""

from __future__ import annotations

from bids_qmri.bids.collect import collect_fingerprints, fingerprint_row
from bids_qmri.modalities.base import MapSpec, Method, Modality, RunOption

SUFFIX = "qMT"
REQUIRED = ("FlipAngle", "RFPulseDuration", "RepetitionTimeExcitation")


def _collect(sess, flists, layout, problems, check_content):
    """Fingerprint inputs whose schedule is usable (``protocol.schedule_problem``) and, in a real
    run, whose frames or basis rows match it; others are skipped with one line."""
    from bids_qmri.modalities.mrf import length_problem

    from .protocol import QMTProtocol, schedule_problem

    out = []
    for item in collect_fingerprints(layout, SUFFIX, REQUIRED, flists.get(SUFFIX, []), problems, check_content):
        problem = schedule_problem(item.metadata)
        if problem is None and check_content:
            problem = length_problem(item, QMTProtocol.from_dict(item.metadata).n_tr, "FlipAngle, RFPulseDuration")
        if problem:
            problems.skip(next(iter(item.part_files.values())), *problem)
            continue
        out.append(item)
    return out


def _plan_row(item, sess, config):
    return fingerprint_row(item, REQUIRED)


def _protocol(item):
    from bids_qmri.bids.basis import read_basis_tsv

    from .protocol import QMTProtocol

    basis = read_basis_tsv(item.basis_file) if item.basis_file else None
    return QMTProtocol.from_dict(item.metadata, basis=basis)


def _protocol_from_dict(d):
    from .protocol import QMTProtocol

    return QMTProtocol.from_dict(d)


def _estimate(name):
    def estimate(data, mask, protocol, context):
        from . import estimate as est

        return getattr(est, f"estimate_{name}")(data, mask, protocol, context)

    estimate.__name__ = f"estimate_{name}"
    return estimate


def _train(method):
    def train(protocol, seed=0, device="cpu"):
        """``method`` for a qMT schedule read through the training basis (the SVD of simulated
        fingerprints, ``estimate.training_basis``), the app's on-the-fly settings ``estimate.NET_TRAINING``."""
        from .estimate import NET_TRAINING, net_protocol, training_basis
        from .training import train_qmtnet

        basis = training_basis(protocol)
        return train_qmtnet(method, net_protocol(protocol, basis), basis, seed=seed, **NET_TRAINING)

    train.__name__ = f"train_{method}"
    return train


def _workflow(item, sess, config, name):
    from bids_qmri.bids.collect import b1_for

    from .workflow import init_qmt_wf

    return init_qmt_wf(item, b1_for(sess, item), sess.subject, sess.session, config, name=name)


def _planned_outputs(item, sess, config):
    from bids_qmri.modalities.mrf import fingerprint_outputs

    # qmtnls holds B1 at the session's B1 map when there is one: no fitted TB1map then
    skip = "_desc-qmtnls_TB1map." if sess.b1 else None
    return [p for p in fingerprint_outputs(MODALITY, item, sess, config) if not (skip and skip in str(p))]
def _add_train_arguments(parser):
    from .cli import add_train_arguments

    return add_train_arguments(parser)


def _train_from_args(args, parser):
    from .cli import train_from_args

    return train_from_args(args, parser)


def _add_insilico(sub):
    from .insilico import add_insilico_command

    return add_insilico_command(sub)


# Suffixes as the synthetic dataset's ground truth (synth.dataset.GT_MAPS); BIDS has none for
# m0s, T2s and Rx, so they are listed in the derivatives' .bidsignore (bids_suffix=False).
M0S = MapSpec("m0smap", "1", "semi-solid (macromolecular) pool fraction m0s / (m0s + m0f) of the two-pool model",
              quantity="m0s", bids_suffix=False)
T1 = MapSpec("T1map", "s", "apparent longitudinal relaxation time, shared by the free and the semi-solid pool",
             quantity="T1")
T2F = MapSpec("T2map", "s", "transverse relaxation time of the free pool (T2f)", quantity="T2")
T2S = MapSpec("T2smap", "s", "transverse relaxation time of the semi-solid pool (super-Lorentzian lineshape)",
              bids_suffix=False)
RX = MapSpec("Rxmap", "1/s", "exchange rate between the pools (forward rate kf = Rx * m0s)", bids_suffix=False)
B0 = MapSpec("fieldmap", "Hz", "off-resonance (Delta B0) of the free pool", datatype="fmap", quantity="B0")
B1 = MapSpec("TB1map", "1", "transmit field: achieved / nominal flip angle (fitted; without a B1 map only)",
             datatype="fmap")
M0 = MapSpec("M0map", "arbitrary", "modulus of the complex scale M0 (proton density x receive gain)")
_REFERENCE = ("Zhang X, Duchemin Q, Liu K, Gultekin C, Flassbeck S, Fernandez-Granda C, Asslander J. Cramer-Rao "
              "bound-informed training of neural networks for quantitative MRI. Magn Reson Med 2022;88:436-448. "
              "doi:10.1002/mrm.29206")
_NET = ("residual MLP (14 fully connected layers, group norm, ReLU, skip connections) on the unit-norm SVD "
        "coefficients -> m0s, T1, T2f; bundled for the synthetic dataset's schedule, trained on the fly for "
        "another (exact two-pool simulations, seed 003 distributions)")

METHODS = (
    Method("qmtnls",
           "non-linear least squares over all 8 parameters (m0s, T1, T2f, T2s, Rx, dB0, B1, complex M0; B1 held at "
           "the B1 map when there is one), batched Levenberg-Marquardt with the exact physics Jacobian, multi-start "
           "from the qmtnet estimate and a coarse grid. The gold standard, but slow: ~150 CPU-s per voxel on the "
           "1142-TR schedule (--qmt-nls-starts, --qmt-nls-iterations); not run unless named in --methods",
           _REFERENCE, (M0S, T1, T2F, T2S, RX, B0, B1, M0), _estimate("qmtnls"), default=False),
    Method("qmtnet", _NET + ", Cramer-Rao-bound weighted loss (seed 003)", _REFERENCE, (M0S, T1, T2F),
           _estimate("qmtnet"), _train("qmtnet")),
    Method("qmtnetmse", _NET + ", plain MSE loss (seed 003's comparison)", _REFERENCE, (M0S, T1, T2F),
           _estimate("qmtnetmse"), _train("qmtnetmse")),
)

MODALITY = Modality(
    name="qmt", title="qMT (hybrid state)", suffixes=(SUFFIX,), required_metadata={SUFFIX: REQUIRED},
    collect=_collect, plan_row=_plan_row, ref_suffix=SUFFIX,
    methods=METHODS, protocol=_protocol, protocol_from_dict=_protocol_from_dict,
    init_workflow=_workflow, planned_outputs=_planned_outputs,
    uses_b1=True, protocol_keys=REQUIRED, bidsignore=("*_qMT.*", "*_qMTbasis.*"),
    add_insilico_commands=_add_insilico,
    citations=(
        "Asslander J, Novikov DS, Lattanzi R, Sodickson DK, Cloos MA. Hybrid-state free precession in nuclear "
        "magnetic resonance. Commun Phys 2019;2:73. doi:10.1038/s42005-019-0174-0",
        "Henkelman RM, Huang X, Xiang QS, Stanisz GJ, Swanson SD, Bronskill MJ. Quantitative interpretation of "
        "magnetization transfer. Magn Reson Med 1993;29:759-766. doi:10.1002/mrm.1910290607",
    ),
    run_options=(
        RunOption("--qmt-nls-starts", "qmt_nls_starts", 1, type=int,
                  help="qMT qmtnls: best points of the coarse start grid refined per voxel besides the qmtnet "
                       "estimate (default 1; each start adds its Levenberg-Marquardt cost)"),
        RunOption("--qmt-nls-iterations", "qmt_nls_iterations", 40, type=int,
                  help="qMT qmtnls: Levenberg-Marquardt iterations per start (default 40; each costs one exact "
                       "Jacobian, ~0.3 CPU-s per voxel on the 1142-TR schedule)"),
    ),
    add_train_arguments=_add_train_arguments, train_from_args=_train_from_args,
)

MODALITIES = (MODALITY,)
