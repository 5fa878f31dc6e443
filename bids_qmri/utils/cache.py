"""Disk cache for deterministic, expensive tensors (simulated dictionaries, SVD bases).

``disk_cached(directory, name, key_parts, compute)`` returns ``compute()`` (a dict of tensors),
stored as ``<directory>/<name>-<hash of key_parts>.pt``. Files are written atomically and loaded
with ``weights_only=True`` (no arbitrary unpickling); an unreadable file is recomputed and
replaced; an unwritable directory only costs the recomputation next time. Values are
bit-identical whether computed or loaded, so ``--seed`` reproducibility holds.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_path

LOGGER = logging.getLogger("bids_qmri.utils.cache")

__all__ = ["cache_key", "disk_cached", "protocol_hash"]


def protocol_hash(canon: dict) -> str:
    """12 hex digits of the SHA-256 of a protocol's canonical JSON (sorted keys): the protocol part
    of model and dictionary file names, so it must stay stable across versions."""
    return hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).hexdigest()[:12]


def cache_key(key_parts) -> str:
    """16 hex digits of the SHA-256 of ``key_parts`` (arrays by their float64 values, the rest by repr)."""
    key = hashlib.sha256()
    for part in key_parts:
        if isinstance(part, (np.ndarray, torch.Tensor)):
            key.update(np.ascontiguousarray(np.asarray(part), dtype=np.float64).tobytes())
        else:
            key.update(repr(part).encode())
    return key.hexdigest()[:16]


def disk_cached(directory: str | Path, name: str, key_parts, compute) -> dict[str, torch.Tensor]:
    """``compute()`` cached as ``<directory>/<name>-<cache_key(key_parts)>.pt``."""
    path = Path(directory) / f"{name}-{cache_key(key_parts)}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception as exc:  # a truncated or foreign file: rebuild it
            LOGGER.warning("ignoring unreadable cache %s (%s)", path, exc)
    value = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(value, tmp)
    except OSError as exc:  # read-only home: keep going without the cache
        LOGGER.warning("cannot cache %s in %s (%s)", name, path.parent, exc.strerror or exc)
    return value
