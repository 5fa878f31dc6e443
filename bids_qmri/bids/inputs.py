"""What input discovery hands to the workflows: one record per usable input.

Discovery (``bids_qmri.bids.discovery``) fills these from pybids, with sidecar inheritance
already applied to ``metadata``. Times are in seconds, angles in degrees, as in BIDS sidecars.
The record types here are the shared shapes (a B1 map, an indexed series, a part pair with an
optional basis); a modality may define its own record in its folder (e.g. pc-bSSFP's). Every
record has ``acq`` and ``files``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class B1Input:
    """A B1 map in one of its three BIDS forms; ``kind`` is the BIDS suffix."""

    kind: str  # "TB1map" | "TB1TFL" | "TB1DAM"
    files: dict[str, Path]  # TB1map: {"map": p}; TB1TFL: {"anat": p, "famp": p}; TB1DAM: {"flip1": p, "flip2": p}
    metadata: dict[str, dict] = field(default_factory=dict)  # same keys as files


@dataclass
class SeriesInput:
    """A multi-file series such as IRT1 (inv-<i>) or MESE (echo-<i>), sorted by ``values``."""

    kind: str  # "IRT1" | "MESE"
    acq: str | None
    files: list[Path]
    values: list[float]  # InversionTime or EchoTime per file, s
    metadata: list[dict] = field(default_factory=list)


@dataclass
class FingerprintInput:
    """MRF or hybrid-state qMT: frames (part pair) or SVD coefficients plus a basis TSV."""

    kind: str  # "MRF" | "qMT"
    acq: str | None
    part_files: dict[str, Path]
    basis_file: Path | None
    metadata: dict = field(default_factory=dict)

    @property
    def files(self) -> list[Path]:
        return list(self.part_files.values()) + ([self.basis_file] if self.basis_file else [])


@dataclass
class SkippedInput:
    path: str
    reason: str  # one line: what is wrong and what to do


@dataclass
class SessionInputs:
    """Everything usable for one participant and session (``session`` is None without sessions).

    ``inputs`` maps each registered modality's name to its input records (empty list when the
    session has none); B1 maps and T1w images serve every modality and are kept apart.
    """

    subject: str  # label without "sub-"
    session: str | None  # label without "ses-"
    inputs: dict[str, list] = field(default_factory=dict)
    b1: list[B1Input] = field(default_factory=list)
    t1w: list[Path] = field(default_factory=list)
    skipped: list[SkippedInput] = field(default_factory=list)
    # Files found but of a kind this version does not process (e.g. MEGRE, TB1AFI): listed, not
    # validated, never an error.
    unprocessed: list[SkippedInput] = field(default_factory=list)
    # One-line notes for the plan and the report (e.g. default PhaseIncrements were used).
    notes: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session else "")

    def items(self):
        """``(modality name, input record)`` for every input of the session, in registry order."""
        return [(name, item) for name, items in self.inputs.items() for item in items]

    def is_empty(self) -> bool:
        return not (self.t1w or any(self.inputs.values()))
