"""The hybrid-state qMT schedule (SPEC §3) and the SVD basis the data were compressed with.

``QMTProtocol`` is the modality's protocol object (``key()``, ``slug()``, ``describe()``,
``as_dict()``); the networks depend on both the schedule and the basis, so both are in the key.
``schedule_problem(meta)`` says in one line why a sidecar's schedule cannot be used (or None).
``synthetic_protocol()`` is the synthetic dataset's protocol and basis (the bundled networks' key).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from bids_qmri.bids.collect import number, number_list
from bids_qmri.utils.cache import protocol_hash

DEFAULT_INVERSION_DUR = 1.0e-3


def schedule_problem(meta: dict) -> tuple[str, str] | None:
    """``(problem, fix)`` when the sidecar's qMT schedule is unusable, else None."""
    flips = number_list(meta, "FlipAngle")
    durs = number_list(meta, "RFPulseDuration")
    tr = number(meta, "RepetitionTimeExcitation")
    if flips is None or durs is None:
        bad = "FlipAngle" if flips is None else "RFPulseDuration"
        return f"{bad} is not a list of numbers", "give one value per TR (degrees / seconds)"
    if len(flips) != len(durs):
        return (f"FlipAngle has {len(flips)} values but RFPulseDuration has {len(durs)}",
                "the schedule needs one flip angle and one pulse duration per TR")
    if tr is None or not 0 < tr < 1.0:
        return "RepetitionTimeExcitation must be one number in seconds (0, 1)", "fix the sidecar"
    if min(durs) <= 0 or max(durs) >= tr:
        return (f"RFPulseDuration must lie in (0, TR={tr:g} s), got {min(durs):g}-{max(durs):g}",
                "BIDS times are in seconds")
    inv = meta.get("InversionPulseDuration", DEFAULT_INVERSION_DUR)
    if not isinstance(inv, (int, float)) or not 0 < inv < 0.1:
        return f"InversionPulseDuration {inv!r} is not a duration in seconds", "fix or remove it (default 1 ms)"
    return None


def basis_hash(basis) -> str:
    import torch

    b = torch.view_as_real(torch.as_tensor(basis).to(torch.complex64)).numpy()
    return hashlib.sha256(np.ascontiguousarray(np.round(b, 6)).tobytes()).hexdigest()[:12]


@dataclass(frozen=True)
class QMTProtocol:
    """Flip angles (degrees) and pulse durations (s) per TR, TR (s), inversion pulse (s), and the
    hash and rank of the SVD basis (``""``/0 for frame data)."""

    flip_deg: tuple[float, ...]
    pulse_dur: tuple[float, ...]
    tr: float
    inversion_dur: float = DEFAULT_INVERSION_DUR
    basis_key: str = ""
    rank: int = 0

    @classmethod
    def from_dict(cls, meta: dict, basis=None) -> "QMTProtocol":
        problem = schedule_problem(meta)
        if problem:
            raise ValueError(f"{problem[0]} ({problem[1]})")
        key = meta.get("SVDBasisHash", "") if basis is None else basis_hash(basis)
        rank = int(meta.get("SVDRank", 0)) if basis is None else int(basis.shape[1])
        return cls(tuple(number_list(meta, "FlipAngle")), tuple(number_list(meta, "RFPulseDuration")),
                   float(meta["RepetitionTimeExcitation"]),
                   float(meta.get("InversionPulseDuration", DEFAULT_INVERSION_DUR)), key, rank)

    @property
    def n_tr(self) -> int:
        return len(self.flip_deg)

    def key(self) -> str:
        canon = {"flip_mdeg": [round(f * 1e3) for f in self.flip_deg],
                 "dur_ns": [round(t * 1e9) for t in self.pulse_dur], "tr_ns": round(self.tr * 1e9),
                 "inv_ns": round(self.inversion_dur * 1e9), "basis": self.basis_key, "rank": self.rank}
        return protocol_hash(canon)

    def slug(self) -> str:
        return f"r{self.rank}_{self.key()}"

    def describe(self) -> str:
        return (f"hybrid-state qMT, {self.n_tr} TRs of {1e3 * self.tr:g} ms, FA {min(self.flip_deg):.3g}-"
                f"{max(self.flip_deg):.3g} deg, pulses {1e3 * min(self.pulse_dur):g}-{1e3 * max(self.pulse_dur):g} ms"
                + (f", SVD rank {self.rank} ({self.basis_key})" if self.rank else ""))

    def summary(self) -> dict:
        return {"NumberOfExcitations": self.n_tr, "FlipAngleRange": [min(self.flip_deg), max(self.flip_deg)],
                "RFPulseDurationRange": [min(self.pulse_dur), max(self.pulse_dur)],
                "RepetitionTimeExcitation": self.tr, "CycleDuration": round(self.n_tr * self.tr, 6),
                "ProtocolKey": self.key()}

    def as_dict(self) -> dict:
        return {"FlipAngle": list(self.flip_deg), "RFPulseDuration": list(self.pulse_dur),
                "RepetitionTimeExcitation": self.tr, "InversionPulseDuration": self.inversion_dur,
                "SVDBasisHash": self.basis_key, "SVDRank": self.rank}

    def schedule(self) -> dict:
        """``physics.qmt.hybrid_state_signal`` keyword arguments (float64 tensors, radians, seconds)."""
        import torch

        return {"flip_rad": torch.tensor(self.flip_deg, dtype=torch.float64) * (math.pi / 180),
                "pulse_dur": torch.tensor(self.pulse_dur, dtype=torch.float64), "tr": self.tr,
                "inversion_dur": self.inversion_dur}


def synthetic_protocol() -> tuple:
    """``(QMTProtocol, basis)`` of the synthetic dataset (the bundled networks')."""
    from bids_qmri.synth.dataset import _degrees, qmt_basis

    basis, s = qmt_basis()
    meta = {"FlipAngle": _degrees(s["flip_rad"]), "RFPulseDuration": [round(float(t), 10) for t in s["pulse_dur"]],
            "RepetitionTimeExcitation": s["tr"],
            "InversionPulseDuration": s.get("inversion_dur", DEFAULT_INVERSION_DUR)}
    return QMTProtocol.from_dict(meta, basis=basis), basis
