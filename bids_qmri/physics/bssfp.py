"""Phase-cycled balanced SSFP: analytic steady-state signal and SSFP configurations (SPEC §6).

One implementation serves simulation, network training (PINN loss), MIRACLE and the phantom.
Sign convention: ``bssfp_signal`` equals the complex conjugate of a right-handed hard-pulse
Bloch simulation whose RF phase advances by −φ_j per TR, demodulated with the RF phase
(checked in ``tests/test_physics_bssfp.py``). Times in seconds, angles in radians, ΔB0 in Hz.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "BSSFPModel",
    "BSSFPProtocol",
        "bssfp_signal",
    "configurations",
    "default_phase_increments",
    "normalise_configurations",
    "remove_receiver_phase",
    "seed_protocol",
]


def default_phase_increments(npc: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """RF phase increments φ_j = π(2j−1)/Npc, j = 1…Npc, in radians."""
    if npc < 1:
        raise ValueError(f"number of phase cycles must be >= 1, got {npc}")
    j = torch.arange(1, npc + 1, dtype=dtype)
    return math.pi * (2 * j - 1) / npc


def _as_tensor(x, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=dtype)


def _common_dtype(*xs) -> torch.dtype:
    """Promote the floating dtypes of the tensor arguments; Python numbers do not promote."""
    floats = [x.dtype for x in xs if isinstance(x, torch.Tensor) and x.is_floating_point()]
    out = floats[0] if floats else torch.float64
    for d in floats[1:]:
        out = torch.promote_types(out, d)
    return out


def bssfp_signal(
    t1,
    t2,
    m0,
    b1,
    b0_hz,
    *,
    tr: float,
    te: float,
    flip_rad: float,
    phase_increments_rad,
) -> torch.Tensor:
    """Steady-state pc-bSSFP signal, complex ``[..., Npc]`` (leading dims broadcast).

    S_j = M0 (1−E1) sin α (1 − E2 e^{−iθ_j}) / (C cos θ_j + D) · e^{−TE/T2} · e^{iθ0·TE/TR},
    α = B1·α_nom, θ0 = 2π·ΔB0·TR, θ_j = θ0 − φ_j. Differentiable in all tissue parameters.
    """
    dtype = _common_dtype(t1, t2, m0, b1, b0_hz)
    t1, t2, m0, b1, b0_hz = (_as_tensor(x, dtype) for x in (t1, t2, m0, b1, b0_hz))
    t1, t2, m0, b1, b0_hz = torch.broadcast_tensors(
        *(x.to(dtype) for x in (t1, t2, m0, b1, b0_hz))
    )
    phi = _as_tensor(phase_increments_rad).to(dtype=dtype, device=t1.device)

    alpha = (b1 * flip_rad).unsqueeze(-1)
    e1 = torch.exp(-tr / t1).unsqueeze(-1)
    e2 = torch.exp(-tr / t2).unsqueeze(-1)
    theta0 = (2 * math.pi * tr) * b0_hz.unsqueeze(-1)
    theta = theta0 - phi
    cos_a = torch.cos(alpha)
    c = e2 * (e1 - 1) * (1 + cos_a)
    d = (1 - e1 * cos_a) - (e1 - cos_a) * e2**2
    numerator = 1 - e2 * torch.exp(torch.complex(torch.zeros_like(theta), -theta))
    amplitude = m0.unsqueeze(-1) * (1 - e1) * torch.sin(alpha) * torch.exp(-te / t2).unsqueeze(-1)
    te_phase = torch.exp(torch.complex(torch.zeros_like(theta0), theta0 * (te / tr)))
    return amplitude * numerator / (c * torch.cos(theta) + d) * te_phase


def remove_receiver_phase(signal: torch.Tensor) -> torch.Tensor:
    """Remove the constant (receiver/transmit) phase: S · exp(−i · arg Σ_j S_j)."""
    total = signal.sum(dim=-1, keepdim=True)
    return signal * torch.exp(-1j * torch.angle(total))


def configurations(
    signal: torch.Tensor, phase_increments_rad, orders: Sequence[int] = (-1, 0, 1)
) -> torch.Tensor:
    """SSFP configurations F_p = (1/Npc) Σ_j S_j e^{+ipφ_j}, complex ``[..., len(orders)]``."""
    real_dtype = signal.real.dtype
    phi = _as_tensor(phase_increments_rad).to(dtype=real_dtype, device=signal.device)
    if phi.shape[-1] != signal.shape[-1]:
        raise ValueError(
            f"signal has {signal.shape[-1]} phase cycles but {phi.shape[-1]} phase increments"
        )
    p = torch.as_tensor(list(orders), dtype=real_dtype, device=signal.device)
    angle = phi.unsqueeze(-1) * p  # [Npc, P]
    kernel = torch.complex(torch.cos(angle), torch.sin(angle)) / phi.shape[-1]
    return signal @ kernel.to(signal.dtype)


def normalise_configurations(f: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Scale configurations to unit L2 norm over the last axis (voxel-wise M0 removal)."""
    norm = torch.linalg.vector_norm(f, dim=-1, keepdim=True)
    return f / norm.clamp_min(eps)


@dataclass(frozen=True)
class BSSFPProtocol:
    """Acquisition parameters that determine the pc-bSSFP signal (seconds and degrees)."""

    tr: float
    te: float
    flip_deg: float
    phase_increments_deg: tuple[float, ...]

    def __post_init__(self):
        object.__setattr__(
            self, "phase_increments_deg", tuple(float(x) for x in self.phase_increments_deg)
        )
        if not (self.tr > 0 and self.te >= 0 and self.flip_deg > 0 and self.npc >= 3):
            raise ValueError(
                f"unusable bSSFP protocol (TR={self.tr} s, TE={self.te} s, "
                f"flip={self.flip_deg} deg, {self.npc} phase cycles): need TR>0, TE>=0, "
                "flip>0 and at least 3 phase cycles"
            )

    @property
    def npc(self) -> int:
        return len(self.phase_increments_deg)

    @property
    def flip_rad(self) -> float:
        return math.radians(self.flip_deg)

    def phase_increments_rad(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return torch.tensor([math.radians(x) for x in self.phase_increments_deg], dtype=dtype)

    @classmethod
    def with_default_increments(cls, tr: float, te: float, flip_deg: float, npc: int):
        phi = default_phase_increments(npc)
        return cls(tr, te, flip_deg, tuple(math.degrees(float(x)) for x in phi))

    @classmethod
    def from_input(cls, bssfp) -> BSSFPProtocol:
        """From a ``bids_qmri.modalities.bssfp.inputs.BSSFPInput`` record."""
        return cls(
            float(bssfp.repetition_time),
            float(bssfp.echo_time),
            float(bssfp.flip_angle),
            tuple(float(x) for x in bssfp.phase_increments),
        )

    @classmethod
    def from_sidecar(cls, meta: dict, npc: int | None = None) -> BSSFPProtocol:
        """From a BIDS sidecar dict (RepetitionTimeExcitation, EchoTime, FlipAngle, PhaseIncrements)."""
        tr = meta.get("RepetitionTimeExcitation", meta.get("RepetitionTime"))
        if tr is None or "EchoTime" not in meta or "FlipAngle" not in meta:
            raise ValueError(
                "sidecar lacks RepetitionTimeExcitation, EchoTime or FlipAngle — add them (s, deg)"
            )
        incs = meta.get("PhaseIncrements")
        if incs is None:
            if npc is None:
                raise ValueError("sidecar lacks PhaseIncrements and the number of cycles is unknown")
            return cls.with_default_increments(float(tr), float(meta["EchoTime"]), float(meta["FlipAngle"]), npc)
        return cls(float(tr), float(meta["EchoTime"]), float(meta["FlipAngle"]), tuple(incs))

    def as_dict(self) -> dict:
        return {
            "RepetitionTimeExcitation": self.tr,
            "EchoTime": self.te,
            "FlipAngle": self.flip_deg,
            "PhaseIncrements": list(self.phase_increments_deg),
        }

    def key(self) -> str:
        """Stable short hash (12 hex digits); values rounded so float noise does not matter."""
        canon = {
            "tr_us": round(self.tr * 1e6, 1),
            "te_us": round(self.te * 1e6, 1),
            "flip_mdeg": round(self.flip_deg * 1e3),
            "phi_mdeg": [round(x * 1e3) for x in self.phase_increments_deg],
        }
        blob = json.dumps(canon, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def slug(self) -> str:
        """File-name label of the protocol for model files: ``npc<N>_<key>``."""
        return f"npc{self.npc}_{self.key()}"

    def describe(self) -> str:
        return (
            f"TR {self.tr * 1e3:g} ms, TE {self.te * 1e3:g} ms, FA {self.flip_deg:g} deg, "
            f"Npc {self.npc}"
        )


def seed_protocol(npc: int = 12) -> BSSFPProtocol:
    """The seed papers' protocol: TR 4.8 ms, TE 2.4 ms, FA 15°, default increments."""
    return BSSFPProtocol.with_default_increments(4.8e-3, 2.4e-3, 15.0, npc)


class BSSFPModel(nn.Module):
    """The pc-bSSFP signal for a fixed protocol as a module (mrpro style)."""

    def __init__(self, protocol: BSSFPProtocol):
        super().__init__()
        self.protocol = protocol
        self.register_buffer("phase_increments_rad", protocol.phase_increments_rad(), persistent=False)

    def forward(self, t1, t2, m0, b1, b0_hz) -> torch.Tensor:
        p = self.protocol
        return bssfp_signal(
            t1,
            t2,
            m0,
            b1,
            b0_hz,
            tr=p.tr,
            te=p.te,
            flip_rad=p.flip_rad,
            phase_increments_rad=self.phase_increments_rad,
        )

    def configurations(self, t1, t2, m0, b1, b0_hz, *, normalise: bool = True) -> torch.Tensor:
        """Receiver-phase-free configurations (F−1, F0, F1), unit norm unless ``normalise=False``."""
        s = remove_receiver_phase(self.forward(t1, t2, m0, b1, b0_hz))
        f = configurations(s, self.phase_increments_rad)
        return normalise_configurations(f) if normalise else f
