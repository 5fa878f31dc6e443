"""The qMT networks of seed 003: a residual MLP on the compressed fingerprint → (m0s, T1, T2f).

``ResidualMLP``: 14 fully connected layers (seed 003 Fig. 2): an input layer, ``n_blocks`` = 6
residual blocks of two layers (``h ← ReLU(h + GN(W₂ ReLU(GN(W₁ h))))``) and a linear output layer;
every layer but the output is followed by group normalisation and ReLU. Outputs are standardised
parameters, ``θ = mean + sd·z`` with the training set's statistics stored as buffers (so nothing
bounds an estimate: an efficient, unbiased estimator must be free to leave the prior's range).
Outputs named in ``log_outputs`` (T1 and T2f in training) are ``θ = exp(mean + sd·z)`` with the
statistics of ``log θ`` (``parameterised`` returns ``log θ``, what the training losses see): their
CRBs scale with θ² (√CRB/θ is roughly constant over the prior), so a short T2f needs the same
relative, not absolute, precision as a long one (issue 16: with linear outputs the loss was
dominated by the shortest T1/T2f).

``features``: the R complex coefficients made unit-ℓ2 (seed 003) and rotated so that the first
is real and non-negative (our addition: the global phase of M0 is an exact nuisance symmetry, so
removing it costs no information and spares the network learning it), as
``[Re c_1..c_R, Im c_2..c_R]`` (2R − 1 inputs).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ResidualMLP", "features", "OUTPUTS"]

OUTPUTS = ("m0s", "T1", "T2f")


def features(coeffs: torch.Tensor) -> torch.Tensor:
    """``[N, 2R − 1]`` float32 inputs from complex coefficients ``[N, R]``."""
    c = torch.as_tensor(coeffs).to(torch.complex64)
    c = c / torch.linalg.vector_norm(c, dim=-1, keepdim=True).clamp_min(1e-30)
    first = c[:, :1]
    mag = first.abs()
    c = c * torch.where(mag > 0, first.conj() / mag.clamp_min(1e-30), torch.ones_like(first))
    return torch.cat([c.real, c.imag[:, 1:]], 1)


class _Block(nn.Module):
    def __init__(self, width: int, groups: int):
        super().__init__()
        self.fc1, self.gn1 = nn.Linear(width, width), nn.GroupNorm(groups, width)
        self.fc2, self.gn2 = nn.Linear(width, width), nn.GroupNorm(groups, width)

    def forward(self, h):
        return torch.relu(h + self.gn2(self.fc2(torch.relu(self.gn1(self.fc1(h))))))


class ResidualMLP(nn.Module):
    """``[N, n_in]`` features → ``[N, len(outputs)]`` parameters (SI units)."""

    def __init__(self, n_in: int, outputs: tuple[str, ...] = OUTPUTS, width: int = 128, n_blocks: int = 6,
                 groups: int = 8, log_outputs: tuple[str, ...] = ()):
        super().__init__()
        self.n_in, self.outputs, self.width, self.n_blocks, self.groups = (
            int(n_in), tuple(outputs), int(width), int(n_blocks), int(groups))
        unknown = set(log_outputs) - set(self.outputs)
        if unknown:
            raise ValueError(f"log_outputs {sorted(unknown)} are not outputs {self.outputs}")
        self.log_outputs = tuple(k for k in self.outputs if k in log_outputs)
        self.inp, self.gn = nn.Linear(self.n_in, self.width), nn.GroupNorm(self.groups, self.width)
        self.blocks = nn.ModuleList(_Block(self.width, self.groups) for _ in range(self.n_blocks))
        self.out = nn.Linear(self.width, len(self.outputs))
        self.register_buffer("out_mean", torch.zeros(len(self.outputs)))
        self.register_buffer("out_sd", torch.ones(len(self.outputs)))
        self.register_buffer("is_log", torch.tensor([k in self.log_outputs for k in self.outputs]), persistent=False)

    @property
    def n_layers(self) -> int:
        return 2 + 2 * self.n_blocks

    def set_output_stats(self, targets: torch.Tensor) -> None:
        """Output statistics from training targets ``[N, P]`` (of ``log θ`` for the log outputs)."""
        with torch.no_grad():
            t = torch.where(self.is_log, targets.clamp_min(1e-30).log(), targets)
            self.out_mean.copy_(t.mean(0))
            self.out_sd.copy_(t.std(0).clamp_min(1e-12))

    def parameterised(self, x: torch.Tensor) -> torch.Tensor:
        """The estimates in the training parameterisation: ``log θ`` for the log outputs, else ``θ``."""
        h = torch.relu(self.gn(self.inp(x)))
        for block in self.blocks:
            h = block(h)
        return self.out_mean + self.out_sd * self.out(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.parameterised(x)
        if not self.log_outputs:
            return u
        # log θ clamped to ±80 (exp stays finite in float32); no estimate comes near it
        return torch.where(self.is_log, u.clamp(-80, 80).exp(), u)

    def config(self) -> dict:
        return {"n_in": self.n_in, "outputs": list(self.outputs), "width": self.width, "n_blocks": self.n_blocks,
                "groups": self.groups, "log_outputs": list(self.log_outputs)}

    @classmethod
    def from_config(cls, config: dict) -> "ResidualMLP":
        return cls(config["n_in"], tuple(config["outputs"]), config["width"], config["n_blocks"], config["groups"],
                   tuple(config.get("log_outputs", ())))
