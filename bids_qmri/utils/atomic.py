"""Atomic file writes: write to a temporary name in the same directory, then ``os.replace``.

A killed process leaves either the old file or the new one, never a half-written one, and
several processes writing the same path never interleave their bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
from pathlib import Path

TMP_PREFIX = ".tmp-bids_qmri-"


def _owner_tag() -> str:
    """``<host>-<pid>-`` in temporary names, so stale ones (dead writer) can be recognised."""
    host = "".join(c for c in socket.gethostname() if c.isalnum())[:32] or "host"
    return f"{host}-{os.getpid()}-"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int = 0o644):
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    On an exception the temporary file is removed and ``path`` is left untouched. The temporary
    keeps ``path``'s suffixes (``.nii.gz``) so that writers choosing a format by name still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + _owner_tag(), suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default, allow_nan=False)
    return write_text_atomic(path, text + "\n")


def _json_default(obj):
    """JSON for the NumPy scalars/arrays and paths that end up in sidecars."""
    try:
        import numpy as np
    except ImportError:  # numpy is a hard dependency
        np = None
    if np is not None:
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def leftover_temporaries(root: str | os.PathLike) -> list[Path]:
    """Temporary files of writers, finished or killed (for tests and clean-up)."""
    return sorted(Path(root).rglob(f"{TMP_PREFIX}*"))


def remove_stale_temporaries(root: str | os.PathLike) -> list[Path]:
    """Delete temporaries whose writer (this host, that pid) is gone: what a kill -9 leaves.

    Temporaries of live writers, and of other hosts (shared file systems on a cluster), stay.
    """
    host = _owner_tag().split("-", 1)[0]
    removed = []
    for tmp in leftover_temporaries(root):
        parts = tmp.name[len(TMP_PREFIX):].split("-", 2)
        if len(parts) < 3 or parts[0] != host or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        try:
            os.kill(pid, 0)
            continue  # alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user's
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    return removed
