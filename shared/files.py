"""Atomic file writes: a reader (or a run resumed after a crash) sees the old file or the new
one, never half of one."""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_writer(path: str | Path, *, durable: bool = False) -> Iterator[BinaryIO]:
    """A binary file to write ``path``'s new content into; it replaces ``path`` on success.

    The bytes go to a temporary file in the same folder (so ``os.replace`` is a rename on one
    filesystem), then it is renamed over ``path``. On any failure the temporary file is removed
    and ``path`` is left as it was. Missing parent folders are created. ``durable``: fsync the
    file before the rename and the folder after it, so the rename survives a power cut, and
    first remove temporary files that a writer of ``path`` killed outright left behind (one
    process writes a given path at a time).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if durable:
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    if durable:
        _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_writer(path) as f:
        f.write(data)
    return Path(path)


def _fsync_dir(folder: Path) -> None:
    # Not every platform can open a directory (Windows cannot); the rename is already done.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
