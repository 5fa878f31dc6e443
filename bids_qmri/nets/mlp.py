"""A voxel-wise MLP with physical outputs: the regressor behind the pc-bSSFP networks (SPEC §7)
and any other "features → bounded parameters" network.

``ScaledMLP``: inputs standardised with stored training statistics, ``depth`` ReLU hidden layers
of width ``hidden``, sigmoid outputs scaled to each parameter's range. The statistics and ranges
are buffers, so they travel with the weights (``bids_qmri.nets.io``); a sigmoid output cannot
leave its range, which callers must know (``ranges``). Outputs named in ``log_outputs`` are scaled
logarithmically (unit u -> lo·(hi/lo)^u), so a range spanning decades keeps the same relative
precision at its low end as at its high end; the others linearly.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ScaledMLP"]


class ScaledMLP(nn.Module):
    """MLP mapping ``[N, n_in]`` features to ``[N, len(outputs)]`` parameters within ``ranges``."""

    def __init__(self, n_in: int, hidden: int, outputs: tuple[str, ...],
                 ranges: dict[str, tuple[float, float]], depth: int = 2, log_outputs: tuple[str, ...] = ()):
        super().__init__()
        missing = [k for k in outputs if k not in ranges]
        if missing:
            raise ValueError(f"output ranges missing for {missing}")
        bad = [k for k in log_outputs if k not in outputs or float(ranges[k][0]) <= 0]
        if bad:
            raise ValueError(f"log-scaled outputs {bad} must be outputs with a positive lower range limit")
        self.n_in, self.hidden, self.outputs, self.depth = int(n_in), int(hidden), tuple(outputs), int(depth)
        layers: list[nn.Module] = []
        width = self.n_in
        for _ in range(self.depth):
            layers += [nn.Linear(width, self.hidden), nn.ReLU()]
            width = self.hidden
        layers.append(nn.Linear(width, len(self.outputs)))
        self.net = nn.Sequential(*layers)
        self.register_buffer("in_mean", torch.zeros(self.n_in))
        self.register_buffer("in_std", torch.ones(self.n_in))
        self.register_buffer("out_lo", torch.tensor([float(ranges[k][0]) for k in self.outputs]))
        self.register_buffer("out_hi", torch.tensor([float(ranges[k][1]) for k in self.outputs]))
        # not a buffer: the flag lives in the configuration, so files written before it still load
        self.log_outputs = tuple(k for k in self.outputs if k in set(log_outputs))
        self._log_mask = torch.tensor([k in self.log_outputs for k in self.outputs])

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
        linear = self.out_lo + (self.out_hi - self.out_lo) * unit
        if not self.log_outputs:
            return linear
        mask = self._log_mask.to(unit.device)
        lo, hi = self.out_lo.clamp_min(1e-30).log(), self.out_hi.clamp_min(1e-30).log()
        return torch.where(mask, torch.exp(lo + (hi - lo) * unit), linear)

    def to_unit(self, params: torch.Tensor) -> torch.Tensor:
        linear = (params - self.out_lo) / (self.out_hi - self.out_lo)
        if not self.log_outputs:
            return linear
        mask = self._log_mask.to(params.device)
        lo, hi = self.out_lo.clamp_min(1e-30).log(), self.out_hi.clamp_min(1e-30).log()
        return torch.where(mask, (params.clamp_min(1e-30).log() - lo) / (hi - lo), linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_physical(self.forward_unit(x))

    def config(self) -> dict:
        config = {"n_in": self.n_in, "hidden": self.hidden, "outputs": list(self.outputs),
                  "ranges": self.ranges, "depth": self.depth}
        if self.log_outputs:
            config["log_outputs"] = list(self.log_outputs)
        return config

    @classmethod
    def from_config(cls, config: dict) -> "ScaledMLP":
        return cls(config["n_in"], config["hidden"], tuple(config["outputs"]),
                   {k: tuple(v) for k, v in config["ranges"].items()}, depth=config.get("depth", 2),
                   log_outputs=tuple(config.get("log_outputs", ())))
