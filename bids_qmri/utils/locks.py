"""An exclusive file lock whose lock file is removed after use.

Removing a lock file while others wait on it is racy when done naively: a waiter that opened
the old file would then hold a lock on an unlinked inode while a newcomer locks a new file of
the same name. ``exclusive_lock`` therefore re-checks, once it holds the lock, that the path
still names the file it locked, and starts over if not; the holder unlinks the file before it
unlocks, so the file exists exactly while someone holds (or waits for) the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path


@contextlib.contextmanager
def exclusive_lock(path):
    """Hold an exclusive ``flock`` on ``path`` inside the block; remove ``path`` afterwards."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)  # the holder before us removed the file: lock the new one
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
