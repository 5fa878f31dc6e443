"""The MPRAGE protocol of a T1w input (SPEC §3: ``InversionTime``, ``RepetitionTimePreparation``,
``FlipAngle``, ``RepetitionTimeExcitation`` as the echo spacing, optional ``NumberOfReadouts``)
and the model protocol of mprage2mrf: that MPRAGE protocol and the MRF schedule and basis the
network synthesises coefficients of.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

from bids_qmri.bids.collect import number

REQUIRED = ("InversionTime", "RepetitionTimePreparation", "FlipAngle", "RepetitionTimeExcitation")
#: Readout pulses per preparation when the sidecar does not say (the synthetic dataset's, 176 partitions).
DEFAULT_READOUTS = 176


def protocol_problem(meta: dict) -> tuple[str, str] | None:
    """``(problem, fix)`` when the sidecar's MPRAGE protocol is unusable, else None."""
    values = {k: number(meta, k) for k in REQUIRED}
    missing = [k for k, v in values.items() if v is None]
    if missing:
        return f"{', '.join(missing)} missing or not a number", "add the MPRAGE timing to the T1w sidecar (seconds, degrees)"
    if min(values.values()) <= 0:
        return "MPRAGE timing and flip angle must be positive", "fix the T1w sidecar"
    if max(values["InversionTime"], values["RepetitionTimePreparation"]) > 20:
        return "InversionTime / RepetitionTimePreparation look like milliseconds", "BIDS times are in seconds"
    n = meta.get("NumberOfReadouts", DEFAULT_READOUTS)
    if not isinstance(n, int) or n < 1:
        return f"NumberOfReadouts {n!r} is not a positive integer", "fix the T1w sidecar"
    # InversionTime is to the centre of k-space (the middle readout), as physics.mprage assumes.
    half = values["RepetitionTimeExcitation"] * (n // 2)
    if values["InversionTime"] < half or values["InversionTime"] + half > values["RepetitionTimePreparation"] + 1e-9:
        return ("the readout train (NumberOfReadouts x RepetitionTimeExcitation, centred on InversionTime) does not "
                "fit between the inversions", "check the sidecar's units and NumberOfReadouts")
    return None


@dataclass(frozen=True)
class MPRAGEProtocol:
    ti: float
    tr_prep: float
    echo_spacing: float
    flip_deg: float
    n_readout: int = DEFAULT_READOUTS

    @classmethod
    def from_dict(cls, meta: dict) -> "MPRAGEProtocol":
        problem = protocol_problem(meta)
        if problem:
            raise ValueError(f"{problem[0]} ({problem[1]})")
        return cls(float(meta["InversionTime"]), float(meta["RepetitionTimePreparation"]),
                   float(meta["RepetitionTimeExcitation"]), float(meta["FlipAngle"]),
                   int(meta.get("NumberOfReadouts", DEFAULT_READOUTS)))

    def signal_kwargs(self) -> dict:
        """``physics.mprage.mprage_signal`` keyword arguments."""
        return {"ti": self.ti, "tr_prep": self.tr_prep, "echo_spacing": self.echo_spacing,
                "flip_rad": math.radians(self.flip_deg), "n_readout": self.n_readout}

    def key(self) -> str:
        canon = [round(self.ti * 1e6), round(self.tr_prep * 1e6), round(self.echo_spacing * 1e7),
                 round(self.flip_deg * 1e3), self.n_readout]
        return hashlib.sha256(json.dumps(canon).encode()).hexdigest()[:12]

    def slug(self) -> str:
        return f"mprage_{self.key()}"

    def describe(self) -> str:
        return (f"MPRAGE TI {1e3 * self.ti:g} ms, TR {1e3 * self.tr_prep:g} ms, echo spacing "
                f"{1e3 * self.echo_spacing:g} ms, FA {self.flip_deg:g} deg, {self.n_readout} readouts")

    def as_dict(self) -> dict:
        return {"PulseSequenceType": "MPRAGE", "InversionTime": self.ti, "RepetitionTimePreparation": self.tr_prep,
                "RepetitionTimeExcitation": self.echo_spacing, "FlipAngle": self.flip_deg,
                "NumberOfReadouts": self.n_readout}

    def differences(self, other: "MPRAGEProtocol", rtol: float = 0.01) -> list[str]:
        """Fields where ``other`` differs from this protocol by more than ``rtol`` (for Warnings)."""
        out = []
        for key, a, b in zip(("InversionTime", "RepetitionTimePreparation", "RepetitionTimeExcitation", "FlipAngle",
                              "NumberOfReadouts"),
                             (self.ti, self.tr_prep, self.echo_spacing, self.flip_deg, self.n_readout),
                             (other.ti, other.tr_prep, other.echo_spacing, other.flip_deg, other.n_readout)):
            if abs(a - b) > rtol * abs(a):
                out.append(f"{key} {b:g} (model trained at {a:g})")
        return out


def synthetic_protocol() -> MPRAGEProtocol:
    """The synthetic dataset's MPRAGE (``physics.mprage.default_mprage_protocol``)."""
    from bids_qmri.physics.mprage import default_mprage_protocol

    p = default_mprage_protocol()
    return MPRAGEProtocol(p["ti"], p["tr_prep"], p["echo_spacing"], round(math.degrees(p["flip_rad"]), 10),
                          p["n_readout"])
