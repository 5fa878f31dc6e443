"""bids_qmri: a BIDS-App that turns quantitative MRI acquisitions into quantitative maps."""

__version__ = "0.1.0"
CODE_URL = "https://github.com/bids-qmri/bids_qmri"
