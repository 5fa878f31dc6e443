"""bids_qmri.utils"""
