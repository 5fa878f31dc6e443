"""bids_qmri: a BIDS-App that turns quantitative MRI acquisitions into quantitative maps."""

from bids_qmri.utils.itk import reproducible_itk_threads

__version__ = "0.1.0"
CODE_URL = "https://github.com/bids-qmri/bids_qmri"

# Before anything can load ANTs: ITK fixes its thread count at first use in a process, and
# seeded registrations are reproducible only single-threaded (see bids_qmri.utils.itk).
reproducible_itk_threads()
