"""Voxel-wise MLPs for pc-bSSFP relaxometry (SVNN / PINN, magnitude and complex; SPEC §7).

Magnitude nets: 4 → 64 → 64 → 2 (inputs |F−1|, |F0|, |F1|, B1; outputs T1, T2).
Complex nets:   6 → 256 → 256 → 3 (inputs Re F−1, Re F0, Re F1, Im F−1, Im F1, B1; outputs
T1, T2, ΔB0). Im F0 is left out: after receiver-phase removal F0 is real.
ReLU hidden layers, sigmoid outputs scaled to the parameter range. The input normalisation
statistics and the output ranges are buffers, so they travel with the weights in the
safetensors file; the architecture goes into the file's metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["ARCHITECTURES", "BSSFPNet", "bssfp_features", "load_net", "save_net"]

#: kind -> (number of inputs, hidden width, output parameter names)
ARCHITECTURES = {
    "magnitude": (4, 64, ("T1", "T2")),
    "complex": (6, 256, ("T1", "T2", "B0")),
}


def bssfp_features(f_normalised: torch.Tensor, b1: torch.Tensor, kind: str) -> torch.Tensor:
    """Network inputs from unit-norm configurations ``[..., 3]`` (F−1, F0, F1) and B1 ``[...]``.

    The PINN loss re-simulates through this same function, so inputs and re-simulated features
    can never disagree in definition.
    """
    b1 = b1.to(f_normalised.real.dtype).unsqueeze(-1)
    if kind == "magnitude":
        return torch.cat([f_normalised.abs(), b1], dim=-1)
    if kind == "complex":
        re, im = f_normalised.real, f_normalised.imag
        return torch.cat([re, im[..., 0:1], im[..., 2:3], b1], dim=-1)
    raise ValueError(f"unknown network kind {kind!r}; use one of {sorted(ARCHITECTURES)}")


class BSSFPNet(nn.Module):
    """MLP mapping bSSFP features to (T1 [s], T2 [s][, ΔB0 [Hz]])."""

    def __init__(self, kind: str, ranges: dict[str, tuple[float, float]], hidden: int | None = None):
        super().__init__()
        if kind not in ARCHITECTURES:
            raise ValueError(f"unknown network kind {kind!r}; use one of {sorted(ARCHITECTURES)}")
        n_in, default_hidden, outputs = ARCHITECTURES[kind]
        self.kind = kind
        self.outputs = outputs
        self.hidden = int(hidden or default_hidden)
        missing = [k for k in outputs if k not in ranges]
        if missing:
            raise ValueError(f"output ranges missing for {missing}")
        self.net = nn.Sequential(
            nn.Linear(n_in, self.hidden),
            nn.ReLU(),
            nn.Linear(self.hidden, self.hidden),
            nn.ReLU(),
            nn.Linear(self.hidden, len(outputs)),
        )
        self.register_buffer("in_mean", torch.zeros(n_in))
        self.register_buffer("in_std", torch.ones(n_in))
        self.register_buffer("out_lo", torch.tensor([float(ranges[k][0]) for k in outputs]))
        self.register_buffer("out_hi", torch.tensor([float(ranges[k][1]) for k in outputs]))

    @property
    def ranges(self) -> dict[str, tuple[float, float]]:
        return {k: (float(lo), float(hi)) for k, lo, hi in zip(self.outputs, self.out_lo, self.out_hi)}

    def set_input_stats(self, features: torch.Tensor) -> None:
        """Store the mean and standard deviation of the training inputs."""
        with torch.no_grad():
            self.in_mean.copy_(features.mean(0))
            self.in_std.copy_(features.std(0).clamp_min(1e-6))

    def forward_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs in [0, 1] (the sigmoid), before scaling to the parameter range."""
        return torch.sigmoid(self.net((x - self.in_mean) / self.in_std))

    def to_physical(self, unit: torch.Tensor) -> torch.Tensor:
        return self.out_lo + (self.out_hi - self.out_lo) * unit

    def to_unit(self, params: torch.Tensor) -> torch.Tensor:
        return (params - self.out_lo) / (self.out_hi - self.out_lo)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_physical(self.forward_unit(x))

    def config(self) -> dict:
        return {"kind": self.kind, "hidden": self.hidden, "ranges": self.ranges}


def save_net(net: BSSFPNet, path: str | Path) -> Path:
    """Write weights and buffers as safetensors; the architecture goes into the metadata."""
    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    save_file(state, str(path), metadata={"bids_qmri_config": json.dumps(net.config())})
    return path


def load_net(path: str | Path) -> BSSFPNet:
    """Load a network written by ``save_net`` (safetensors: no code is unpickled)."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if "bids_qmri_config" not in meta:
        raise ValueError(f"{path}: not a bids_qmri network file (no architecture metadata)")
    cfg = json.loads(meta["bids_qmri_config"])
    net = BSSFPNet(cfg["kind"], {k: tuple(v) for k, v in cfg["ranges"].items()}, hidden=cfg["hidden"])
    net.load_state_dict(load_file(str(path)))
    net.eval()
    return net
