"""bids_qmri.workflows"""
