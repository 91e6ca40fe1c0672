"""A non-blocking file lock: one holder at a time across processes, released by the kernel
when its holder dies (a crashed worker never leaves a lock behind)."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def try_flock(path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` (made if missing) if no one else does; yields
    whether this holds it."""
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
