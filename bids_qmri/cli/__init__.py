"""bids_qmri.cli"""
