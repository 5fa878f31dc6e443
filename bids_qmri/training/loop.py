"""The training loop every network of the package uses (SPEC §5, §7).

Adam, mini-batches drawn by a seeded permutation, an optional learning-rate schedule, a
validation loss after every epoch, early stopping on it, a tqdm progress bar, and the record a
model card needs. What a batch is and how it is scored is the caller's: ``batch(indices)``
builds the batch (simulating noise afresh if it likes, from the same generator) and
``loss(net, batch)`` returns a scalar tensor; ``LOSSES`` has the two generic parameter losses
(``mse``, and ``crb``: each squared error divided by its Cramér–Rao bound, seed 003).
With a fixed generator and seed the weights are identical on CPU, run after run.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from bids_qmri.physics.crb import crb_weighted_loss

__all__ = ["LOSSES", "LR_SCHEDULES", "LoopResult", "LoopSettings", "mse_loss", "train_loop", "training_record"]

LR_SCHEDULES = ("constant", "cosine", "step")


def mse_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    return torch.mean((pred - target) ** 2)


def crb_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``weight`` is the CRB of every sample and parameter ``[N, P]`` (an efficient estimator scores 1)."""
    if weight is None:
        raise ValueError("the CRB-weighted loss needs the Cramér–Rao bound of every training sample")
    return crb_weighted_loss(pred, target, weight)


#: name -> ``loss(pred, target, weight)``
LOSSES: dict[str, Callable] = {"mse": mse_loss, "crb": crb_loss}


@dataclass
class LoopSettings:
    max_epochs: int = 300
    patience: int = 25  # epochs without a better validation loss before stopping
    batch_size: int = 128
    lr: float = 2e-4
    lr_schedule: str = "constant"  # "cosine": anneal to 0 over max_epochs; "step": × lr_gamma every lr_step
    lr_step: int = 40
    lr_gamma: float = 0.5
    keep: str = "best"  # weights returned: lowest validation loss, or the final epoch ("last")
    max_seconds: float | None = None  # wall-time cap: no new epoch starts after it (not reproducible)
    progress: bool | None = None  # None: a bar only on a terminal
    desc: str = "training"

    def __post_init__(self):
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; use one of {', '.join(LR_SCHEDULES)}")
        if self.keep not in ("best", "last"):
            raise ValueError(f"unknown keep {self.keep!r}; use 'best' or 'last'")
        if self.max_epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise ValueError("need at least 1 epoch, batch size 1 and patience 1")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be positive, got {self.max_seconds}")


@dataclass
class LoopResult:
    history: list[dict] = field(default_factory=list)  # epoch, train_loss, val_loss
    best_epoch: int = 0
    best_loss: float = math.inf
    epoch_times: list[float] = field(default_factory=list)
    stopped_by_time: bool = False

    @property
    def final_loss(self) -> float:
        return self.history[-1]["val_loss"] if self.history else math.inf


def _scheduler(opt, settings: LoopSettings):
    if settings.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings.max_epochs)
    if settings.lr_schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=settings.lr_step, gamma=settings.lr_gamma)
    return None


def train_loop(
    net: torch.nn.Module,
    *,
    n_train: int,
    batch: Callable[[torch.Tensor], object],
    loss: Callable[[torch.nn.Module, object], torch.Tensor],
    validate: Callable[[torch.nn.Module], float],
    settings: LoopSettings,
    generator: torch.Generator,
    epoch_callback: Callable | None = None,
    log=None,
) -> LoopResult:
    """Train ``net`` in place; on return it holds the kept weights (see ``settings.keep``) in eval
    mode. ``epoch_callback(epoch, net, val_loss)`` runs after every epoch (learning curves)."""
    opt = torch.optim.Adam(net.parameters(), lr=settings.lr)
    sched = _scheduler(opt, settings)
    result = LoopResult()
    best_state, stale = None, 0
    t_start = time.perf_counter()
    bar = tqdm(range(1, settings.max_epochs + 1), desc=settings.desc,
               disable=None if settings.progress is None else not settings.progress, leave=False)
    for epoch in bar:
        t_epoch = time.perf_counter()
        net.train()
        order = torch.randperm(n_train, generator=generator)
        running, seen = 0.0, 0
        for start in range(0, n_train, settings.batch_size):
            idx = order[start : start + settings.batch_size]
            value = loss(net, batch(idx))
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            running += value.detach().item() * len(idx)
            seen += len(idx)
        if sched is not None:
            sched.step()
        net.eval()
        with torch.no_grad():
            val_loss = float(validate(net))
        result.epoch_times.append(time.perf_counter() - t_epoch)
        result.history.append({"epoch": epoch, "train_loss": running / seen, "val_loss": val_loss})
        bar.set_postfix(train=f"{running / seen:.3e}", val=f"{val_loss:.3e}")
        if epoch_callback is not None:
            epoch_callback(epoch, net, val_loss)
        if val_loss < result.best_loss:
            result.best_loss, result.best_epoch, stale = val_loss, epoch, 0
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        else:
            stale += 1
            if stale >= settings.patience:
                if log is not None:
                    log.info("early stopping after epoch %d (best %d)", epoch, result.best_epoch)
                break
        if settings.max_seconds is not None and time.perf_counter() - t_start >= settings.max_seconds:
            result.stopped_by_time = True
            if log is not None:
                log.info("time budget of %.0f s reached after epoch %d", settings.max_seconds, epoch)
            break
    bar.close()
    if settings.keep == "best" and best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    return result


def training_record(settings: LoopSettings, result: LoopResult, *, n_train: int, n_val: int,
                    simulation_s: float, wall_s: float) -> dict:
    """The generic part of a model card's ``training`` block."""
    return {
        **{k: v for k, v in asdict(settings).items() if k not in ("progress", "desc")},
        "n_train": n_train,
        "n_val": n_val,
        "epochs_run": len(result.history),
        "best_epoch": result.best_epoch,
        "simulation_s": round(simulation_s, 3),
        "mean_epoch_s": round(sum(result.epoch_times) / max(1, len(result.epoch_times)), 3),
        "wall_s": round(wall_s, 3),
        "stopped_by_time_budget": result.stopped_by_time,
        "optimizer": "Adam",
        "torch": torch.__version__,
        "platform": platform.machine(),
    }
