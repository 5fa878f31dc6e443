"""Seven parallel 2D U-Nets from an MPRAGE slice to MRF SVD coefficients (seed 002, Figs. 1-2).

``UNet2D`` is one network of seed 002 Fig. 2: on the contracting path two 3x3 convolutions,
each followed by ReLU and batch normalisation, then 2x2 max pooling, the filters doubling from
``base`` (16) at every level down to the bottleneck (16 -> 256 with ``depth`` 4); the
bottleneck's two convolutions; on the expanding path bilinear upsampling, concatenation with the
skip connection and two 3x3 convolutions + ReLU (no batch normalisation), with dropout after
every level; a 1x1 convolution to one channel and ``tanh`` (outputs in [-1, 1]).

``MPRAGE2MRFNet`` holds seven of them (SV1 real; SV2-4 real and imaginary: ``COMPONENTS``),
trained side by side, each with its own MSE loss, and the min/max rescale table (seed 002
Table 2 analogue) as buffers saved with the weights: ``to_coefficients`` maps the tanh outputs
to coefficient values, ``to_network`` is its inverse.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["COMPONENTS", "MPRAGE2MRFNet", "UNet2D", "coefficients_to_channels", "channels_to_coefficients"]

#: The seven outputs, in order (seed 002 Table 2).
COMPONENTS = ("SV1_real", "SV2_real", "SV2_imag", "SV3_real", "SV3_imag", "SV4_real", "SV4_imag")
N_SV = 4


def coefficients_to_channels(c: torch.Tensor) -> torch.Tensor:
    """Complex ``[..., 4]`` (SV1 already rotated real) -> real ``[..., 7]`` in ``COMPONENTS`` order."""
    return torch.stack([c[..., 0].real] + [part for k in range(1, N_SV) for part in (c[..., k].real, c[..., k].imag)],
                       -1)


def channels_to_coefficients(x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``coefficients_to_channels``: real ``[..., 7]`` -> complex64 ``[..., 4]`` (SV1 real)."""
    x = x.float()
    parts = [torch.complex(x[..., 0], torch.zeros_like(x[..., 0]))]
    parts += [torch.complex(x[..., 2 * k - 1], x[..., 2 * k]) for k in range(1, N_SV)]
    return torch.stack(parts, -1)


class _Down(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn2(F.relu(self.conv2(self.bn1(F.relu(self.conv1(x))))))


class _Up(nn.Module):
    def __init__(self, cin: int, cout: int, dropout: float):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        return self.drop(F.relu(self.conv2(F.relu(self.conv1(x)))))


class UNet2D(nn.Module):
    """One seed-002 U-Net: ``[B, 1, H, W]`` -> ``[B, 1, H, W]`` in [-1, 1] (H, W multiples of 2**depth)."""

    def __init__(self, base: int = 16, depth: int = 4, dropout: float = 0.1):
        super().__init__()
        widths = [base * 2**i for i in range(depth + 1)]  # 16, 32, 64, 128, 256
        self.down = nn.ModuleList([_Down(1 if i == 0 else widths[i - 1], widths[i]) for i in range(depth)])
        self.bottleneck = _Down(widths[depth - 1], widths[depth])
        # Upsampled block (widths[i+1] channels after the level below) concatenated with the skip.
        self.up = nn.ModuleList([_Up(widths[i + 1] + widths[i], widths[i], dropout) for i in range(depth)])
        self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x):
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for i in reversed(range(len(self.up))):
            x = F.interpolate(x, size=skips[i].shape[-2:], mode="bilinear", align_corners=False)
            x = self.up[i](torch.cat([x, skips[i]], 1))
        return torch.tanh(self.head(x))


class MPRAGE2MRFNet(nn.Module):
    """Seven U-Nets side by side: ``[B, 1, H, W]`` normalised MPRAGE -> ``[B, 7, H, W]`` tanh outputs.

    ``table_min`` / ``table_max`` ``[7]``: the coefficient range of the training targets; a
    tanh output ``y`` is the coefficient ``min + (y + 1)(max - min)/2``.
    """

    def __init__(self, base: int = 16, depth: int = 4, dropout: float = 0.1, n_frames: int = 0):
        super().__init__()
        self.base, self.depth, self.dropout, self.n_frames = int(base), int(depth), float(dropout), int(n_frames)
        self.nets = nn.ModuleList([UNet2D(self.base, self.depth, self.dropout) for _ in COMPONENTS])
        self.register_buffer("table_min", -torch.ones(len(COMPONENTS)))
        self.register_buffer("table_max", torch.ones(len(COMPONENTS)))
        # The MRF temporal basis the coefficients belong to ([frames, 4], real and imaginary parts).
        self.register_buffer("basis_real", torch.zeros(self.n_frames, N_SV))
        self.register_buffer("basis_imag", torch.zeros(self.n_frames, N_SV))

    @property
    def multiple(self) -> int:
        """Slice sizes must be multiples of this (the pooling levels)."""
        return 2**self.depth

    def config(self) -> dict:
        return {"base": self.base, "depth": self.depth, "dropout": self.dropout, "n_frames": self.n_frames}

    def set_basis(self, basis: torch.Tensor) -> None:
        basis = torch.as_tensor(basis)
        if basis.shape != (self.n_frames, N_SV):
            raise ValueError(f"the MRF basis must be [{self.n_frames}, {N_SV}], got {list(basis.shape)}")
        self.basis_real.copy_(basis.real.float())
        self.basis_imag.copy_(basis.imag.float())

    def basis(self) -> torch.Tensor:
        """The MRF basis ``[frames, 4]`` (complex64) of the synthesised coefficients."""
        return torch.complex(self.basis_real, self.basis_imag)

    @classmethod
    def from_config(cls, config: dict) -> "MPRAGE2MRFNet":
        return cls(**config)

    def set_table(self, lo, hi) -> None:
        lo, hi = torch.as_tensor(lo, dtype=torch.float32), torch.as_tensor(hi, dtype=torch.float32)
        if lo.shape != (len(COMPONENTS),) or hi.shape != lo.shape or not bool((hi > lo).all()):
            raise ValueError(f"the rescale table needs {len(COMPONENTS)} ranges with max > min")
        self.table_min.copy_(lo)
        self.table_max.copy_(hi)

    def table(self) -> dict:
        """``{component: [min, max]}`` (for the model card)."""
        return {c: [round(float(a), 6), round(float(b), 6)]
                for c, a, b in zip(COMPONENTS, self.table_min, self.table_max)}

    def _shape(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        view = (1, -1) + (1,) * (t.dim() - 2)
        return self.table_min.view(view), self.table_max.view(view)

    def to_coefficients(self, y: torch.Tensor) -> torch.Tensor:
        """``[B, 7, ...]`` network outputs in [-1, 1] -> coefficient values."""
        lo, hi = self._shape(y)
        return lo + (y + 1) * (hi - lo) / 2

    def to_network(self, c: torch.Tensor) -> torch.Tensor:
        """Inverse of ``to_coefficients`` (the training targets of the tanh outputs)."""
        lo, hi = self._shape(c)
        return 2 * (c - lo) / (hi - lo) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([net(x) for net in self.nets], 1)
