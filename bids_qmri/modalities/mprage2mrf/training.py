"""Training of the seven U-Nets on simulated phantom pairs (seed 002 §2.3) with the package's
loop (``bids_qmri.training.loop``: Adam 1e-4, best-validation weights kept, progress, card).

Training and validation pairs come from disjoint phantom seeds (``train_seeds`` /
``val_seeds``; held-out evaluation seeds must stay outside both). The rescale table is the
min/max of every component over the training targets (seed 002 Table 2). The loss is the sum of
the seven networks' MSEs over brain voxels, each on its own tanh scale; the networks share no
parameters, so each one sees only its own MSE (seed 002 Fig. 1). Beyond the paper, and off by
default: ``long_t2_weight`` > 1 counts the voxels whose true T2 is at least ``long_t2_s`` (CSF-rich)
that many times in every MSE, training and validation alike (issue 15: CSF-dominated regions' T2
came out too low); ``lr_schedule`` anneals the learning rate (``training.loop.LR_SCHEDULES``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import torch

from bids_qmri.training.loop import LoopSettings, train_loop, training_record

from .simulate import long_t2_weights, mrf_target_basis, simulate_pair, slices_of
from .unet import COMPONENTS, MPRAGE2MRFNet

__all__ = ["Mprage2MRFTrainConfig", "masked_mse", "pairs_to_slices", "table_from_targets", "train_mprage2mrf", "train_on_slices"]

log = logging.getLogger("bids_qmri.modalities.mprage2mrf.training")

REFERENCE = ("McGee KP, Sui Y, Witte RJ, et al. Synthesis of MR fingerprinting information from magnitude-only MR "
             "imaging data using a parallelized, multi network U-Net convolutional neural network. Front Radiol "
             "2024;4:1498411. doi:10.3389/fradi.2024.1498411")


@dataclass
class Mprage2MRFTrainConfig:
    n_train: int = 16  # phantom participants for training
    n_val: int = 3  # for validation (best weights)
    resolution_mm: float = 3.0
    snr: float = 25.0
    seed: int = 0
    epochs: int = 1000  # seed 002: 1000
    patience: int = 1000
    batch_size: int = 8
    lr: float = 1e-4  # seed 002
    lr_schedule: str = "constant"  # seed 002; "cosine" anneals to 0 over `epochs`, "step" halves every 40
    keep: str = "best"  # seed 002: best validation weights; "last": the final epoch's
    base: int = 16  # seed 002: 16 filters doubling to 256
    depth: int = 4
    dropout: float = 0.1
    max_seconds: float | None = None
    threads: int = 1
    progress: bool | None = None
    init_from: str | None = None  # continue from a saved model of the same architecture (its rescale table kept)
    # the phantom population the participants are drawn from (synth.phantom.POPULATIONS); "a+b" alternates
    # them over the participants (training and validation each: a, b, a, b, ...)
    population: str = "seed004"  # synth.phantom.DEFAULT_POPULATION (a test checks they agree)
    # loss weight of the voxels whose true T2 >= long_t2_s (1: off, seed 002's plain MSE)
    long_t2_weight: float = 1.0
    long_t2_s: float = 0.2
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.n_train < 1 or self.n_val < 1:
            raise ValueError("mprage2mrf training needs at least one training and one validation participant")
        if not 0.5 <= self.resolution_mm <= 8:
            raise ValueError(f"the phantom resolution must be 0.5-8 mm, got {self.resolution_mm}")
        if self.base < 1 or self.depth < 1 or not 0 <= self.dropout < 1:
            raise ValueError("base filters and depth must be >= 1 and dropout in [0, 1)")
        if not self.long_t2_weight >= 1 or not self.long_t2_s > 0:
            raise ValueError(f"the long-T2 loss weight must be >= 1 (1: off) and its T2 threshold > 0 s, got "
                             f"{self.long_t2_weight} and {self.long_t2_s}")
        from bids_qmri.training.loop import LR_SCHEDULES

        if self.lr_schedule not in LR_SCHEDULES or self.keep not in ("best", "last"):
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)} and keep best or last, got "
                             f"{self.lr_schedule!r} and {self.keep!r}")
        from bids_qmri.synth.phantom import POPULATIONS

        for name in self.populations():
            if name not in POPULATIONS:
                raise ValueError(f"unknown phantom population {name!r}: choose from {', '.join(POPULATIONS)} "
                                 "(or several joined by '+', alternated over the participants)")

    def populations(self) -> list[str]:
        return self.population.split("+")

    def train_seeds(self) -> list[int]:
        return [1000 * self.seed + i for i in range(self.n_train)]

    def val_seeds(self) -> list[int]:
        return [1000 * self.seed + 500 + i for i in range(self.n_val)]


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over the channels of each channel's mean squared error over the masked pixels;
    ``weight`` ``[B, H, W]``: each pixel's weight in those means (None: all 1)."""
    w = mask[:, None].to(pred.dtype)
    if weight is not None:
        w = w * weight[:, None].to(pred.dtype)
    n = w.sum().clamp_min(1.0)
    return (((pred - target) ** 2) * w).sum(dim=(0, 2, 3)).div(n).sum()


def table_from_targets(flat: torch.Tensor, floor: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of each component ``[7, N]`` (seed 002 Table 2). A component whose range is
    below ``floor`` x the widest (the imaginary parts of noise-free FISP-EPG coefficients without
    off-resonance are zero once SV1 is real) gets that width, centred on its values."""
    lo, hi = flat.min(1).values.float(), flat.max(1).values.float()
    width = floor * float((hi - lo).max().clamp_min(1e-12))
    narrow = (hi - lo) < width
    centre = (hi + lo) / 2
    return (torch.where(narrow, centre - width / 2, lo), torch.where(narrow, centre + width / 2, hi))


def pairs_to_slices(pairs, multiple: int, cfg: Mprage2MRFTrainConfig | None = None):
    """``(x, y, mask)`` slice stacks of ``pairs``, and the long-T2 loss weights as a fourth
    stack when ``cfg.long_t2_weight`` > 1."""
    xs, ys, ms = zip(*(slices_of(p, multiple) for p in pairs))
    out = (torch.cat(xs), torch.cat(ys), torch.cat(ms))
    if cfg is not None and cfg.long_t2_weight > 1:
        out += (torch.cat([long_t2_weights(p, multiple, cfg.long_t2_weight, cfg.long_t2_s) for p in pairs]),)
    return out


def train_on_slices(net: MPRAGE2MRFNet, train, val, cfg: Mprage2MRFTrainConfig, *, set_table: bool = True,
                    epoch_callback=None):
    """Train ``net`` in place on ``(x, y, mask)`` slice stacks, or ``(x, y, mask, weight)`` (per-pixel
    loss weights, ``pairs_to_slices``) -> ``(LoopResult, LoopSettings)``."""
    x, y, m = train[:3]
    w = train[3] if len(train) > 3 else None
    if set_table:
        sel = m[:, None].expand_as(y)
        flat = y.permute(1, 0, 2, 3)[sel.permute(1, 0, 2, 3)].view(len(COMPONENTS), -1)
        net.set_table(*table_from_targets(flat))
    yt = net.to_network(y).clamp(-1, 1)
    vx, vy, vm = val[:3]
    vw = val[3] if len(val) > 3 else None
    vyt = net.to_network(vy).clamp(-1, 1)

    def batch(idx):
        return x[idx], yt[idx], m[idx], None if w is None else w[idx]

    def loss(model, b):
        return masked_mse(model(b[0]), b[1], b[2], b[3])

    def validate(model):
        total, n = 0.0, 0
        for lo in range(0, len(vx), 16):
            k = min(16, len(vx) - lo)
            total += float(loss(model, (vx[lo:lo + k], vyt[lo:lo + k], vm[lo:lo + k],
                                        None if vw is None else vw[lo:lo + k]))) * k
            n += k
        return total / max(n, 1)

    settings = LoopSettings(max_epochs=cfg.epochs, patience=cfg.patience, batch_size=cfg.batch_size, lr=cfg.lr,
                            lr_schedule=cfg.lr_schedule, keep=cfg.keep, progress=cfg.progress, max_seconds=cfg.max_seconds, desc="mprage2mrf")
    result = train_loop(net, n_train=len(x), batch=batch, loss=loss, validate=validate, settings=settings,
                        generator=torch.Generator().manual_seed(cfg.seed), epoch_callback=epoch_callback, log=log)
    return result, settings


def initialise_from(net: MPRAGE2MRFNet, weights) -> dict:
    """Copy a saved model's weights, rescale table and basis into ``net`` (same architecture) ->
    the record of the start (file, sha256, its own training: the whole chain of continuations)."""
    from bids_qmri.models.registry import load_model

    start, start_card = load_model(weights)
    if not isinstance(start, MPRAGE2MRFNet) or start.config() != net.config():
        raise ValueError(f"{weights}: a {type(start).__name__} {getattr(start, 'config', dict)()} cannot initialise "
                         f"mprage2mrf {net.config()}: pick a model with the same --mprage2mrf-base and -depth")
    net.load_state_dict(start.state_dict())
    return {"file": str(weights).rsplit("/", 1)[-1], "sha256": start_card.get("sha256"),
            "previous_training": start_card.get("training", {})}


def train_mprage2mrf(protocol, cfg: Mprage2MRFTrainConfig, *, epoch_callback=None) -> tuple[MPRAGE2MRFNet, dict]:
    """Simulate the phantom pairs and train -> ``(net, card)`` for the MPRAGE ``protocol``."""
    from bids_qmri.modalities.mrf.protocol import MRFProtocol

    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.threads)))
    t0, cpu0 = time.perf_counter(), time.process_time()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            schedule, basis = mrf_target_basis()
            net = MPRAGE2MRFNet(cfg.base, cfg.depth, cfg.dropout, n_frames=basis.shape[0])
            net.set_basis(basis)
        init = initialise_from(net, cfg.init_from) if cfg.init_from else None
        log.info("simulating %d + %d phantom pairs at %g mm", cfg.n_train, cfg.n_val, cfg.resolution_mm)
        kw = dict(protocol=protocol, resolution_mm=cfg.resolution_mm, snr=cfg.snr)
        pops = cfg.populations()
        train = pairs_to_slices([simulate_pair(s, population=pops[i % len(pops)], **kw)
                                 for i, s in enumerate(cfg.train_seeds())], net.multiple, cfg)
        val = pairs_to_slices([simulate_pair(s, population=pops[i % len(pops)], **kw)
                               for i, s in enumerate(cfg.val_seeds())], net.multiple, cfg)
        t_sim = time.perf_counter() - t0
        # a continuation keeps the start's rescale table: its outputs are on that scale
        result, settings = train_on_slices(net, train, val, cfg, set_table=init is None, epoch_callback=epoch_callback)
    finally:
        torch.set_num_threads(old)
    mrf = MRFProtocol(tuple(float(v) for v in schedule["flip_rad"].rad2deg()),
                      tuple(float(v) for v in schedule["tr"]), float(schedule["te"]), float(schedule["ti"]))
    training = training_record(settings, result, n_train=len(train[0]), n_val=len(val[0]), simulation_s=t_sim,
                               wall_s=time.perf_counter() - t0)
    training.update({k: v for k, v in asdict(cfg).items()
                     if k not in ("extra", "progress", "init_from") and k not in training})
    training.update({"train_seeds": cfg.train_seeds(), "val_seeds": cfg.val_seeds(), "units": "slices",
                     "cpu_s": round(time.process_time() - cpu0, 1)})
    if init is not None:
        training["init_from"] = init
    training.update(cfg.extra)
    card = model_card(net, protocol, mrf, basis, training, result.best_loss,
                      training_data=(f"{cfg.n_train} digital-brain phantom participants of the {cfg.population!r} "
                                     f"population (seeds {cfg.train_seeds()[0]}-"
                                     f"{cfg.train_seeds()[-1]}; validation {cfg.val_seeds()}) at {cfg.resolution_mm:g} "
                                     f"mm: MPRAGE from physics.mprage ({protocol.describe()}, Rician noise SNR "
                                     f"{cfg.snr:g}) and noise-free MRF SVD coefficients of the synthetic dataset's FISP "
                                     "schedule on the same grid, axial slices"))
    card["history"] = result.history
    return net, card


def model_card(net, protocol, mrf, basis, training: dict, val_loss: float, *, training_data: str) -> dict:
    n_params = sum(p.numel() for p in net.parameters())
    return {
        "name": f"bids_qmri-mprage2mrf-{protocol.slug()}",
        "modality": "mprage2mrf",
        "method": "mprage2mrf",
        "architecture": {**net.config(), "class": "MPRAGE2MRFNet", "networks": len(COMPONENTS),
                         "parameters": int(n_params), "parameters_per_network": int(n_params // len(COMPONENTS))},
        "components": list(COMPONENTS),
        "rescale_table": net.table(),
        "mprage_protocol": protocol.as_dict(),
        "mrf_protocol": mrf.as_dict(),
        "mrf_protocol_key": mrf.key(),
        "mrf_basis": {"frames": int(basis.shape[0]), "rank": int(basis.shape[1]),
                      "stored": "in the weights file (buffers basis_real, basis_imag)",
                      "source": "first four columns of the synthetic dataset's MRF SVD basis"},
        "reference": REFERENCE,
        "training_data": training_data,
        "validation_loss": val_loss,
        "training": training,
    }
