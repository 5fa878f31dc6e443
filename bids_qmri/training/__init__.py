"""bids_qmri.training"""
