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


# nipype's messages about a failed node (one carries the whole traceback), errors and warnings.
_CRASH_MESSAGES = ("Node %s failed to run on host", "Saving crash info to", "could not run node")
_CRASH_WARNINGS = ("[Node] Error on", "Storing result file without outputs")


class NipypeCrashFilter(logging.Filter):
    """Drops nipype's per-node crash messages (one carries the full traceback): the CLI prints
    one summary line per failed node instead (``crash_summary``); the traceback stays in the
    crash file, and on the terminal with ``-v``. Installed before nipype forks its workers,
    which inherit it."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg).lstrip()
        if record.levelno >= logging.ERROR:
            return not (msg.startswith(_CRASH_MESSAGES) or "Traceback (most recent call last)" in record.getMessage())
        return not (record.levelno >= logging.WARNING and msg.startswith(_CRASH_WARNINGS))


def quiet_nipype_crashes(verbose: int = 0) -> None:
    """Install ``NipypeCrashFilter`` on nipype's workflow logger unless ``verbose``."""
    logger = logging.getLogger("nipype.workflow")
    for f in [f for f in logger.filters if isinstance(f, NipypeCrashFilter)]:
        logger.removeFilter(f)
    if verbose <= 0:
        logger.addFilter(NipypeCrashFilter())


def crash_summary(crash_file) -> str:
    """One line from a nipype text crash file: ``<node> (<input file>): <exception message>``."""
    import re
    from pathlib import Path

    text = Path(crash_file).read_text(encoding="utf-8", errors="replace")
    node = re.search(r"^Node: (.+)$", text, re.M)
    node = node.group(1).strip() if node else Path(crash_file).name
    node = node.split(".", 1)[1] if node.startswith("bids_qmri_wf.") else node
    inputs = text.split("Node inputs:", 1)[1] if "Node inputs:" in text else ""
    source = ""
    for line in inputs.splitlines():
        key, sep, value = line.partition(" = ")
        value = value.strip().strip("'\"[]")
        if sep and value.startswith("/") and re.search(r"\.(nii(\.gz)?|json|tsv|h5|mat)$", value):
            source = Path(value).name
            if key.strip() in ("in_file", "in_files", "source", "t1w"):
                break
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b.*", ln)
              and not ln.startswith(("nipype.pipeline.engine.nodes.NodeExecutionError", "NodeExecutionError",
                                     "RuntimeError: Exception raised while executing Node"))]
    message = errors[-1] if errors else (lines[-1] if lines else "no message")
    return f"{node}" + (f" ({source})" if source else "") + f": {message[:300]}"
