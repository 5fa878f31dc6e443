"""Where the pc-bSSFP networks come from: bundled files, the --model-dir cache, or training.

Layout of a model: ``<stem>.safetensors`` (weights, buffers, architecture metadata) and
``<stem>.json`` (the model card, with the sha256 of the weights file). Stems are
``<method>_npc<N>_<protocol key>``. Bundled models live in ``bids_qmri/models/bundled/``;
models trained on the fly go to ``<model_dir>/<protocol key>/``. Parallel jobs that need the same
model take a file lock, so one trains and the others wait and reuse; files appear by atomic
rename only.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import os
from pathlib import Path

from bids_qmri import __version__
from bids_qmri.nets.mlp import BSSFPNet, load_net, save_net
from bids_qmri.physics.bssfp import BSSFPProtocol
from bids_qmri.training.bssfp import METHODS, TrainConfig, train_bssfp_net
from bids_qmri.utils.atomic import atomic_path, write_json_atomic

__all__ = [
    "BUNDLED_DIR",
    "ON_THE_FLY",
    "cache_dir",
    "get_model",
    "load_model",
    "model_stem",
    "save_model",
    "sha256_file",
]

log = logging.getLogger("bids_qmri.models.registry")

BUNDLED_DIR = Path(__file__).parent / "bundled"

#: Settings for models trained on the fly when the protocol has no bundled model. Seed 000/001:
#: one epoch over 400k samples already gives CoD > 0.93 (magnitude nets). Measured here on a
#: non-bundled protocol (TR 5 ms, TE 2.5 ms, FA 20°, Npc 8; noise-free 50×50 grid, one CPU thread):
#: svnn CoD 0.998/0.999 (T1/T2) in 8 s CPU, pinn 0.984/0.984 in 12 s, svnncomplex 0.997/0.999 in
#: 9 s, pinncomplex 0.988/0.998 in 53 s (16 epochs). The complex PINN takes its residuals in
#: standardised feature units, as the bundled ones (in raw units ΔB0 dominates the loss: 0.940/0.952
#: at the same cost); for the magnitude PINN it made no clear difference (0.982/0.994).
ON_THE_FLY = {
    "svnn": {"n_samples": 100_000, "max_epochs": 8, "patience": 3},
    "pinn": {"n_samples": 100_000, "max_epochs": 5, "patience": 3},
    "svnncomplex": {"n_samples": 100_000, "max_epochs": 8, "patience": 3, "batch_size": 256, "lr": 1e-3},
    "pinncomplex": {"n_samples": 100_000, "max_epochs": 16, "patience": 3, "batch_size": 256, "lr": 1e-3,
                    "pinn_feature_scale": "input_std"},
}


def model_stem(method: str, protocol: BSSFPProtocol) -> str:
    return f"{method}_npc{protocol.npc}_{protocol.key()}"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_model(net: BSSFPNet, card: dict, directory: str | os.PathLike, stem: str, *, origin: str) -> Path:
    """Write weights then card, each atomically; the card records the weights' sha256."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / f"{stem}.safetensors"
    with atomic_path(weights) as tmp:
        save_net(net, tmp)
    card = dict(card)
    card.update(
        {
            "weights_file": weights.name,
            "sha256": sha256_file(weights),
            "origin": origin,
            "bids_qmri_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
    )
    write_json_atomic(directory / f"{stem}.json", card)
    return weights


def load_model(weights: str | os.PathLike) -> tuple[BSSFPNet, dict]:
    """Load weights and card; refuses a weights file whose checksum differs from its card."""
    weights = Path(weights)
    card_path = weights.with_suffix(".json")
    card = json.loads(card_path.read_text())
    digest = sha256_file(weights)
    if card.get("sha256") != digest:
        raise ValueError(
            f"{weights}: checksum {digest[:12]} does not match its model card {card_path.name} — "
            "delete both files to retrain"
        )
    return load_net(weights), card


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _find(directory: Path, stem: str) -> Path | None:
    w = directory / f"{stem}.safetensors"
    return w if w.is_file() and w.with_suffix(".json").is_file() else None


def cache_dir(model_dir: str | os.PathLike, protocol: BSSFPProtocol) -> Path:
    """Where ``--model-dir`` keeps the models of ``protocol`` (one folder per protocol key)."""
    return Path(model_dir) / protocol.key()


def get_model(
    method: str,
    protocol: BSSFPProtocol,
    *,
    model_dir: str | os.PathLike | None,
    seed: int = 0,
    allow_training: bool = True,
    train_overrides: dict | None = None,
) -> tuple[BSSFPNet, dict]:
    """The network for ``method`` and ``protocol``: from ``model_dir``, bundled, or trained now
    and cached in ``model_dir``.

    A model in ``model_dir`` comes first, so a user's own model (``bids_qmri-train --model-dir``,
    e.g. on a wider T1/T2 distribution) replaces a bundled one; the app itself only trains for
    protocols without a bundled model. The returned card says where the model came from
    (``origin``) and where its file is (``path``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown network method {method!r}; use one of {sorted(METHODS)}")
    stem = model_stem(method, protocol)
    cache = cache_dir(model_dir, protocol) if model_dir is not None else None
    found = _find(cache, stem) if cache is not None else None
    if found is not None:
        net, card = load_model(found)
        return net, {**card, "path": str(found), "reused": True}
    found = _find(BUNDLED_DIR, stem)
    if found is not None:
        net, card = load_model(found)
        return net, {**card, "path": str(found)}
    if cache is None:
        if not allow_training:
            raise FileNotFoundError(f"no bundled {method} model for {protocol.describe()}")
        raise ValueError(
            f"no bundled {method} model for {protocol.describe()}: pass --model-dir so a model "
            "can be trained and cached"
        )
    if not allow_training:
        raise FileNotFoundError(f"no {method} model for {protocol.describe()} in {cache} and training is off")
    with _locked(cache / f"{stem}.lock"):
        found = _find(cache, stem)  # another job may have trained it while we waited
        if found is None:
            settings = {**ON_THE_FLY[method], **(train_overrides or {})}
            log.info("training a %s model on the fly for %s (%s)", method, protocol.describe(), settings)
            cfg = TrainConfig(method=method, seed=seed, **settings)
            net, card = train_bssfp_net(protocol, cfg)
            card.pop("history", None)
            save_model(net, card, cache, stem, origin="trained on the fly")
            write_json_atomic(cache / "protocol.json", protocol.as_dict())
            found = cache / f"{stem}.safetensors"
            net, card = load_model(found)
            return net, {**card, "path": str(found), "reused": False}
    net, card = load_model(found)
    return net, {**card, "path": str(found), "reused": True}
