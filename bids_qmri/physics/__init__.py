"""bids_qmri.physics"""
from bids_qmri.physics.bssfp import (  # noqa: E402,F401
    BSSFPModel,
    BSSFPProtocol,
    bssfp_signal,
    configurations,
    default_phase_increments,
    normalise_configurations,
    remove_receiver_phase,
    seed_protocol,
)
