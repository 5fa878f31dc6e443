"""bids_qmri.cli: the command-line entry points (thin argparse layers over the library)."""

import os

# No telemetry, ever: nipype's online version check stays off for every entry point.
os.environ.setdefault("NIPYPE_NO_ET", "1")
