"""The relaxometry networks (RIM, ResNet) in the model registry: bundled for the synthetic
dataset's TI and TE lists where shipped, else trained on the fly for the series' protocol (time
points) with ``ON_THE_FLY`` settings and cached under ``--model-dir`` by
``bids_qmri.models.registry`` (keyed by method, protocol and seed).
"""

from __future__ import annotations

import logging

from bids_qmri.models.registry import get_model as _get_model

from .training import LEARNED_METHODS, MODALITY_OF_KIND, RelaxTrainConfig, train_relax_net

__all__ = ["ON_THE_FLY", "get_model", "train_on_the_fly"]

log = logging.getLogger("bids_qmri.modalities.relax.models")

#: Models trained during a run, for a series without a bundled model: a fixed number of
#: mini-batches, so that a run is reproducible under --seed (``--relax-train-iterations``
#: overrides it). Seed 004 trained 3000 mini-batches on a GPU; on one CPU thread a RIM
#: mini-batch of 24 40×40 patches takes ~2.5 s, a ResNet one ~0.5 s.
ON_THE_FLY = {
    "rim": {"iterations": 200, "iterations_per_epoch": 25},
    "resnet": {"iterations": 600, "iterations_per_epoch": 50},
}


def _kind(protocol) -> str:
    return "ir" if protocol.time_key == "InversionTime" else "t2"


def train_on_the_fly(method: str, protocol, *, seed: int = 0, threads: int = 1, train_overrides: dict | None = None):
    settings = {**ON_THE_FLY[method], **(train_overrides or {})}
    log.info("training %s for %s (%s)", method, protocol.describe(), settings)
    cfg = RelaxTrainConfig(method=method, seed=seed, threads=threads, **settings)
    return train_relax_net(_kind(protocol), protocol.times, cfg)


def get_model(method: str, protocol, *, model_dir=None, seed: int = 0, allow_training: bool = True,
              threads: int = 1, train_overrides: dict | None = None):
    """``(net, card)`` for ``method`` (rim, resnet) and the series ``protocol``."""
    if method not in LEARNED_METHODS:
        raise ValueError(f"unknown learned relaxometry method {method!r}; use one of {', '.join(LEARNED_METHODS)}")
    return _get_model(MODALITY_OF_KIND[_kind(protocol)], method, protocol, model_dir=model_dir, seed=seed,
                      allow_training=allow_training,
                      trainer=lambda: train_on_the_fly(method, protocol, seed=seed, threads=threads,
                                                       train_overrides=train_overrides))
