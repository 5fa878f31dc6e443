"""bids_qmri.group"""
