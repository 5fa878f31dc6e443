"""bids_qmri.synth"""
