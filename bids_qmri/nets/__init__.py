"""bids_qmri.nets"""
