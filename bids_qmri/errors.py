"""Exceptions that carry a one-line, actionable message for the user.

The CLI turns these into ``bids_qmri: error: <message>`` and an exit code; anything else is an
internal error and gets a crash report file (see ``bids_qmri.cli.run``).
"""

from __future__ import annotations

# Exit codes of every bids_qmri command (documented in the README).
EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug: a crash report file is written
EXIT_USAGE = 2  # bad command line or unusable BIDS/output directory (argparse uses 2 too)
EXIT_INPUT = 3  # --stop-on-first-crash and an input was unusable, or no usable input at all
EXIT_FAILED = 4  # the workflow ran but some participant/session failed


class BidsQmriError(Exception):
    """Base class: ``str(err)`` is a one-line message naming the file, the problem and the fix."""

    exit_code = EXIT_USAGE


class UsageError(BidsQmriError):
    """The command line or the directories given cannot work (e.g. output dir inside BIDS dir)."""

    exit_code = EXIT_USAGE


class InputError(BidsQmriError):
    """One input (file or file group) is unusable. Normally logged and skipped."""

    exit_code = EXIT_INPUT

    def __init__(self, path, problem: str, fix: str = ""):
        self.path = str(path)
        self.problem = problem
        self.fix = fix
        msg = f"{self.path}: {problem}"
        if fix:
            msg += f" — {fix}"
        super().__init__(msg)


class WorkflowError(BidsQmriError):
    """The processing of a participant failed (the message names the participant and the step)."""

    exit_code = EXIT_FAILED
