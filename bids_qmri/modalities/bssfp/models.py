"""The pc-bSSFP networks in the model registry: bundled for the seed protocol, trained on the
fly (with the settings below) for any other protocol, and cached by ``bids_qmri.models.registry``
under ``--model-dir`` (keyed by method, protocol and seed).
"""

from __future__ import annotations

import logging
import os

from bids_qmri.models.registry import cache_dir as _cache_dir
from bids_qmri.models.registry import get_model as _get_model
from bids_qmri.models.registry import load_model, model_stem, save_model, sha256_file  # noqa: F401 (re-exported)
from bids_qmri.physics.bssfp import BSSFPProtocol

from .training import DEFAULT_DISTRIBUTION, METHODS, TrainConfig, train_bssfp_net

__all__ = ["MODALITY", "MODEL_SETS", "ON_THE_FLY", "WARM_START", "cache_dir", "get_model", "load_model", "model_stem",
           "save_model", "sha256_file", "train_on_the_fly"]

log = logging.getLogger("bids_qmri.modalities.bssfp.models")

MODALITY = "bssfp"

#: Settings for models trained on the fly when the protocol has no bundled model. Seed 000/001:
#: one epoch over 400k samples already gives CoD > 0.93 (magnitude nets). Measured here on a
#: non-bundled protocol (TR 5 ms, TE 2.5 ms, FA 20°, Npc 8; noise-free 50×50 grid, one CPU thread):
#: svnn CoD 0.998/0.999 (T1/T2) in 8 s CPU, pinn 0.984/0.984 in 12 s, svnncomplex 0.997/0.999 in
#: 9 s, pinncomplex 0.988/0.998 in 53 s (16 epochs). The complex PINN takes its residuals in
#: standardised feature units, as the bundled ones (in raw units ΔB0 dominates the loss: 0.940/0.952
#: at the same cost); for the magnitude PINN it made no clear difference (0.982/0.994). Those were
#: measured on the seed range; the default set trains on the brain distribution (``MODEL_SETS``):
#: the magnitude PINN with these settings from scratch (Npc 8 protocol above; now it starts from the
#: SVNN, ``WARM_START``) has a noise-free median (mean) |relative error| on the seed's tissue range of
#: T1 2.55 (2.93) %, T2 2.12 (2.48) %, against 2.28 (3.02) / 1.98 (2.71) % when trained on the seed
#: range, at the same 14 CPU-s.
ON_THE_FLY = {
    "svnn": {"n_samples": 100_000, "max_epochs": 8, "patience": 3},
    "pinn": {"n_samples": 100_000, "max_epochs": 5, "patience": 3},
    "svnncomplex": {"n_samples": 100_000, "max_epochs": 8, "patience": 3, "batch_size": 256, "lr": 1e-3},
    "pinncomplex": {"n_samples": 100_000, "max_epochs": 16, "patience": 3, "batch_size": 256, "lr": 1e-3,
                    "pinn_feature_scale": "input_std"},
}


#: On-the-fly PINNs start from the on-the-fly SVNN of the same kind, protocol, seed and model set, as
#: the bundled PINNs do (``bundled/bssfp/TRAINING.md``): the PINN loss alone converges slowly from
#: random weights on the wide brain distribution. Measured with the settings above (Npc 8 protocol
#: above, brain distribution, seed 1; median |relative error| T1 / T2 in % on 20 000 tissue samples,
#: noise-free and at SNR 25): pinn from scratch 3.53 / 1.99 and 9.01 / 8.37 (19.7 CPU-s); from the
#: SVNN 0.93 / 0.85 and 7.96 / 7.80 (8.9 + 14.7 CPU-s; with lr 3e-4 cosine 0.97 / 0.91, not better);
#: pinncomplex from scratch 3.84 / 1.14 and 8.87 / 7.91 (25.8 CPU-s), from the SVNN 1.22 / 0.70 and
#: 8.23 / 7.80 (13.1 + 24.7 CPU-s).
WARM_START = {"pinn": "svnn", "pinncomplex": "svnncomplex"}


#: The bundled model sets (``--bssfp-models``): name -> (subfolder of ``bundled/bssfp``, training
#: distribution of models trained on the fly for other protocols). ``default``: brain tissue with CSF
#: partial volume and log-scaled T1/T2 outputs; ``seed``: the seed papers' range (T1 0.36–2.08 s,
#: T2 20–120 ms), which reproduces seed 001 Fig. 2–5 but clips CSF partial volume.
MODEL_SETS = {
    "default": (None, DEFAULT_DISTRIBUTION),
    "seed": ("seed", "uniform"),
}


def _model_set(name: str | None) -> tuple[str | None, str]:
    name = name or "default"
    if name not in MODEL_SETS:
        raise ValueError(f"unknown pc-bSSFP model set {name!r}; use one of {', '.join(MODEL_SETS)}")
    return MODEL_SETS[name]


def cache_dir(model_dir: str | os.PathLike, protocol: BSSFPProtocol):
    """Where ``--model-dir`` keeps the pc-bSSFP models of ``protocol``."""
    return _cache_dir(model_dir, MODALITY, protocol)


def train_on_the_fly(method: str, protocol: BSSFPProtocol, *, seed: int = 0, device: str = "cpu",
                     train_overrides: dict | None = None):
    settings = {**ON_THE_FLY[method], **(train_overrides or {})}
    log.info("training %s for %s (%s)", method, protocol.describe(), settings)
    return train_bssfp_net(protocol, TrainConfig(method=method, seed=seed, device=device, **settings))


def get_model(method: str, protocol: BSSFPProtocol, *, model_dir=None, seed: int = 0, allow_training: bool = True,
              train_overrides: dict | None = None, device: str = "cpu", model_set: str | None = None):
    """The network for ``method`` and ``protocol`` from the model set ``model_set`` (``MODEL_SETS``;
    None: ``default``); see ``bids_qmri.models.registry``. A PINN trained on the fly starts from the
    SVNN of its kind (``WARM_START``), itself taken from the registry (cached, or trained first)."""
    if method not in METHODS:
        raise ValueError(f"unknown network method {method!r}; use one of {sorted(METHODS)}")
    subdir, distribution = _model_set(model_set)
    overrides = {"distribution": distribution, **(train_overrides or {})}

    def trainer():
        settings = dict(overrides)
        start = WARM_START.get(method)
        if start is not None and "init_from" not in settings:
            _, card = get_model(start, protocol, model_dir=model_dir, seed=seed, device=device, model_set=model_set)
            if card.get("distribution") == settings["distribution"]:
                settings["init_from"] = card["path"]
            else:  # e.g. a user-installed SVNN trained on another distribution: other output ranges
                log.info("%s: %s is trained on %s, not %s; training %s from scratch", protocol.describe(), start,
                         card.get("distribution"), settings["distribution"], method)
        return train_on_the_fly(method, protocol, seed=seed, device=device, train_overrides=settings)

    return _get_model(MODALITY, method, protocol, model_dir=model_dir, seed=seed, allow_training=allow_training,
                      model_set=subdir, trainer=trainer)
