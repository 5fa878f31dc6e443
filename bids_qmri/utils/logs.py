"""Logging set-up for the command-line tools (``-v`` raises verbosity)."""

from __future__ import annotations

import logging
import sys

LOGGER_NAME = "bids_qmri"


def setup_logging(verbose: int = 0, stream=None) -> logging.Logger:
    """Configure the ``bids_qmri`` logger: WARNING by default, INFO with -v, DEBUG with -vv."""
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    if not any(getattr(h, "_bids_qmri", False) for h in logger.handlers):
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s", "%H:%M:%S"))
        handler._bids_qmri = True
        logger.addHandler(handler)
    for h in logger.handlers:
        h.setLevel(level)
    # nipype is chatty at INFO (one line per node): shown with -v; its DEBUG only with -vvv.
    nipype_level = logging.DEBUG if verbose >= 3 else logging.INFO if verbose >= 1 else logging.WARNING
    for name in ("nipype.workflow", "nipype.interface", "nipype.utils"):
        logging.getLogger(name).setLevel(nipype_level)
    return logger
