"""The pc-bSSFP networks (SVNN / PINN, magnitude and complex; seeds 000/001, SPEC §7).

Magnitude nets: 4 → 64 → 64 → 2 (inputs |F−1|, |F0|, |F1|, B1; outputs T1, T2).
Complex nets:   6 → 256 → 256 → 3 (inputs Re F−1, Re F0, Re F1, Im F−1, Im F1, B1; outputs
T1, T2, ΔB0). Im F0 is left out: after receiver-phase removal F0 is real.
Both are ``ScaledMLP``s (ReLU hidden layers, sigmoid outputs scaled to the parameter range).
"""

from __future__ import annotations

import torch

from bids_qmri.nets.mlp import ScaledMLP

__all__ = ["ARCHITECTURES", "BSSFPNet", "bssfp_features", "input_names"]

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


def input_names(kind: str) -> list[str]:
    if kind == "complex":
        return ["Re F-1", "Re F0", "Re F1", "Im F-1", "Im F1", "B1"]
    return ["|F-1|", "|F0|", "|F1|", "B1"]


class BSSFPNet(ScaledMLP):
    """MLP mapping bSSFP features to (T1 [s], T2 [s][, ΔB0 [Hz]])."""

    def __init__(self, kind: str, ranges: dict[str, tuple[float, float]], hidden: int | None = None,
                 log_outputs: tuple[str, ...] = ()):
        if kind not in ARCHITECTURES:
            raise ValueError(f"unknown network kind {kind!r}; use one of {sorted(ARCHITECTURES)}")
        n_in, default_hidden, outputs = ARCHITECTURES[kind]
        super().__init__(n_in, int(hidden or default_hidden), outputs, ranges, log_outputs=log_outputs)
        self.kind = kind

    def config(self) -> dict:
        config = {"kind": self.kind, "hidden": self.hidden, "ranges": self.ranges}
        if self.log_outputs:
            config["log_outputs"] = list(self.log_outputs)
        return config

    @classmethod
    def from_config(cls, config: dict) -> "BSSFPNet":
        return cls(config["kind"], {k: tuple(v) for k, v in config["ranges"].items()}, hidden=config["hidden"],
                   log_outputs=tuple(config.get("log_outputs", ())))
