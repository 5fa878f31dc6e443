"""bids_qmri.physics"""
