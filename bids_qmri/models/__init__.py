"""bids_qmri.models"""
