"""Progress a person can follow while nipype runs the participant workflows.

``Progress`` is nipype's ``status_callback`` (called in the main process when a node starts, ends
or fails): one line per finished step — elapsed time, steps done / total, participant, session,
the sub-workflow (modality and acquisition) and the step — on stderr. With ``-v`` the start of
every step is printed too. Steps restored from the work directory's cache count as done at once,
so a resumed run shows where it picks up.
"""

from __future__ import annotations

import sys
import threading
import time

_PREFIX = "bids_qmri"


def count_steps(workflow) -> int:
    """Nodes nipype will run: identity nodes are pruned from the execution graph."""
    from nipype.interfaces.utility import IdentityInterface

    return sum(1 for node in workflow._get_all_nodes() if not isinstance(node.interface, IdentityInterface))


def describe_node(fullname: str) -> str:
    """``bids_qmri_wf.sub_01_wf.single_subject_01_ses_02_wf.bssfp_pc12_wf.estimate_miracle`` ->
    ``sub-01 ses-02 · bssfp_pc12 · estimate_miracle``."""
    parts = fullname.split(".")
    where, inner = [], []
    for part in parts[1:-1]:
        if part.startswith("single_subject_"):
            label = part[len("single_subject_"):].removesuffix("_wf")
            sub, _, ses = label.partition("_ses_")
            where = [f"sub-{sub}"] + ([f"ses-{ses}"] if ses else [])
        elif not part.startswith("sub_"):
            inner.append(part.removesuffix("_wf"))
    return " · ".join([" ".join(where)] * bool(where) + inner + [parts[-1]])


class Progress:
    def __init__(self, total: int, *, verbose: int = 0, stream=None, clock=time.monotonic):
        self.total = max(int(total), 1)
        self.verbose = verbose
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.started = clock()
        self.done = 0
        self.failed = 0
        self._lock = threading.Lock()

    def _elapsed(self) -> str:
        seconds = int(self.clock() - self.started)
        return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

    def _print(self, text: str) -> None:
        print(f"{_PREFIX}: [{self._elapsed()}] {text}", file=self.stream, flush=True)

    def __call__(self, node, status: str) -> None:
        with self._lock:
            what = describe_node(getattr(node, "fullname", str(node)))
            if status == "start":
                if self.verbose:
                    self._print(f"{self.done}/{self.total} started {what}")
            elif status == "end":
                self.done += 1
                self._print(f"{self.done}/{self.total} {what} done")
            elif status == "exception":
                self.done += 1
                self.failed += 1
                self._print(f"{self.done}/{self.total} {what} FAILED (details in the crash file)")

    def summary(self) -> str:
        return (f"{self.done} of {self.total} steps run in {self._elapsed()}"
                + (f", {self.failed} failed" if self.failed else ""))
