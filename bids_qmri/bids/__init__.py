"""bids_qmri.bids"""
