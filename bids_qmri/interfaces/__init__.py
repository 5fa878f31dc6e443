"""bids_qmri.interfaces"""
