"""Plain, tested functions behind the pc-bSSFP preprocessing nodes (seeds 000/001, SPEC §6).

``complexdata``: load part pairs into complex series; ``motion``: rigid phase-cycle
registration; ``configurations``: receiver phase, SSFP configurations, Gibbs removal;
``mask``: brain mask; ``b1``: B1 conversion, registration, filtering and resampling.
The nipype interfaces in ``bids_qmri.interfaces.bssfp`` are thin wrappers over these.
"""
