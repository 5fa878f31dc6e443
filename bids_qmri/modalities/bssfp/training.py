"""Training of the pc-bSSFP networks from on-the-fly simulation (seeds 000/001; SPEC §7).

Parameters are drawn from one of three distributions, signals are simulated with
``bids_qmri.physics.bssfp`` (optionally with complex Gaussian noise, fresh for every batch),
turned into receiver-phase-free, unit-norm configurations and network features, and the MLP is
trained by the package's loop (``bids_qmri.training.loop``: Adam, early stopping).
SVNN: MSE on the parameters scaled to [0, 1]. PINN: MSE between the input features and the
features re-simulated from the prediction through the same physics and the same feature function.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import torch

from bids_qmri.modalities.bssfp.net import (
    BSSFPNet,
    add_noise_input,
    bssfp_features,
    configuration_noise_sigma,
    input_names,
    noise_level,
    widen_for_noise_input,
)
from bids_qmri.physics.bssfp import (
    BSSFPProtocol,
    bssfp_signal,
    configurations,
    normalise_configurations,
    remove_receiver_phase,
)
from bids_qmri.physics.noise import add_complex_noise, noise_sigma
from bids_qmri.training.loop import LR_SCHEDULES, LoopSettings, train_loop, training_record

__all__ = [
    "B1_RANGE",
    "DEFAULT_DISTRIBUTION",
    "DISTRIBUTIONS",
    "METHODS",
    "PINN_FEATURE_SCALES",
    "TrainConfig",
    "b0_range_hz",
    "features_from_parameters",
    "log_outputs",
    "network_loss",
    "noisy_signal",
    "parameter_ranges",
    "sample_snr",
    "sample_parameters",
    "simulate_features",
    "train_bssfp_net",
]

log = logging.getLogger("bids_qmri.modalities.bssfp.training")

#: method -> (network kind, loss)
METHODS = {
    "svnn": ("magnitude", "svnn"),
    "pinn": ("magnitude", "pinn"),
    "svnncomplex": ("complex", "svnn"),
    "pinncomplex": ("complex", "pinn"),
}
B1_RANGE = (0.7, 1.3)
#: B1 ranges that differ from ``B1_RANGE`` (brain: 3 T transmit fields reach ±40 %)
B1_RANGES = {"brain": (0.6, 1.4), "loguniform": (0.6, 1.4)}


def b1_range(distribution: str) -> tuple[float, float]:
    return B1_RANGES.get(distribution, B1_RANGE)
#: T1/T2 ranges in seconds (seed 000: the uniform and in-vivo ranges are brain mean ± 2 SD at 3 T)
DISTRIBUTIONS = {
    "uniform": {"T1": (0.36, 2.08), "T2": (0.02, 0.12)},
    "uniform_extended": {"T1": (0.36, 5.0), "T2": (0.02, 2.5)},
    "invivo": {"T1": (0.36, 2.08), "T2": (0.02, 0.12)},
    "loguniform": {"T1": (0.25, 5.0), "T2": (0.015, 2.5)},
    "brain": {"T1": (0.25, 5.0), "T2": (0.015, 2.5)},
}
#: The default distribution of the bundled models (``--bssfp-models default``): brain tissue and
#: its partial volume with CSF (3 T CSF: T1 ~3.5–4.5 s, T2 ~2 s). Half the samples are
#: log-uniform over the whole range (T2 < T1), half uniform over the seed's tissue range, so the
#: density in WM/GM stays close to the seed models' while CSF partial volume is covered.
BRAIN_TISSUE_SHARE = 0.5
DEFAULT_DISTRIBUTION = "brain"
#: Distributions whose T1/T2 outputs are log-scaled (``targets="auto"``): their ranges span two
#: decades, where a linear output would spend its precision on CSF values.
LOG_TARGET_DISTRIBUTIONS = ("brain", "loguniform")
TARGET_SCALES = ("auto", "linear", "log")
# In-vivo-like density: the seed's density map came from subject data we do not have, so we use a
# Gaussian mixture at typical 3 T white matter, grey matter and WM/GM/CSF partial-volume values
# (T1 s, T2 s, SD T1, SD T2, weight), truncated to the uniform range.
INVIVO_MIXTURE = (
    (0.83, 0.045, 0.10, 0.006, 0.45),
    (1.30, 0.060, 0.15, 0.009, 0.40),
    (1.60, 0.085, 0.25, 0.018, 0.15),
)


def b0_range_hz(tr: float) -> tuple[float, float]:
    """Off-resonance covered by the complex nets: θ = 2π·ΔB0·TR over (−π, π)."""
    return (-1.0 / (2 * tr), 1.0 / (2 * tr))


def parameter_ranges(distribution: str, kind: str, tr: float) -> dict[str, tuple[float, float]]:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; use one of {sorted(DISTRIBUTIONS)}")
    ranges = dict(DISTRIBUTIONS[distribution])
    if kind == "complex":
        ranges["B0"] = b0_range_hz(tr)
    return ranges


def _uniform(n, lo, hi, g, dtype):
    return torch.empty(n, dtype=dtype).uniform_(lo, hi, generator=g)


def sample_parameters(
    distribution: str,
    n: int,
    generator: torch.Generator,
    *,
    tr: float,
    with_b0: bool = False,
    theta_margin: float = 0.0,
    dtype: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    """Draw ``n`` tissue parameter sets (T1, T2 in s, B1, B0 in Hz); T1 > T2 always.

    With ``with_b0``, θ = 2π·ΔB0·TR is uniform in (−π, π) shrunk by ``theta_margin``·π at both ends.
    """
    ranges = parameter_ranges(distribution, "complex" if with_b0 else "magnitude", tr)
    (t1_lo, t1_hi), (t2_lo, t2_hi) = ranges["T1"], ranges["T2"]
    t1_parts, t2_parts, have = [], [], 0
    while have < n:
        m = max(2 * (n - have), 1024)
        if distribution == "invivo":
            comp = torch.tensor([c[4] for c in INVIVO_MIXTURE], dtype=dtype)
            k = torch.multinomial(comp, m, replacement=True, generator=generator)
            mix = torch.tensor([c[:4] for c in INVIVO_MIXTURE], dtype=dtype)[k]
            z = torch.randn(m, 2, dtype=dtype, generator=generator)
            t1 = mix[:, 0] + mix[:, 2] * z[:, 0]
            t2 = mix[:, 1] + mix[:, 3] * z[:, 1]
        elif distribution in ("loguniform", "brain"):
            t1 = _uniform(m, math.log(t1_lo), math.log(t1_hi), generator, dtype).exp()
            t2 = _uniform(m, math.log(t2_lo), math.log(t2_hi), generator, dtype).exp()
            if distribution == "brain":
                (s1_lo, s1_hi), (s2_lo, s2_hi) = DISTRIBUTIONS["uniform"]["T1"], DISTRIBUTIONS["uniform"]["T2"]
                tissue = _uniform(m, 0.0, 1.0, generator, dtype) < BRAIN_TISSUE_SHARE
                t1 = torch.where(tissue, _uniform(m, s1_lo, s1_hi, generator, dtype), t1)
                t2 = torch.where(tissue, _uniform(m, s2_lo, s2_hi, generator, dtype), t2)
        else:
            t1 = _uniform(m, t1_lo, t1_hi, generator, dtype)
            t2 = _uniform(m, t2_lo, t2_hi, generator, dtype)
        keep = (t1 > t2) & (t1 >= t1_lo) & (t1 <= t1_hi) & (t2 >= t2_lo) & (t2 <= t2_hi)
        t1_parts.append(t1[keep])
        t2_parts.append(t2[keep])
        have += int(keep.sum())
    out = {
        "T1": torch.cat(t1_parts)[:n],
        "T2": torch.cat(t2_parts)[:n],
        "B1": _uniform(n, *b1_range(distribution), generator, dtype),
    }
    if with_b0:
        # θ uniform in (−π, π), open at both ends (seed 001: no training data on the phase wrap)
        shrink = 1 - max(float(theta_margin), 1e-6)
        lo, hi = b0_range_hz(tr)
        out["B0"] = _uniform(n, lo * shrink, hi * shrink, generator, dtype)
    else:
        out["B0"] = torch.zeros(n, dtype=dtype)
    return out


def simulate_signal(params: dict[str, torch.Tensor], protocol: BSSFPProtocol) -> torch.Tensor:
    """Complex pc-bSSFP signals ``[N, Npc]`` (M0 = 1) for parameter sets from ``sample_parameters``."""
    dtype = params["T1"].dtype
    return bssfp_signal(
        params["T1"], params["T2"], 1.0, params["B1"], params["B0"],
        tr=protocol.tr, te=protocol.te, flip_rad=protocol.flip_rad,
        phase_increments_rad=protocol.phase_increments_rad(dtype),
    )


def signal_to_features(signal: torch.Tensor, b1: torch.Tensor, protocol: BSSFPProtocol, kind: str,
                       signal_sigma=None) -> torch.Tensor:
    """Receiver-phase removal → configurations (−1, 0, 1) → unit norm → network features.

    With ``signal_sigma`` (the per-channel noise σ of ``signal``, scalar or ``[N]``; 0 = noise-free)
    the noise level η = σ_F/‖F‖ (``net.noise_level``) is appended: a noise-conditioned net's input."""
    phi = protocol.phase_increments_rad(signal.real.dtype)
    raw = configurations(remove_receiver_phase(signal), phi)
    x = bssfp_features(normalise_configurations(raw), b1, kind)
    if signal_sigma is None:
        return x
    return add_noise_input(x, noise_level(raw, configuration_noise_sigma(torch.as_tensor(signal_sigma), protocol.npc)))


def features_from_parameters(t1, t2, b1, b0, protocol: BSSFPProtocol, kind: str) -> torch.Tensor:
    """Noise-free features for given parameters (differentiable: the PINN re-simulation)."""
    s = bssfp_signal(
        t1, t2, 1.0, b1, b0, tr=protocol.tr, te=protocol.te, flip_rad=protocol.flip_rad,
        phase_increments_rad=protocol.phase_increments_rad(t1.dtype),
    )
    return signal_to_features(s, b1, protocol, kind)


def simulate_features(
    params: dict[str, torch.Tensor],
    protocol: BSSFPProtocol,
    kind: str,
    *,
    snr: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Features of simulated signals, with complex noise at ``snr`` (seed definition) if given."""
    s = simulate_signal(params, protocol)
    if snr is not None and math.isfinite(snr):
        s = add_complex_noise(s, snr, generator)
    return signal_to_features(s, params["B1"], protocol, kind)


def sample_snr(
    n: int,
    snr_range: tuple[float, float],
    noise_free_fraction: float,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """One SNR per sample: log-uniform over ``snr_range``, and ``inf`` (no noise) for exactly
    ``round(noise_free_fraction·n)`` samples at random places.

    Log-uniform so that every decade of SNR gets the same share (noise at SNR 10 and at SNR 100
    shape different parts of the estimator); the noise-free share keeps the noise-free accuracy
    (seed 001 Fig. 5) that a purely noisy training set gives away.
    """
    lo, hi = (float(v) for v in snr_range)
    snr = _uniform(n, math.log(lo), math.log(hi), generator, dtype).exp()
    n_free = int(round(noise_free_fraction * n))
    if n_free:
        snr[torch.randperm(n, generator=generator)[:n_free]] = math.inf
    return snr


def noisy_signal(
    signal: torch.Tensor,
    generator: torch.Generator,
    *,
    snr: float | None = None,
    snr_range: tuple[float, float] | None = None,
    noise_free_fraction: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | float | None]:
    """``signal [N, Npc]`` with complex noise at one ``snr`` or, with ``snr_range``, at a per-sample
    SNR from ``sample_snr``; returns ``(noisy, snr used)``. No noise when neither is given."""
    if snr_range is not None:
        per_sample = sample_snr(signal.shape[0], snr_range, noise_free_fraction, generator, signal.real.dtype)
        # σ = 0 where the SNR is inf: those samples come back unchanged
        return add_complex_noise(signal, per_sample.unsqueeze(-1), generator), per_sample
    if snr is not None and math.isfinite(snr):
        return add_complex_noise(signal, snr, generator), snr
    return signal, None


PINN_FEATURE_SCALES = ("none", "input_std")


def network_loss(
    net: BSSFPNet,
    x: torch.Tensor,
    target: torch.Tensor,
    loss: str,
    protocol: BSSFPProtocol,
    *,
    pinn_feature_scale: str = "none",
) -> torch.Tensor:
    """SVNN: MSE of the [0, 1]-scaled parameters. PINN: MSE of features re-simulated from the
    prediction against the input features (B1, an input, is excluded: it is copied through).

    ``pinn_feature_scale="input_std"`` takes the PINN residuals in the network's standardised input
    units (divided by ``net.in_std``). Raw unit-norm features are dominated by Re/Im F±1, which
    swing with θ, so ΔB0 outweighs T1/T2 and the loss is badly conditioned (complex nets: median
    condition number of JᵀJ ~4e3 raw vs ~3e2–9e2 standardised, J = ∂features/∂outputs).
    """
    unit = net.forward_unit(x)
    if loss == "svnn":
        return torch.mean((unit - net.to_unit(target)) ** 2)
    if loss == "pinn":
        pred = net.to_physical(unit)
        n = getattr(net, "n_features", x.shape[1])  # a noise-conditioned net's η follows B1
        b1 = x[:, n - 1]
        b0 = pred[:, 2] if net.kind == "complex" else torch.zeros_like(b1)
        resim = features_from_parameters(pred[:, 0], pred[:, 1], b1, b0, protocol, net.kind)
        residual = resim[:, :-1] - x[:, : n - 1]
        if pinn_feature_scale == "input_std":
            residual = residual / net.in_std[: n - 1]
        elif pinn_feature_scale != "none":
            raise ValueError(f"unknown pinn_feature_scale {pinn_feature_scale!r}; use one of {PINN_FEATURE_SCALES}")
        return torch.mean(residual**2)
    raise ValueError(f"unknown loss {loss!r}: use 'svnn' or 'pinn'")


@dataclass
class TrainConfig:
    """Training settings; defaults are the seed papers' (SPEC §7)."""

    method: str = "pinn"
    distribution: str = "uniform"
    n_samples: int = 400_000
    max_epochs: int = 300
    patience: int = 25
    batch_size: int = 128
    lr: float = 2e-4
    lr_schedule: str = "constant"  # "cosine": anneal to 0 over max_epochs (short budgets); "step": halve every 40
    val_fraction: float = 0.1
    snr: float | None = None  # training noise; None = noise-free (the seeds' choice)
    # per-sample training noise instead of one snr: SNR log-uniform over (lo, hi), redrawn every
    # batch, and noise_free_fraction of every batch without noise (protects the noise-free accuracy)
    snr_range: tuple[float, float] | None = None
    noise_free_fraction: float = 0.0
    # noise-conditioned net (issue 18): one more input, η = σ_F/‖F‖ of each sample's training noise
    # (0 when noise-free); needs training noise. From a net without it (init_from): η's weights start at 0
    noise_input: bool = False
    # complex nets: leave |θ| > (1 − margin)·π out of training. A smooth network cannot jump from
    # +π to −π where the signal wraps; samples there dominated the PINN loss (plateau ~6e-4)
    theta_margin: float = 0.05
    init_from: str | None = None  # continue from a saved network of the same kind (fine-tuning)
    # PINN residuals in raw feature units (the seed's) or in the network's standardised input units
    pinn_feature_scale: str = "none"
    # weights returned: "best" (lowest validation loss, the seeds' early stopping) or "last" (the final
    # epoch of an annealed schedule; where a few wrap samples make the validation loss noisy, e.g. Npc 4)
    keep: str = "best"
    seed: int = 0
    threads: int = 1
    device: str = "cpu"  # where the network trains; simulation stays on the CPU (seeded generator)
    progress: bool | None = None  # None: a bar only on a terminal
    # T1/T2 outputs scaled linearly or logarithmically over their range; "auto": log for the
    # distributions in LOG_TARGET_DISTRIBUTIONS (ΔB0 is always linear)
    targets: str = "auto"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.targets not in TARGET_SCALES:
            raise ValueError(f"unknown targets {self.targets!r}; use one of {', '.join(TARGET_SCALES)}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; use one of {sorted(METHODS)}")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {self.distribution!r}; use one of {sorted(DISTRIBUTIONS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; use one of {', '.join(LR_SCHEDULES)}")
        if self.pinn_feature_scale not in PINN_FEATURE_SCALES:
            raise ValueError(f"unknown pinn_feature_scale {self.pinn_feature_scale!r}; use one of {PINN_FEATURE_SCALES}")
        if self.keep not in ("best", "last"):
            raise ValueError(f"unknown keep {self.keep!r}; use 'best' or 'last'")
        if self.snr_range is not None:
            if self.snr is not None:
                raise ValueError("give one training noise: snr or snr_range, not both")
            lo, hi = self.snr_range = tuple(float(v) for v in self.snr_range)
            if not (0 < lo <= hi < math.inf):
                raise ValueError(f"snr_range must be 0 < LO <= HI < inf, got {lo:g} {hi:g}")
        if not 0.0 <= self.noise_free_fraction <= 1.0:
            raise ValueError(f"noise_free_fraction must lie in [0, 1], got {self.noise_free_fraction:g}")
        if self.noise_input and self.snr_range is None and (self.snr is None or not math.isfinite(self.snr)):
            raise ValueError("noise_input needs training noise (snr_range or snr): the net learns what η means from it")
        if self.noise_free_fraction and self.snr_range is None:
            raise ValueError("noise_free_fraction needs snr_range (the mixture it is a part of)")
        if self.n_samples < 20 or self.max_epochs < 1 or self.batch_size < 1:
            raise ValueError("need at least 20 samples, 1 epoch and batch size 1")


def log_outputs(cfg: TrainConfig) -> tuple[str, ...]:
    """The outputs a network trained with ``cfg`` scales logarithmically."""
    log_scaled = cfg.targets == "log" or (cfg.targets == "auto" and cfg.distribution in LOG_TARGET_DISTRIBUTIONS)
    return ("T1", "T2") if log_scaled else ()


def _targets(params: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    keys = ("T1", "T2", "B0") if kind == "complex" else ("T1", "T2")
    return torch.stack([params[k] for k in keys], dim=-1)


def loop_settings(cfg: TrainConfig, desc: str) -> LoopSettings:
    return LoopSettings(max_epochs=cfg.max_epochs, patience=cfg.patience, batch_size=cfg.batch_size, lr=cfg.lr,
                        lr_schedule=cfg.lr_schedule, keep=cfg.keep, progress=cfg.progress, desc=desc)


def train_bssfp_net(
    protocol: BSSFPProtocol, cfg: TrainConfig, *, epoch_callback=None
) -> tuple[BSSFPNet, dict]:
    """Simulate, train and return ``(net, card)``; the card still lacks the weights checksum.

    ``epoch_callback(epoch, net, val_loss)`` is called after every epoch (for learning curves).
    """
    kind, loss_name = METHODS[cfg.method]
    device = torch.device(cfg.device)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.threads)))
    t_start, cpu_start = time.perf_counter(), time.process_time()
    try:
        gen = torch.Generator().manual_seed(cfg.seed)
        params = sample_parameters(cfg.distribution, cfg.n_samples, gen, tr=protocol.tr,
                                   with_b0=kind == "complex", theta_margin=cfg.theta_margin)
        n_val = max(1, int(round(cfg.val_fraction * cfg.n_samples)))
        n_train = cfg.n_samples - n_val
        # noise-free features of the whole set; with training noise the signals are kept and
        # noised afresh per batch
        signal = simulate_signal(params, protocol)
        clean = signal_to_features(signal, params["B1"], protocol, kind).float()
        targets = _targets(params, kind).float().to(device)
        b1 = params["B1"]
        noise = {"snr": cfg.snr, "snr_range": cfg.snr_range, "noise_free_fraction": cfg.noise_free_fraction}
        noisy = cfg.snr_range is not None or (cfg.snr is not None and math.isfinite(cfg.snr))

        def noisy_features(idx):
            s, snr = noisy_signal(signal[idx], gen, **noise)
            sigma = noise_sigma(torch.as_tensor(snr, dtype=torch.float64)) if cfg.noise_input else None
            return signal_to_features(s, b1[idx], protocol, kind, signal_sigma=sigma).float()

        if noisy:
            # one fixed noise draw for validation, from the same mixture as training
            val_x = noisy_features(slice(n_train, None))
        else:
            val_x = clean[n_train:]
        val_x, val_y = val_x.to(device), targets[n_train:]
        t_sim = time.perf_counter() - t_start

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            net = BSSFPNet(kind, parameter_ranges(cfg.distribution, kind, protocol.tr), log_outputs=log_outputs(cfg),
                           noise_input=cfg.noise_input)
        # input statistics of a noise-conditioned net: one draw of the training mixture (η's scale)
        stats_x = noisy_features(slice(0, n_train)) if cfg.noise_input else None
        init = None
        if cfg.init_from:
            from bids_qmri.nets.io import load_net

            start_net = load_net(cfg.init_from)
            if (getattr(start_net, "kind", None) != kind or start_net.ranges != net.ranges
                    or getattr(start_net, "log_outputs", ()) != net.log_outputs):
                raise ValueError(f"{cfg.init_from}: a {getattr(start_net, 'kind', type(start_net).__name__)} network "
                                 f"with other ranges cannot initialise {cfg.method} — pick a model of the same "
                                 "method and distribution")
            if cfg.noise_input and not getattr(start_net, "noise_input", False):
                # η's weights start at zero: the widened net equals the start net before fine-tuning
                widen_for_noise_input(net, start_net, float(stats_x[:, -1].mean()), float(stats_x[:, -1].std()))
            elif bool(getattr(start_net, "noise_input", False)) != cfg.noise_input:
                raise ValueError(f"{cfg.init_from}: a noise-conditioned network cannot initialise one without "
                                 "noise input — start from a net without it, or train with --noise-input")
            else:
                net.load_state_dict(start_net.state_dict())  # keeps its input statistics too
            init = _file_digest(cfg.init_from)
        else:
            net.set_input_stats(clean[:n_train] if stats_x is None else stats_x)
        net.to(device)
        clean = clean.to(device)

        def batch(idx):
            if noisy:
                return noisy_features(idx).to(device), targets[idx]
            return clean[idx], targets[idx]

        def loss(model, xy):
            return network_loss(model, xy[0], xy[1], loss_name, protocol, pinn_feature_scale=cfg.pinn_feature_scale)

        def validate(model):
            return loss(model, (val_x, val_y))

        settings = loop_settings(cfg, f"{cfg.method} Npc{protocol.npc}")
        result = train_loop(net, n_train=n_train, batch=batch, loss=loss, validate=validate, settings=settings,
                            generator=gen, epoch_callback=epoch_callback, log=log)
        net.to("cpu")
    finally:
        torch.set_num_threads(old_threads)

    training = training_record(settings, result, n_train=n_train, n_val=n_val, simulation_s=t_sim,
                               wall_s=time.perf_counter() - t_start)
    training["cpu_s"] = round(time.process_time() - cpu_start, 1)
    training.update({k: v for k, v in asdict(cfg).items()
                     if k not in ("progress", "extra", "method", "distribution", "init_from") and k not in training})
    training.update(cfg.extra)
    card = {
        "name": f"bids_qmri-bssfp-{cfg.method}-npc{protocol.npc}-{protocol.key()}",
        "modality": "bssfp",
        "method": cfg.method,
        "architecture": {"class": "BSSFPNet", "kind": kind, "hidden": net.hidden,
                         "inputs": input_names(kind, net.noise_input), "noise_input": net.noise_input,
                         "outputs": list(net.outputs), "activation": "ReLU", "output": "sigmoid",
                         "log_scaled_outputs": list(net.log_outputs)},
        "loss": loss_name,
        "protocol": protocol.as_dict(),
        "protocol_key": protocol.key(),
        "parameter_ranges": {k: list(v) for k, v in net.ranges.items()},
        "units": {"T1": "s", "T2": "s", "B0": "Hz"},
        "b1_range": list(b1_range(cfg.distribution)),
        "distribution": cfg.distribution,
        "training": training,
        "validation_loss": result.best_loss if cfg.keep == "best" else result.final_loss,
        "history": result.history,
    }
    if init is not None:
        card["training"]["init_from"] = init
    return net, card


def _file_digest(path) -> dict:
    import hashlib
    import json
    from pathlib import Path

    path = Path(path)
    out = {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    card = path.with_suffix(".json")
    if card.is_file():
        # the whole chain: an earlier continuation keeps its own init_from (file, sha256, settings)
        out["previous_training"] = json.loads(card.read_text()).get("training", {})
    return out
