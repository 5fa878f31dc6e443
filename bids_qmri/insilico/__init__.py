"""In-silico experiments that reproduce the seed papers' validations (``bids_qmri-insilico``)."""
