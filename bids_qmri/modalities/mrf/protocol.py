"""The FISP-MRF acquisition schedule (SPEC §3): flip angle and TR per frame, TE, TI.

``MRFProtocol`` is the modality's protocol object (``key()``, ``describe()``, ``as_dict()``);
``schedule_problem(meta)`` says in one line why a sidecar's schedule cannot be used (or None).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bids_qmri.bids.collect import number, number_list
from bids_qmri.utils.cache import protocol_hash

SEQUENCES = ("FISP",)
# BIDS defines RepetitionTimeExcitation as one number (FlipAngle may be a list): the derivatives'
# sidecars keep the per-frame TRs under their own key.
SIDECAR_TR = "RepetitionTimesExcitation"


def schedule_problem(meta: dict) -> tuple[str, str] | None:
    """``(problem, fix)`` when the sidecar's MRF schedule is unusable, else None."""
    seq = meta.get("MRFSequenceType")
    if seq not in SEQUENCES:
        return (f"MRFSequenceType {seq!r} is not supported", f"this version simulates {', '.join(SEQUENCES)} only")
    flips = number_list(meta, "FlipAngle")
    trs = number_list(meta, "RepetitionTimeExcitation")
    te, ti = number(meta, "EchoTime"), number(meta, "InversionTime")
    if flips is None or trs is None:
        bad = "FlipAngle" if flips is None else "RepetitionTimeExcitation"
        return f"{bad} is not a list of numbers", "give one value per frame (degrees / seconds)"
    if len(trs) == 1 and len(flips) > 1:
        trs = trs * len(flips)
    if len(flips) != len(trs):
        return (f"FlipAngle has {len(flips)} values but RepetitionTimeExcitation has {len(trs)}",
                "the schedule needs one flip angle and one TR per frame")
    if te is None or te < 0 or ti is None or ti < 0:
        return "EchoTime and InversionTime must be non-negative numbers (seconds)", "fix the sidecar"
    if max(trs) > 1.0 or te > 1.0:
        return f"RepetitionTimeExcitation up to {max(trs):g} looks like milliseconds", "BIDS times are in seconds"
    if min(trs) <= te:
        return f"EchoTime {te:g} s is not shorter than the shortest TR {min(trs):g} s", "check the sidecar's units"
    return None


@dataclass(frozen=True)
class MRFProtocol:
    """FISP schedule: flip angles (degrees) and TRs (s) per frame, TE (s), TI (s, from the
    inversion to the first pulse)."""

    flip_deg: tuple[float, ...]
    tr: tuple[float, ...]
    te: float
    ti: float
    sequence: str = "FISP"

    @classmethod
    def from_dict(cls, meta: dict) -> "MRFProtocol":
        """From a raw sidecar or from ``as_dict()`` (which keeps the TR list under ``SIDECAR_TR``)."""
        if SIDECAR_TR in meta and "RepetitionTimeExcitation" not in meta:
            meta = {**meta, "RepetitionTimeExcitation": meta[SIDECAR_TR]}
        problem = schedule_problem(meta)
        if problem:
            raise ValueError(f"{problem[0]} ({problem[1]})")
        flips = number_list(meta, "FlipAngle")
        trs = number_list(meta, "RepetitionTimeExcitation")
        if len(trs) == 1:
            trs = trs * len(flips)
        return cls(tuple(flips), tuple(trs), float(meta["EchoTime"]), float(meta["InversionTime"]),
                   str(meta["MRFSequenceType"]))

    @property
    def n_frames(self) -> int:
        return len(self.flip_deg)

    def key(self) -> str:
        canon = {"seq": self.sequence, "flip_mdeg": [round(f * 1e3) for f in self.flip_deg],
                 "tr_ns": [round(t * 1e9) for t in self.tr], "te_ns": round(self.te * 1e9),
                 "ti_ns": round(self.ti * 1e9)}
        return protocol_hash(canon)

    def slug(self) -> str:
        return f"n{self.n_frames}_{self.key()}"

    def describe(self) -> str:
        return (f"{self.sequence} MRF, {self.n_frames} frames, FA {min(self.flip_deg):g}-{max(self.flip_deg):g} deg, "
                f"TR {1e3 * min(self.tr):.3g}-{1e3 * max(self.tr):.3g} ms, TE {1e3 * self.te:g} ms, "
                f"TI {1e3 * self.ti:g} ms")

    def summary(self) -> dict:
        """Schedule summary for the map sidecars (the full lists are in ``as_dict``)."""
        return {"NumberOfFrames": self.n_frames, "FlipAngleRange": [min(self.flip_deg), max(self.flip_deg)],
                "RepetitionTimeExcitationRange": [min(self.tr), max(self.tr)],
                "ScheduleDuration": round(math.fsum(self.tr) + self.ti, 6), "ProtocolKey": self.key()}

    def as_dict(self) -> dict:
        return {"MRFSequenceType": self.sequence, "FlipAngle": list(self.flip_deg),
                SIDECAR_TR: list(self.tr), "EchoTime": self.te, "InversionTime": self.ti}

    def schedule(self) -> dict:
        """``physics.epg.fisp_mrf`` keyword arguments (float64 tensors, radians, seconds)."""
        import torch

        return {"flip_rad": torch.tensor(self.flip_deg, dtype=torch.float64).deg2rad(),
                "tr": torch.tensor(self.tr, dtype=torch.float64), "te": self.te,
                "ti": self.ti}


def protocol(item) -> MRFProtocol:
    return MRFProtocol.from_dict(item.metadata)
