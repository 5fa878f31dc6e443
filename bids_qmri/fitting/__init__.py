"""bids_qmri.fitting"""
