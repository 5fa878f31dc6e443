"""Quantitative magnetisation transfer in the hybrid state (seed 003; SPEC §3): frames as a part
pair, or SVD coefficients with their basis table. This version discovers and checks these inputs
and lists them in the plan and the report; it has no mapping method yet (no ``methods``, no
workflow)."""

from __future__ import annotations

from bids_qmri.bids.collect import collect_fingerprints, fingerprint_row
from bids_qmri.modalities.base import Modality

SUFFIX = "qMT"
REQUIRED = ("FlipAngle", "RFPulseDuration", "RepetitionTimeExcitation")


def _collect(sess, flists, layout, problems, check_content):
    return collect_fingerprints(layout, SUFFIX, REQUIRED, flists.get(SUFFIX, []), problems, check_content)


def _plan_row(item, sess, config):
    return fingerprint_row(item, REQUIRED)


def _add_train_arguments(parser):
    from .cli import add_train_arguments

    return add_train_arguments(parser)


def _train_from_args(args, parser):
    from .cli import train_from_args

    return train_from_args(args, parser)


def _add_insilico(sub):
    from .insilico import add_insilico_command

    return add_insilico_command(sub)


MODALITY = Modality(
    name="qmt", title="qMT (hybrid state)", suffixes=(SUFFIX,), required_metadata={SUFFIX: REQUIRED},
    collect=_collect, plan_row=_plan_row, ref_suffix=SUFFIX,
    uses_b1=True, protocol_keys=REQUIRED, bidsignore=("*_qMT.*", "*_qMTbasis.*"),
    add_insilico_commands=_add_insilico,
    add_train_arguments=_add_train_arguments, train_from_args=_train_from_args,
)

MODALITIES = (MODALITY,)
