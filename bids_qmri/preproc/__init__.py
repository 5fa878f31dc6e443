"""Plain, tested functions behind the preprocessing nodes (SPEC §6).

``complexdata``: load part pairs into complex series; ``motion``: rigid registration of the
volumes of a series; ``configurations``: receiver phase, SSFP configurations, Gibbs removal;
``denoise``: MP-PCA; ``mask``: brain mask; ``b1``: B1 conversion, registration, filtering and
resampling. The nipype interfaces (``bids_qmri.interfaces`` and each modality's
``interfaces``) are thin wrappers over these.
"""
