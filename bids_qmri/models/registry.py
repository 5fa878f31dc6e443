"""Where networks come from: the user's own models, bundled files, the on-the-fly cache, or
training now — for any modality, keyed by (modality, method, protocol key, seed).

A model is ``<stem>.safetensors`` (weights, buffers, the network class and its configuration:
``bids_qmri.nets.io``) plus ``<stem>.json`` (the model card, with the sha256 of the weights).
``<stem>`` is ``<method>_<protocol slug>`` (the slug is the protocol's ``slug()`` if it has one,
e.g. ``npc12_97b5d39b3cee``: a short, readable name, else its ``key()``). Lookup order:

1. ``<model_dir>/<modality>/<key>/<stem>.safetensors`` — a model the user installed with
   ``bids_qmri-train --model-dir`` (it replaces the bundled one, whatever ``--seed``);
2. ``bids_qmri/models/bundled/<modality>[/<model set>]/<stem>.safetensors`` — shipped with the
   package (a modality may bundle more than one set, e.g. models trained on different
   distributions; ``model_set`` picks a subfolder, None the modality's folder itself);
3. ``<model_dir>/<modality>/<key>/<stem>[_<model set>]_seed<S>.safetensors`` — trained on the fly
   by an earlier run with ``--seed S`` (the seed is part of the name, so a run's outputs never
   depend on which other seeds ran before it);
4. trained now with the ``trainer`` the modality hands in, under a file lock (parallel jobs
   that need the same model: one trains, the others wait and reuse), cached as in 3.

Files appear by atomic rename only; lock files are removed after use.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from bids_qmri import __version__
from bids_qmri.errors import InputError
from bids_qmri.nets.io import load_net, save_net
from bids_qmri.utils.atomic import atomic_path, write_json_atomic
from bids_qmri.utils.locks import exclusive_lock

__all__ = [
    "BUNDLED_DIR",
    "bundled_dir",
    "cache_dir",
    "get_model",
    "init_record",
    "load_model",
    "model_stem",
    "save_model",
    "sha256_file",
]

log = logging.getLogger("bids_qmri.models.registry")

BUNDLED_DIR = Path(__file__).parent / "bundled"


def protocol_slug(protocol) -> str:
    slug = getattr(protocol, "slug", None)
    return slug() if callable(slug) else protocol.key()


def model_stem(method: str, protocol) -> str:
    return f"{method}_{protocol_slug(protocol)}"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def init_record(path: str | os.PathLike, card: dict) -> dict:
    """What a card's ``training.init_from`` records for a network continued from the saved ``path``
    (its ``card`` as ``load_model`` returns it): file name, sha256 and the start's own training
    record, so that a chain of continuations stays whole."""
    return {"file": Path(path).name, "sha256": card.get("sha256"), "previous_training": card.get("training", {})}


def save_model(net, card: dict, directory: str | os.PathLike, stem: str, *, origin: str) -> Path:
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


class ModelFileError(InputError, ValueError):
    """A model file (weights or card) that cannot be used: one line naming the file."""


def load_model(weights: str | os.PathLike):
    """Load weights and card; refuses a weights file whose checksum differs from its card, and
    turns any failure to read either file into a ``ModelFileError`` naming it (a file that is
    not safetensors, a broken card, tensors that do not fit the network, ...)."""
    weights = Path(weights)
    card_path = weights.with_suffix(".json")
    fix = "replace it, or delete it and its card to use the bundled model or retrain"
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelFileError(card_path, f"model card cannot be read ({_one_line(exc)})", fix) from exc
    if not isinstance(card, dict):
        raise ModelFileError(card_path, "model card is not a JSON object", fix)
    try:
        digest = sha256_file(weights)
    except OSError as exc:
        raise ModelFileError(weights, f"cannot be read ({exc.strerror})", fix) from exc
    if card.get("sha256") != digest:
        raise ModelFileError(weights, f"checksum {digest[:12]} does not match its model card {card_path.name}",
                             "delete both files to retrain")
    try:
        net = load_net(weights)
    except Exception as exc:  # SafetensorError, ValueError, RuntimeError (state dict), ...: never trusted
        raise ModelFileError(weights, f"is not a usable bids_qmri model file ({_one_line(exc)})", fix) from exc
    return net, card


def _one_line(exc) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _find(directory: Path | None, stem: str) -> Path | None:
    if directory is None:
        return None
    w = directory / f"{stem}.safetensors"
    return w if w.is_file() and w.with_suffix(".json").is_file() else None


def cache_dir(model_dir: str | os.PathLike, modality: str, protocol) -> Path:
    """Where ``--model-dir`` keeps the models of one modality and protocol."""
    return Path(model_dir) / modality / protocol.key()


def bundled_dir(modality: str, model_set: str | None = None) -> Path:
    return BUNDLED_DIR / modality / model_set if model_set else BUNDLED_DIR / modality


def get_model(
    modality: str,
    method: str,
    protocol,
    *,
    model_dir: str | os.PathLike | None,
    trainer: Callable[[], tuple] | None,
    seed: int = 0,
    allow_training: bool = True,
    model_set: str | None = None,
):
    """The network for ``(modality, method, protocol, seed)`` -> ``(net, card)``; see the module
    docstring for the lookup order. ``trainer()`` returns ``(net, card)`` for this method,
    protocol and seed (the modality builds it). The card says where the model came from
    (``origin``) and where its file is (``path``); ``reused`` tells a cached model from a new one.
    """
    stem = model_stem(method, protocol)
    cache = cache_dir(model_dir, modality, protocol) if model_dir is not None else None
    found = _find(cache, stem)
    if found is not None:
        net, card = load_model(found)
        return net, {**card, "path": str(found), "reused": True}
    found = _find(bundled_dir(modality, model_set), stem)
    if found is not None:
        net, card = load_model(found)
        return net, {**card, "path": str(found)}
    seeded = f"{stem}_{model_set}_seed{int(seed)}" if model_set else f"{stem}_seed{int(seed)}"
    found = _find(cache, seeded)
    if found is not None:
        net, card = load_model(found)
        return net, {**card, "path": str(found), "reused": True}
    if cache is None:
        if not allow_training:
            raise FileNotFoundError(f"no bundled {method} model for {protocol.describe()}")
        raise ValueError(
            f"no bundled {method} model for {protocol.describe()}: pass --model-dir so a model "
            "can be trained and cached"
        )
    if not allow_training or trainer is None:
        raise FileNotFoundError(f"no {method} model for {protocol.describe()} in {cache} and training is off")
    with exclusive_lock(cache / f".{seeded}.lock"):
        found = _find(cache, seeded)  # another job may have trained it while we waited
        if found is None:
            log.info("training a %s model on the fly for %s (seed %d)", method, protocol.describe(), seed)
            net, card = trainer()
            card.pop("history", None)
            save_model(net, card, cache, seeded, origin="trained on the fly")
            write_json_atomic(cache / "protocol.json", protocol.as_dict())
            found = cache / f"{seeded}.safetensors"
            net, card = load_model(found)
            return net, {**card, "path": str(found), "reused": False}
    net, card = load_model(found)
    return net, {**card, "path": str(found), "reused": True}
