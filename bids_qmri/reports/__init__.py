"""bids_qmri.reports"""
