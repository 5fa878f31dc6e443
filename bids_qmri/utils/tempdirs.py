"""Temporary files of every dependency inside the work directory, removed after use.

Some dependencies write temporary files through Python's ``tempfile`` without removing them
(antspyx's Atropos wrapper: ``mktemp`` names ``antsr*prob0{1,2,3}.nii.gz`` in the system temp
directory, never deleted), others through ``TMPDIR`` in C++ or child processes. ``private_tempdir``
points both ``tempfile.tempdir`` and ``TMPDIR`` at a fresh folder and removes the folder with
whatever it holds when the block ends. It changes process-wide state: use it around a whole run
(the CLI, before nipype starts its workers, which inherit ``TMPDIR``) or inside one node's
process (nipype runs each node in its own worker process, or one at a time with ``Linear``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .atomic import _owner_tag

PREFIX = "bids_qmri-tmp-"


@contextlib.contextmanager
def private_tempdir(parent=None, prefix: str = PREFIX):
    """Yield a fresh folder (under ``parent``, else the current temp dir) that ``tempfile`` and
    ``TMPDIR`` point to inside the block; restore both and remove the folder afterwards."""
    for attempt in range(3):  # another run sharing ``parent`` may remove it when it empties
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        try:
            path = Path(tempfile.mkdtemp(prefix=prefix + _owner_tag(), dir=parent))
            break
        except FileNotFoundError:
            if attempt == 2:
                raise
    old_dir, old_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = str(path)
    os.environ["TMPDIR"] = str(path)
    try:
        yield path
    finally:
        tempfile.tempdir = old_dir
        if old_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old_env
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_tempdirs(parent, prefix: str = PREFIX) -> list[Path]:
    """Remove ``private_tempdir`` folders under ``parent`` whose process (this host) is gone:
    what a killed run leaves. Folders of live processes and of other hosts stay."""
    host = _owner_tag().split("-", 1)[0]
    removed = []
    parent = Path(parent)
    if not parent.is_dir():
        return removed
    for folder in sorted(parent.glob(prefix + "*")):
        parts = folder.name[len(prefix):].split("-", 2)
        if len(parts) < 3 or parts[0] != host or not parts[1].isdigit() or not folder.is_dir():
            continue
        try:
            os.kill(int(parts[1]), 0)
            continue  # alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user's
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed
