"""Learned relaxometry estimators of seed 004: the recurrent inference machine (RIM) and the
ResNet baseline, for the inversion-recovery (``ir``: κ = A, B, T1) and T2-decay (``t2``: κ = A,
T2) models of ``bids_qmri.physics.relaxation``.

Both networks work on 2D images ``[batch, N, H, W]`` (``N`` time points) and return maps
``[batch, Q, H, W]``. They live in one set of network coordinates, shared by the losses:

- the signal is divided by a scale (``signal_scale``: the median over the brain voxels of each
  voxel's maximum over the series), and A is estimated in those units;
- relaxation times are estimated as their natural logarithm (in seconds), so that a squared
  error is a relative error and CSF does not dominate the loss; B is estimated as is.
``to_physical`` / ``to_network`` convert.

RIM (seed 004 §3, §4.4.4, Fig. 1a): κ₀ = (A = maximum over the series, B = 2, T1 = 1 s or
T2 = 0.1 s); at each of J steps the cell sees [κ_j, ∇_κ L(κ_j)] where L is the Gaussian negative
log-likelihood of the magnitude model (up to the constant factor σ²: ½ mean over the series of
the squared residuals, so that its size does not grow with the number of time points), computed
by autograd through the physics functions; 3×3 conv + tanh → conv-GRU(36) → two 3×3 convs + tanh
→ conv-GRU(36) → 1×1 conv to Δκ; κ_{j+1} = κ_j + Δκ_j. The first layer sees 2Q channels whatever
the number of time points, so one RIM serves any series length. Training scores all J estimates
(``rim_loss``, seed 004 eq. 6). The gradient enters the cell as an input (it is not
differentiated again during training), as in seed 004's implementation.

Gradient input (``RIM(gradient=...)``): ``"raw"`` feeds ∇_κ L as above (seed 004); ``"gauss_newton"``
(the trainer's default) feeds ∇_κ L divided per voxel and parameter by the Gauss-Newton curvature
mean_n (∂f_n/∂κ_q)² + ``GAUSS_NEWTON_DAMPING`` (``scaled_nll_gradient``): a step in each parameter's
own units. The raw gradient's size swings with the voxel's signal level and, for ln T1, with how
far T1 is from the TIs (∂f/∂ln T1 ∝ A·B·(TI/T1)·e^{−TI/T1}), so an equal step in the raw input
means very different updates from voxel to voxel; the scaled input removes that spread, which the
network otherwise has to learn from few mini-batches.

ResNet (seed 004 §4.4.3, Fig. 1b): 1×1 conv N→width, BatchNorm, ReLU; G residual blocks (two
zero-padded 3×3 convs with BatchNorm and ReLU, identity skip, 1×1 projection when the width
changes); 1×1 conv to Q. No pooling, no fully connected layer; one model per series length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from bids_qmri.physics.relaxation import inversion_recovery, t2_decay

__all__ = [
    "KINDS",
    "PARAMETERS",
    "RIM",
    "ConvGRUCell",
    "RelaxResNet",
    "SEED_RESNET_CHANNELS",
    "initial_estimate",
    "nll_gradient",
    "patch_bias_term",
    "scaled_nll_gradient",
    "rim_loss",
    "signal_model",
    "signal_scale",
    "to_network",
    "to_physical",
]

#: model kind -> parameter names in network order
PARAMETERS = {"ir": ("A", "B", "T1"), "t2": ("A", "T2")}
KINDS = tuple(PARAMETERS)
#: seed 004 §4.4.4: initial B and relaxation times (seconds)
INITIAL = {"B": 2.0, "T1": 1.0, "T2": 0.1}
#: seed 004 §4.4.3: the widths of the ResNet's residual blocks
SEED_RESNET_CHANNELS = (40, 40, 80, 80, 160, 320, 160, 80, 80, 40, 6)
#: guards of the network coordinates (ln seconds) against overflow of exp on untrained nets
LOG_T_RANGE = (math.log(1e-3), math.log(20.0))
#: damping of the curvature that scales the gradient input (``scaled_nll_gradient``)
GAUSS_NEWTON_DAMPING = 1e-2


def _check_kind(kind: str) -> None:
    if kind not in PARAMETERS:
        raise ValueError(f"unknown relaxometry model {kind!r}; use one of {', '.join(KINDS)}")


def to_physical(kappa: torch.Tensor, kind: str) -> torch.Tensor:
    """Network coordinates ``[..., Q, H, W]`` → A (scaled units), B, T (seconds)."""
    _check_kind(kind)
    parts = list(kappa.unbind(-3))
    parts[-1] = torch.exp(parts[-1].clamp(*LOG_T_RANGE))
    return torch.stack(parts, -3)


def to_network(params: torch.Tensor, kind: str) -> torch.Tensor:
    """A, B, T (seconds) ``[..., Q, H, W]`` → network coordinates (T as ln T)."""
    _check_kind(kind)
    parts = list(params.unbind(-3))
    parts[-1] = torch.log(parts[-1].clamp_min(1e-6))
    return torch.stack(parts, -3)


def signal_model(kappa: torch.Tensor, times: torch.Tensor, kind: str) -> torch.Tensor:
    """Magnitude signal ``[batch, N, H, W]`` of network-coordinate maps ``[batch, Q, H, W]``."""
    p = to_physical(kappa, kind)
    if kind == "ir":
        s = inversion_recovery(p[:, 0], p[:, 1], p[:, 2], times)
    else:
        s = t2_decay(p[:, 0], p[:, 1], times)
    return s.permute(0, 3, 1, 2)


def nll_gradient(kappa: torch.Tensor, signal: torch.Tensor, times: torch.Tensor, kind: str) -> torch.Tensor:
    """∇_κ of ½·mean_n (S_n − f_n(κ))² per voxel (the Gaussian negative log-likelihood times σ²/N),
    by autograd through ``signal_model``; returned detached, shape of ``kappa``."""
    with torch.enable_grad():
        k = kappa.detach().requires_grad_(True)
        residual = signal_model(k, times, kind) - signal
        loss = 0.5 * (residual**2).mean(1).sum()
        (grad,) = torch.autograd.grad(loss, k)
    return grad.detach()


def scaled_nll_gradient(kappa: torch.Tensor, signal: torch.Tensor, times: torch.Tensor, kind: str,
                        damping: float = GAUSS_NEWTON_DAMPING) -> torch.Tensor:
    """``nll_gradient`` divided per voxel and parameter by the diagonal of the Gauss-Newton
    curvature, mean_n (∂f_n/∂κ_q)² + ``damping``: the gradient in units of its own parameter
    (a step, not a slope), so that A, B and ln T enter the RIM at comparable sizes whatever the
    voxel's signal level and relaxation time. Derivatives by forward-mode autograd (one
    Jacobian-vector product per parameter) through ``signal_model``; detached."""
    from torch.func import jvp

    kappa = kappa.detach()
    q = kappa.shape[1]
    grads, curv = [], []
    with torch.enable_grad():
        for i in range(q):
            tangent = torch.zeros_like(kappa)
            tangent[:, i] = 1.0
            f, df = jvp(lambda k: signal_model(k, times, kind), (kappa,), (tangent,))
            grads.append(((f - signal) * df).mean(1))
            curv.append((df**2).mean(1))
    g, h = torch.stack(grads, 1), torch.stack(curv, 1)
    return (g / (h + damping)).detach()


GRADIENT_INPUTS = ("raw", "gauss_newton")


def signal_scale(signal: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per image ``[batch]``: the median over ``mask`` (``[batch, H, W]``, default all voxels) of the
    maximum over the series; 1 where that is not positive."""
    mip = signal.amax(1)
    if mask is None:
        mask = torch.ones_like(mip, dtype=torch.bool)
    out = []
    for m, k in zip(mip, mask.bool()):
        v = m[k]
        out.append(v.median() if v.numel() else m.new_tensor(1.0))
    scale = torch.stack(out)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def initial_estimate(signal: torch.Tensor, kind: str) -> torch.Tensor:
    """κ₀ in network coordinates: A = maximum over the series, B = 2, T1 = 1 s / T2 = 0.1 s."""
    _check_kind(kind)
    a = signal.amax(1, keepdim=True)
    rest = [torch.full_like(a, INITIAL[p]) for p in PARAMETERS[kind][1:]]
    return to_network(torch.cat([a, *rest], 1), kind)


class ConvGRUCell(nn.Module):
    """Convolutional GRU: gates and candidate from ``kernel``×``kernel`` convolutions of the input
    and the hidden state (zero padding)."""

    def __init__(self, n_in: int, hidden: int, kernel: int = 1):
        super().__init__()
        self.hidden = hidden
        self.x2h = nn.Conv2d(n_in, 3 * hidden, kernel, padding=kernel // 2)
        self.h2h = nn.Conv2d(hidden, 3 * hidden, kernel, padding=kernel // 2, bias=False)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
        if h is None:
            h = x.new_zeros(x.shape[0], self.hidden, *x.shape[2:])
        xr, xz, xn = self.x2h(x).chunk(3, 1)
        hr, hz, hn = self.h2h(h).chunk(3, 1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h


class _RIMCell(nn.Module):
    """Seed 004 Fig. 1a right: conv3×3+tanh → GRU → 2×(conv3×3+tanh) → GRU → conv1×1."""

    def __init__(self, q: int, hidden: int, gru_kernel: int):
        super().__init__()
        self.conv_in = nn.Conv2d(2 * q, hidden, 3, padding=1)
        self.gru1 = ConvGRUCell(hidden, hidden, gru_kernel)
        self.conv_mid = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1), nn.Tanh(),
                                      nn.Conv2d(hidden, hidden, 3, padding=1), nn.Tanh())
        self.gru2 = ConvGRUCell(hidden, hidden, gru_kernel)
        self.conv_out = nn.Conv2d(hidden, q, 1)

    def forward(self, x, h1, h2):
        h1 = self.gru1(torch.tanh(self.conv_in(x)), h1)
        h2 = self.gru2(self.conv_mid(h1), h2)
        return self.conv_out(h2), h1, h2


def _kaiming(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class RIM(nn.Module):
    """Recurrent inference machine for ``kind`` (``ir`` or ``t2``); any number of time points.

    ``forward(signal, times)`` with ``signal`` ``[batch, N, H, W]`` already divided by its
    ``signal_scale`` and ``times`` ``[N]`` seconds returns the J estimates ``[J, batch, Q, H, W]``
    in network coordinates (the last one is the answer)."""

    def __init__(self, kind: str = "ir", hidden: int = 36, steps: int = 6, gru_kernel: int = 1,
                 gradient: str = "raw"):
        super().__init__()
        _check_kind(kind)
        if steps < 1 or hidden < 1 or gru_kernel < 1 or gru_kernel % 2 == 0:
            raise ValueError("RIM needs steps ≥ 1, hidden ≥ 1 and an odd GRU kernel")
        if gradient not in GRADIENT_INPUTS:
            raise ValueError(f"RIM gradient input {gradient!r}: use one of {', '.join(GRADIENT_INPUTS)}")
        self.kind, self.hidden, self.steps, self.gru_kernel = kind, int(hidden), int(steps), int(gru_kernel)
        self.gradient = gradient
        self.q = len(PARAMETERS[kind])
        self.cell = _RIMCell(self.q, self.hidden, self.gru_kernel)
        _kaiming(self)
        # start from small updates: κ stays near κ₀ until training says otherwise
        nn.init.normal_(self.cell.conv_out.weight, std=1e-3)

    @property
    def parameters_names(self) -> tuple[str, ...]:
        return PARAMETERS[self.kind]

    def config(self) -> dict:
        return {"kind": self.kind, "hidden": self.hidden, "steps": self.steps, "gru_kernel": self.gru_kernel,
                "gradient": self.gradient}

    @classmethod
    def from_config(cls, config: dict) -> "RIM":
        return cls(**config)

    def forward(self, signal: torch.Tensor, times: torch.Tensor | Sequence[float]) -> torch.Tensor:
        times = torch.as_tensor(times, dtype=signal.dtype, device=signal.device).reshape(-1)
        if signal.ndim != 4 or signal.shape[1] != times.numel():
            raise ValueError(f"RIM input must be [batch, N, H, W] with N = {times.numel()} time points, "
                             f"got {tuple(signal.shape)}")
        kappa = initial_estimate(signal, self.kind)
        h1 = h2 = None
        out = []
        for _ in range(self.steps):
            grad = (nll_gradient if self.gradient == "raw" else scaled_nll_gradient)(kappa, signal, times, self.kind)
            delta, h1, h2 = self.cell(torch.cat([kappa, grad], 1), h1, h2)
            kappa = kappa + delta
            out.append(kappa)
        return torch.stack(out)


class _ResidualBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(n_in, n_out, 3, padding=1, bias=False), nn.BatchNorm2d(n_out), nn.ReLU(),
            nn.Conv2d(n_out, n_out, 3, padding=1, bias=False), nn.BatchNorm2d(n_out))
        self.skip = nn.Identity() if n_in == n_out else nn.Conv2d(n_in, n_out, 1, bias=False)

    def forward(self, x):
        return torch.relu(self.skip(x) + self.body(x))


class RelaxResNet(nn.Module):
    """Seed 004's ResNet for ``kind`` and a fixed number of time points ``n_times``.

    ``channels`` are the widths of the residual blocks (``SEED_RESNET_CHANNELS`` is the seed's
    architecture; the default is narrower for CPU training). ``forward(signal, times)`` returns
    ``[1, batch, Q, H, W]`` network coordinates (one "step", so it shares the RIM's interface)."""

    def __init__(self, kind: str = "ir", n_times: int = 6, channels: Sequence[int] = (40,) * 6, width: int = 40):
        super().__init__()
        _check_kind(kind)
        if n_times < 1 or not channels or min(channels) < 1:
            raise ValueError("ResNet needs n_times ≥ 1 and at least one residual block")
        self.kind, self.n_times, self.channels, self.width = kind, int(n_times), tuple(int(c) for c in channels), int(width)
        self.q = len(PARAMETERS[kind])
        layers: list[nn.Module] = [nn.Conv2d(self.n_times, self.width, 1, bias=False), nn.BatchNorm2d(self.width),
                                   nn.ReLU()]
        prev = self.width
        for c in self.channels:
            layers.append(_ResidualBlock(prev, c))
            prev = c
        layers.append(nn.Conv2d(prev, self.q, 1))
        self.net = nn.Sequential(*layers)
        _kaiming(self)
        # the output starts at κ₀ of the RIM (B = 2, T = 1 s / 0.1 s, A = 1): learn the residual
        init = torch.tensor([1.0, *(INITIAL[p] for p in PARAMETERS[kind][1:])])
        self.register_buffer("offset", to_network(init[:, None, None], kind)[:, 0, 0])

    @property
    def parameters_names(self) -> tuple[str, ...]:
        return PARAMETERS[self.kind]

    def config(self) -> dict:
        return {"kind": self.kind, "n_times": self.n_times, "channels": list(self.channels), "width": self.width}

    @classmethod
    def from_config(cls, config: dict) -> "RelaxResNet":
        return cls(**config)

    def forward(self, signal: torch.Tensor, times: torch.Tensor | Sequence[float] | None = None) -> torch.Tensor:
        if signal.ndim != 4 or signal.shape[1] != self.n_times:
            raise ValueError(f"this ResNet was trained for {self.n_times} time points; got input "
                             f"{tuple(signal.shape)} — train one for this series (bids_qmri-train)")
        return (self.net(signal) + self.offset[:, None, None])[None]


def rim_loss(estimates: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
             param_weight: torch.Tensor | Sequence[float] | None = None,
             voxel_weight: torch.Tensor | None = None, bias_weight: float = 0.0,
             bias_groups: torch.Tensor | None = None, bias_patch_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Seed 004 eq. 6: mean over the J estimates ``[J, batch, Q, H, W]`` of the squared error to
    ``target`` ``[batch, Q, H, W]`` (network coordinates), averaged over the voxels where ``weight``
    ``[batch, H, W]`` is 1 (default all) and the Q parameters. ``param_weight`` ``[Q]`` multiplies
    each parameter's squared error (default all 1: eq. 6). ``voxel_weight`` ``[batch, H, W]``
    multiplies each voxel's squared error without changing the divisor (the count of ``weight``'s
    voxels), so only the up-weighted voxels' terms change (default all 1: eq. 6).

    ``bias_weight`` λ > 0 adds λ × ``patch_bias_term``: the mean over steps, patches and parameters
    of the squared mean error over each patch's loss voxels (an estimate of the patch's bias, since
    a patch has one parameter draw per tissue and independent voxel noise; ln T's mean error is
    about its relative bias); with ``bias_groups`` ``[batch, H, W]`` (integer labels, e.g. each voxel's
    dominant tissue, ``Patches.tissue``) per patch and group instead; ``bias_patch_weight`` ``[batch]``
    multiplies each patch's squared biases (the trainer passes the SNR weight it puts on the patch's
    voxels, so a patch counts in the term as in eq. 6). λ = 0 (default) returns eq. 6 exactly as
    without the arguments."""
    err = (estimates - target[None]) ** 2
    if param_weight is not None:
        err = err * torch.as_tensor(param_weight, dtype=err.dtype, device=err.device)[:, None, None]
    if voxel_weight is not None:
        err = err * voxel_weight[None, :, None].to(err.dtype)
    if weight is None:
        loss = err.mean()
    else:
        w = weight[None, :, None].to(err.dtype)
        loss = (err * w).sum() / (w.sum() * err.shape[0] * err.shape[2]).clamp_min(1.0)
    if bias_weight:
        loss = loss + bias_weight * patch_bias_term(estimates, target, weight, bias_groups, bias_patch_weight)
    return loss


def patch_bias_term(estimates: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                    groups: torch.Tensor | None = None, patch_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Squared patch bias: the mean of the (unweighted) error ``estimates - target`` over each patch's
    voxels where ``weight`` ``[batch, H, W]`` is 1 (default all), squared, and averaged over the J
    steps, the patches and the Q parameters (a patch without loss voxels counts 0). With ``groups``
    ``[batch, H, W]`` (integer labels ≥ 0; < 0 leaves a voxel out) the mean error is taken per patch
    and label instead, and the squares are averaged over steps, parameters and (patch, label) pairs
    weighted by the pair's count of loss voxels (a label on a handful of voxels weighs little: its mean
    is mostly noise). ``patch_weight`` ``[batch]`` multiplies each patch's squares without changing the
    divisor (as ``rim_loss``'s ``voxel_weight`` does in eq. 6; default all 1). Neither the parameter nor
    the per-voxel weights of eq. 6 enter: it measures bias in network coordinates (A scaled, B, ln T)."""
    diff = estimates - target[None]  # [J, batch, Q, H, W]
    if weight is None:
        weight = torch.ones(diff.shape[1:2] + diff.shape[-2:], dtype=diff.dtype, device=diff.device)
    w = weight.to(diff.dtype)
    if groups is None:
        mean_err = (diff * w[None, :, None]).sum(dim=(-2, -1)) / w.sum(dim=(-2, -1)).clamp_min(1.0)[None, :, None]
        sq = mean_err ** 2
        if patch_weight is not None:
            sq = sq * patch_weight.to(sq.dtype)[None, :, None]
        return sq.mean()
    groups = groups.long()
    n_groups = int(groups.max()) + 1 if groups.numel() else 0
    if n_groups <= 0:
        return diff.new_zeros(())
    member = torch.nn.functional.one_hot(groups.clamp_min(0), n_groups).to(diff.dtype)  # [batch, H, W, G]
    member = member * ((groups >= 0).to(diff.dtype) * w)[..., None]
    count = member.sum(dim=(1, 2))  # [batch, G]
    mean_err = torch.einsum("jbqhw,bhwg->jbqg", diff, member) / count.clamp_min(1.0)[None, :, None]
    pair_weight = count if patch_weight is None else count * patch_weight.to(count.dtype)[:, None]
    return ((mean_err ** 2) * pair_weight[None, :, None]).sum() / (count.sum() * diff.shape[0] * diff.shape[2]).clamp_min(1.0)
