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
from bids_qmri.physics.mprage import default_mprage_protocol, mprage_signal  # noqa: F401
from bids_qmri.physics.noise import add_complex_noise, add_rician_noise, noise_sigma  # noqa: F401
from bids_qmri.physics.relaxation import inversion_recovery, t2_decay  # noqa: F401
from bids_qmri.physics.epg import default_fisp_schedule, fisp_mrf  # noqa: F401
from bids_qmri.physics.svd import compress, expand, svd_basis  # noqa: F401
# `crb` stays the submodule (its function of the same name is `crb.crb`).
from bids_qmri.physics.crb import crb_weighted_loss, fisher_information  # noqa: F401
from bids_qmri.physics.qmt import default_qmt_schedule, hybrid_state_signal, saturation_rate  # noqa: F401
