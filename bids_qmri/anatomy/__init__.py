"""Anatomical processing as plain, tested functions (templates, atlases, registration,
segmentation, ROI statistics). The nipype workflows in ``bids_qmri.workflows.anat`` and
``bids_qmri.workflows.roi`` are thin wrappers over these."""
