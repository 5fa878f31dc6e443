"""MPRAGE -> MRF synthesis (seed 002): seven 2D U-Nets turn a skull-stripped MPRAGE (T1w) into
the first four MRF SVD coefficients, which the MRF plug-in's dictionary matcher maps to T1/T2.

A plug-in of its own (its input is the T1w, not an MRF series). It reuses the ``mrf`` plug-in's
public pieces (``MRFProtocol``, the dictionary and ``estimate_dictmatch``) by importing them: a
plug-in may build on another plug-in; only the shared layers never name one.

The pieces: ``unet`` (the networks and the rescale table), ``protocol`` (the T1w's MPRAGE
protocol), ``simulate`` (phantom training pairs), ``training`` (on ``training.loop``), ``cli``
(``bids_qmri-train --method mprage2mrf``).

Status: the network, its training and the bundled model are in place; discovery does not yet
collect T1w inputs for this modality (``suffixes`` is empty), so ``bids_qmri`` does not run it.
"""

from __future__ import annotations

from bids_qmri.modalities.base import MapSpec, Method, Modality


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
           (T1, T2), _estimate, train=_train),
)

MODALITY = Modality(
    name="mprage2mrf", title="MPRAGE to MRF synthesis", suffixes=(), required_metadata={},
    collect=lambda *a, **k: [], plan_row=lambda *a, **k: ("", ""), ref_suffix="T1w",
    methods=METHODS, protocol_from_dict=_protocol_from_dict,
    protocol_keys=("InversionTime", "RepetitionTimePreparation", "FlipAngle"),
    add_train_arguments=_add_train, train_from_args=_train_from_args,
)

MODALITIES = (MODALITY,)
