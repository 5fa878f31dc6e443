"""The pc-bSSFP networks (SVNN / PINN, magnitude and complex; seeds 000/001, SPEC §7).

Magnitude nets: 4 → 64 → 64 → 2 (inputs |F−1|, |F0|, |F1|, B1; outputs T1, T2).
Complex nets:   6 → 256 → 256 → 3 (inputs Re F−1, Re F0, Re F1, Im F−1, Im F1, B1; outputs
T1, T2, ΔB0). Im F0 is left out: after receiver-phase removal F0 is real.
Both are ``ScaledMLP``s (ReLU hidden layers, sigmoid outputs scaled to the parameter range).

Noise-conditioned nets (``noise_input=True``, issue 18) take one more input, last: the noise level
η = σ_F / ‖F‖, the per-channel standard deviation of the complex noise on the configurations
divided by the voxel's configuration norm, i.e. the noise in the units of the unit-norm features
the net sees (0 = noise-free). It is M0-free (the unknown in-vivo signal scale cancels), so the
same number comes from a simulation at a known SNR (``configuration_noise_sigma``) and from a
scan's background (``estimate.estimate_noise_sigma``). Files without the flag load as before.
"""

from __future__ import annotations

import torch

from bids_qmri.nets.mlp import ScaledMLP

__all__ = ["ARCHITECTURES", "BSSFPNet", "NOISE_INPUT_NAME", "NOISE_INPUT_SCALE", "add_noise_input", "bssfp_features",
           "configuration_noise_sigma", "input_names", "noise_level", "widen_for_noise_input"]

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


NOISE_INPUT_NAME = "eta = sigma_F / ||F||"
#: Share of the measured noise level a noise-conditioned net is told at inference (``estimate_bssfp``).
#: Trained with mean-squared error, the net given the true η returns the posterior mean under its
#: training prior, whose long T1/T2 tail (CSF) pulls tissue estimates up at low SNR (+5 % median T1
#: bias in vivo at SNR 15); η = 0 gives the noise-free estimator with its heavy tails at SNR 10. A
#: fraction in between trades the two (measured: models/bundled/bssfp/TRAINING.md).
NOISE_INPUT_SCALE = 0.5


def input_names(kind: str, noise_input: bool = False) -> list[str]:
    names = (["Re F-1", "Re F0", "Re F1", "Im F-1", "Im F1", "B1"] if kind == "complex"
             else ["|F-1|", "|F0|", "|F1|", "B1"])
    return names + [NOISE_INPUT_NAME] if noise_input else names


def configuration_noise_sigma(signal_sigma, npc: int):
    """Per-channel noise σ of the configurations F_p = (1/Npc) Σ_j S_j e^{ipφ_j} for white complex
    noise of per-channel σ on the ``npc`` phase-cycle signals: σ/√Npc (Σ_j |1/Npc|² = 1/Npc)."""
    return signal_sigma / npc**0.5


def noise_level(f: torch.Tensor, sigma_f) -> torch.Tensor:
    """η = σ_F / ‖F‖ per voxel for configurations ``f [..., 3]`` that are *not* normalised and their
    per-channel noise σ (scalar or ``[...]``; 0 = noise-free). Voxels with ‖F‖ = 0 get 0."""
    norm = torch.linalg.vector_norm(f, dim=-1)
    sigma = torch.as_tensor(sigma_f, dtype=norm.dtype, device=norm.device)
    return torch.where(norm > 0, sigma / norm.clamp_min(1e-30), torch.zeros_like(norm))


def add_noise_input(features: torch.Tensor, eta) -> torch.Tensor:
    """Append the noise level η (``[N]`` or scalar) to ``features [N, n]`` as the last column."""
    eta = torch.as_tensor(eta, dtype=features.dtype, device=features.device)
    return torch.cat([features, eta.expand(features.shape[:-1]).unsqueeze(-1)], dim=-1)


class BSSFPNet(ScaledMLP):
    """MLP mapping bSSFP features to (T1 [s], T2 [s][, ΔB0 [Hz]])."""

    def __init__(self, kind: str, ranges: dict[str, tuple[float, float]], hidden: int | None = None,
                 log_outputs: tuple[str, ...] = (), noise_input: bool = False):
        if kind not in ARCHITECTURES:
            raise ValueError(f"unknown network kind {kind!r}; use one of {sorted(ARCHITECTURES)}")
        n_in, default_hidden, outputs = ARCHITECTURES[kind]
        super().__init__(n_in + int(bool(noise_input)), int(hidden or default_hidden), outputs, ranges,
                         log_outputs=log_outputs)
        self.kind = kind
        self.noise_input = bool(noise_input)
        #: the signal features (B1 last among them); a noise-conditioned net has η after them
        self.n_features = n_in

    def config(self) -> dict:
        config = {"kind": self.kind, "hidden": self.hidden, "ranges": self.ranges}
        if self.log_outputs:
            config["log_outputs"] = list(self.log_outputs)
        if self.noise_input:  # absent in files written before it: those nets take no noise input
            config["noise_input"] = True
        return config

    @classmethod
    def from_config(cls, config: dict) -> "BSSFPNet":
        return cls(config["kind"], {k: tuple(v) for k, v in config["ranges"].items()}, hidden=config["hidden"],
                   log_outputs=tuple(config.get("log_outputs", ())), noise_input=bool(config.get("noise_input", False)))


def widen_for_noise_input(net: BSSFPNet, start: BSSFPNet, eta_mean: float = 0.0, eta_std: float = 1.0) -> None:
    """Load a net without noise input (``start``) into the noise-conditioned ``net`` of the same kind,
    ranges and width: every weight and statistic copied, the η column's first-layer weights zero (so
    ``net`` computes exactly what ``start`` does, whatever η), η standardised with ``eta_mean`` /
    ``eta_std`` (the training mixture's, so that fine-tuning sees it on the scale of the others)."""
    if not net.noise_input or getattr(start, "noise_input", False):
        raise ValueError("widen_for_noise_input: needs a noise-conditioned net and a start net without noise input")
    if start.kind != net.kind or start.hidden != net.hidden or start.n_in != net.n_in - 1:
        raise ValueError(f"widen_for_noise_input: a {start.kind} net of width {start.hidden} cannot start a "
                         f"{net.kind} net of width {net.hidden}")
    state = start.state_dict()
    with torch.no_grad():
        first = net.net[0]
        first.weight.zero_()
        first.weight[:, : start.n_in].copy_(state["net.0.weight"])
        first.bias.copy_(state["net.0.bias"])
        for key, value in state.items():
            if key in ("net.0.weight", "net.0.bias", "in_mean", "in_std"):
                continue
            net.state_dict()[key].copy_(value)
        net.in_mean.copy_(torch.cat([state["in_mean"], torch.tensor([float(eta_mean)])]))
        net.in_std.copy_(torch.cat([state["in_std"], torch.tensor([max(float(eta_std), 1e-6)])]))
