"""Training of the RIM and the ResNet from simulated patches (seed 004 §4.2, §4.4.2) on the
package's loop (``bids_qmri.training.loop``: Adam, progress bar, validation, model card).

Each iteration simulates a fresh mini-batch of 40×40 patches (``simulate.simulate_patches``)
from a NumPy generator seeded with ``seed``; an "epoch" is ``iterations_per_epoch`` mini-batches,
after which a fixed validation set (its own seed) is scored with the same loss (seed 004 eq. 6;
for the ResNet its single estimate). Adam, learning rate 1e-3 (seed 004), Kaiming initialisation.
With a fixed seed and iteration count the weights are identical run after run on CPU; the
optional wall-time budget (``max_seconds``) caps training but makes the count machine-dependent.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from bids_qmri.training.loop import LoopSettings, train_loop, training_record

from . import rim
from .simulate import (
    A_REFERENCE,
    B_HALF_NORMAL_SIGMA,
    SIGMA_RANGE,
    VOXEL_VARIATION,
    simulate_patches,
)

__all__ = ["LEARNED_METHODS", "RelaxTrainConfig", "blend_state_dicts", "build_net", "evaluate_patches", "train_relax_net"]

log = logging.getLogger("bids_qmri.modalities.relax.training")

LEARNED_METHODS = ("rim", "resnet")
BIAS_GROUPS = ("patch", "tissue")  # RelaxTrainConfig.bias_groups
MODALITY_OF_KIND = {"ir": "irt1", "t2": "mese"}


@dataclass
class RelaxTrainConfig:
    method: str = "rim"
    iterations: int = 3000  # mini-batches in all (seed 004: 3000 of 24)
    iterations_per_epoch: int = 50
    batch_size: int = 24
    lr: float = 1e-3
    n_val: int = 48
    seed: int = 0
    resolution_mm: float = 1.5
    patch: int = 40
    max_seconds: float | None = None
    threads: int = 1
    progress: bool | None = None
    # architecture
    hidden: int = 36
    steps: int = 6
    gru_kernel: int = 1
    rim_gradient: str = "gauss_newton"
    resnet_channels: tuple[int, ...] = (40,) * 6
    resnet_width: int = 40
    init_from: str | None = None  # continue from a saved model of the same method and architecture
    # training data and loss options (defaults: seed 004's)
    structures: bool = False  # one-voxel points and lines in every training patch (simulate.add_structures)
    b_weight: float = 1.0  # weight of B's squared error in the loss (IR; eq. 6: 1)
    structure_weight: float = 1.0  # weight of the structure voxels' squared error (needs structures; eq. 6: 1)
    # P: each patch's squared error times (σ_min/σ)^P, σ its noise level (eq. 6: 0); P < 0 favours low SNR
    snr_weight: float = 0.0
    bias_weight: float = 0.0  # λ: + λ × mean squared patch bias (rim.patch_bias_term; eq. 6: 0)
    bias_groups: str = "patch"  # the bias term's means: per patch, or per patch and dominant tissue (Patches.tissue)
    lr_schedule: str = "constant"
    keep: str = "best"
    average_last: int = 0  # > 0: the kept weights are the mean of the last N epochs' weights (RIM only)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.method not in LEARNED_METHODS:
            raise ValueError(f"unknown learned relaxometry method {self.method!r}; use one of "
                             f"{', '.join(LEARNED_METHODS)}")
        if self.iterations < 1 or self.iterations_per_epoch < 1 or self.batch_size < 1 or self.n_val < 1:
            raise ValueError("iterations, iterations per epoch, batch size and validation size must be ≥ 1")
        if not self.b_weight > 0:
            raise ValueError("the B loss weight must be > 0")
        if not self.structure_weight > 0:
            raise ValueError("the structure loss weight must be > 0")
        if self.structure_weight != 1.0 and not self.structures:
            raise ValueError("a structure loss weight needs the structures in the patches: add --relax-structures")
        if not (-4.0 <= self.snr_weight <= 4.0):
            raise ValueError(f"--rim-snr-weight must be a power between -4 and 4 (0: off); got {self.snr_weight!r}")
        if not (0.0 <= self.bias_weight <= 1000.0):
            raise ValueError(f"--rim-bias-weight must be a weight between 0 (off) and 1000; got {self.bias_weight!r}")
        if self.bias_groups not in BIAS_GROUPS:
            raise ValueError(f"--rim-bias-groups must be one of {', '.join(BIAS_GROUPS)}; got {self.bias_groups!r}")
        if self.bias_weight and self.method != "rim":
            raise ValueError("--rim-bias-weight is for the RIM only (its loss is rim.rim_loss over the J steps)")
        if self.average_last < 0:
            raise ValueError("--average-last must be ≥ 0 epochs (0: no averaging)")
        if self.average_last and self.method != "rim":
            raise ValueError("--average-last is for the RIM only: the ResNet's BatchNorm statistics would not "
                             "match averaged weights")
        self.resnet_channels = tuple(int(c) for c in self.resnet_channels)

    def param_weight(self, kind: str) -> tuple[float, ...] | None:
        """Per-parameter loss weights (``rim.rim_loss``), None for eq. 6's plain mean."""
        if self.b_weight == 1.0 or "B" not in rim.PARAMETERS[kind]:
            return None
        return tuple(self.b_weight if p == "B" else 1.0 for p in rim.PARAMETERS[kind])

    def voxel_weight(self, patches) -> torch.Tensor | None:
        """Per-voxel loss weights (``rim.rim_loss``) ``[batch, H, W]``: ``structure_weight`` on the
        voxels ``simulate.add_structures`` changed, 1 elsewhere, times, with ``snr_weight`` P ≠ 0,
        each patch's ``(SIGMA_RANGE[0] / σ)^P`` (σ the patch's noise level: 1 at SNR 100, 1/39^P at
        SNR 3; P > 0: the low-SNR patches' large errors dominate the mean less, P < 0: more); None for
        eq. 6's plain mean."""
        weight = None
        if self.structure_weight != 1.0 and patches.structure is not None:
            weight = torch.where(patches.structure, self.structure_weight, 1.0).to(patches.target.dtype)
        per_patch = self.snr_patch_weight(patches)
        if per_patch is not None:
            per_patch = per_patch[:, None, None]
            weight = per_patch.expand(patches.weight.shape) if weight is None else weight * per_patch
        return weight

    def snr_patch_weight(self, patches) -> torch.Tensor | None:
        """Each patch's ``(SIGMA_RANGE[0] / σ)^P`` ``[batch]`` for ``snr_weight`` P ≠ 0 (the factor on its
        voxels in ``voxel_weight`` and on its squared biases in the bias term), None for P = 0."""
        if not self.snr_weight:
            return None
        return ((SIGMA_RANGE[0] / patches.sigma.double()) ** self.snr_weight).to(patches.target.dtype)


    def bias_group_labels(self, patches) -> torch.Tensor | None:
        """The ``bias_groups`` labels ``rim.rim_loss`` takes: None (per patch) or ``Patches.tissue``."""
        return patches.tissue if self.bias_weight and self.bias_groups == "tissue" else None


def blend_state_dicts(states, weights=None) -> dict[str, torch.Tensor]:
    """The weight-space mean of RIM state dicts (no normalisation buffers: every entry is a
    convolution weight or bias), summed in double precision and cast back to each entry's dtype:
    the arithmetic mean (``--average-last``) without ``weights``, else Σ wᵢ·stateᵢ with Σ wᵢ = 1
    (how the bundled IRT1 RIMs were blended with their continuations, TRAINING.md)."""
    states = list(states)
    if not states or any(s.keys() != states[0].keys() for s in states):
        raise ValueError("blend at least one state dict, all with the same entries (same method and architecture)")
    if weights is None:
        return {k: torch.stack([s[k].double() for s in states]).mean(0).to(v.dtype) for k, v in states[-1].items()}
    weights = [float(w) for w in weights]
    if len(weights) != len(states) or abs(sum(weights) - 1.0) > 1e-9:
        raise ValueError(f"blend weights must be one per state dict and sum to 1; got {weights}")
    return {k: sum(w * s[k].double() for w, s in zip(weights, states)).to(v.dtype) for k, v in states[0].items()}


def build_net(method: str, kind: str, n_times: int, cfg: RelaxTrainConfig) -> torch.nn.Module:
    if method == "rim":
        return rim.RIM(kind, hidden=cfg.hidden, steps=cfg.steps, gru_kernel=cfg.gru_kernel, gradient=cfg.rim_gradient)
    return rim.RelaxResNet(kind, n_times=n_times, channels=cfg.resnet_channels, width=cfg.resnet_width)


def evaluate_patches(net, patches, times, kind: str) -> dict:
    """Median |relative error| of the relaxation time and of A over the patches' brain voxels
    (final estimate)."""
    with torch.no_grad():
        est = rim.to_physical(net(patches.signal, torch.as_tensor(times, dtype=patches.signal.dtype))[-1], kind)
    truth = rim.to_physical(patches.target, kind)
    brain = patches.brain
    rel = (est / truth - 1)[:, :, None].movedim(1, -1)[:, 0][brain]  # [voxels, Q]
    names = rim.PARAMETERS[kind]
    return {f"median_abs_rel_error_{n}": round(float(rel[:, i].abs().median()), 5) for i, n in enumerate(names)}


def train_relax_net(kind: str, times, cfg: RelaxTrainConfig, *, epoch_callback=None) -> tuple[torch.nn.Module, dict]:
    """Train ``cfg.method`` for model ``kind`` at ``times`` (seconds) -> ``(net, card)``."""
    times = tuple(float(t) for t in times)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.threads)))
    t_start, cpu_start = time.perf_counter(), time.process_time()
    try:
        rng = np.random.default_rng(cfg.seed)
        val = simulate_patches(kind, times, cfg.n_val, np.random.default_rng([cfg.seed, 1]),
                               resolution_mm=cfg.resolution_mm, size=cfg.patch)
        t_sim = time.perf_counter() - t_start
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            net = build_net(cfg.method, kind, len(times), cfg)
        init = None
        if cfg.init_from:
            from bids_qmri.models.registry import init_record, load_model

            start, start_card = load_model(cfg.init_from)
            if type(start) is not type(net) or start.config() != net.config():
                raise ValueError(f"{cfg.init_from}: a {type(start).__name__} {start.config()} cannot initialise "
                                 f"{cfg.method} {net.config()} — pick a model of the same method, series length "
                                 "and architecture options")
            net.load_state_dict(start.state_dict())
            init = init_record(cfg.init_from, start_card)
        tt = torch.tensor(times)

        def batch(idx):
            return simulate_patches(kind, times, len(idx), rng, resolution_mm=cfg.resolution_mm, size=cfg.patch,
                                    structures=cfg.structures)

        pw = cfg.param_weight(kind)

        def loss(model, p):
            return rim.rim_loss(model(p.signal, tt), p.target, p.weight, pw, cfg.voxel_weight(p),
                                bias_weight=cfg.bias_weight, bias_groups=cfg.bias_group_labels(p),
                                bias_patch_weight=cfg.snr_patch_weight(p) if cfg.bias_weight else None)

        def validate(model):
            return loss(model, val)

        n_per_epoch = cfg.iterations_per_epoch * cfg.batch_size
        epochs = max(1, -(-cfg.iterations // cfg.iterations_per_epoch))
        settings = LoopSettings(max_epochs=epochs, patience=epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                                lr_schedule=cfg.lr_schedule, keep=cfg.keep, progress=cfg.progress, max_seconds=cfg.max_seconds,
                                desc=f"{cfg.method} {kind} N={len(times)}")
        recent = deque(maxlen=cfg.average_last or 1)  # (epoch, weights) of the last epochs, for average_last

        def after_epoch(epoch, model, val_loss):
            if cfg.average_last:
                recent.append((epoch, {k: v.detach().clone() for k, v in model.state_dict().items()}))
            if epoch_callback is not None:
                epoch_callback(epoch, model, val_loss)

        result = train_loop(net, n_train=n_per_epoch, batch=batch, loss=loss, validate=validate, settings=settings,
                            generator=torch.Generator().manual_seed(cfg.seed), epoch_callback=after_epoch, log=log)
        kept_loss, averaged = result.best_loss, None
        if cfg.average_last:
            # the arithmetic mean of the last epochs' weights replaces `keep`'s choice
            net.load_state_dict(blend_state_dicts(w for _, w in recent))
            net.eval()
            with torch.no_grad():
                kept_loss = float(validate(net))
            averaged = [e for e, _ in recent]
        metrics = evaluate_patches(net, val, times, kind)
        if pw is not None or cfg.snr_weight or cfg.bias_weight:  # the kept weights on seed 004's unweighted
            # eq. 6, comparable across B, SNR and bias weights (the validation patches have no structures:
            # the structure weight does not change their loss)
            with torch.no_grad():
                val_est = net(val.signal, tt)
                metrics["loss_eq6"] = round(float(rim.rim_loss(val_est, val.target, val.weight)), 5)
                if cfg.bias_weight:  # the bias term alone (before λ), over the J steps and at the last step
                    groups = cfg.bias_group_labels(val)
                    metrics["patch_bias_term"] = round(float(rim.patch_bias_term(val_est, val.target, val.weight,
                                                                                 groups)), 7)
                    metrics["patch_bias_rms_T_last_step"] = round(float(
                        rim.patch_bias_term(val_est[-1:, :, -1:], val.target[:, -1:], val.weight, groups)) ** 0.5, 5)
    finally:
        torch.set_num_threads(old_threads)
    training = training_record(settings, result, n_train=n_per_epoch, n_val=cfg.n_val, simulation_s=t_sim,
                               wall_s=time.perf_counter() - t_start)
    training.update({k: v for k, v in asdict(cfg).items()
                     if k not in ("extra", "progress", "init_from") and k not in training})
    training["iterations_run"] = len(result.history) * cfg.iterations_per_epoch
    training["cpu_s"] = round(time.process_time() - cpu_start, 1)  # this process, all threads
    if init is not None:
        training["init_from"] = init
    if averaged is not None:
        training["averaged_epochs"] = averaged
    training.update(cfg.extra)
    symbol = "TI" if kind == "ir" else "TE"
    card = {
        "name": f"bids_qmri-{MODALITY_OF_KIND[kind]}-{cfg.method}-n{len(times)}",
        "modality": MODALITY_OF_KIND[kind],
        "method": cfg.method,
        "model": kind,
        "parameters": list(rim.PARAMETERS[kind]),
        "times_s": list(times),
        "architecture": net.config(),
        "reference": "Sabidussi et al. 2021, Med Image Anal 74:102220 (seed 004)",
        "training_data": (
            f"40x40 patches (here {cfg.patch}) of the digital brain at {cfg.resolution_mm:g} mm, seed 004 Table 1 "
            f"per-tissue normal distributions per patch, {VOXEL_VARIATION:.0%} voxel variation, "
            f"B = 2 - half-normal({B_HALF_NORMAL_SIGMA}), Rician noise sigma log-uniform in {list(SIGMA_RANGE)} "
            f"(SNR {A_REFERENCE / SIGMA_RANGE[1]:.1f}-{A_REFERENCE / SIGMA_RANGE[0]:.0f}), patches divided by the "
            f"median over brain voxels of the maximum over the series; {symbol}s {list(times)} s"
            + ("; one-voxel points and lines added (simulate.add_structures)" if cfg.structures else "")
            + (f"; loss weight of B {cfg.b_weight:g}" if pw is not None else "")
            + (f"; loss weight of the structure voxels {cfg.structure_weight:g}" if cfg.structure_weight != 1.0
               else "")
            + (f"; each patch's loss weighted by (sigma_min/sigma)^{cfg.snr_weight:g}" if cfg.snr_weight else "")
            + (f"; plus {cfg.bias_weight:g} x the mean squared patch bias (rim.patch_bias_term"
               + (", per patch and dominant tissue" if cfg.bias_groups == "tissue" else "")
               + (", each patch's squares weighted by its (sigma_min/sigma)^P)" if cfg.snr_weight else ")")
               if cfg.bias_weight else "")),
        "validation_loss": kept_loss,
        "validation": {"n_patches": cfg.n_val, "sigma": "log-uniform as training", **metrics},
        "training": training,
        "history": result.history,
    }
    return net, card
