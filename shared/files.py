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
def atomic_path(path: str | Path, *, durable: bool = False) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to by name (as GDAL's writers do); it
    is renamed over ``path`` when the block ends, and removed if the block raises.

    The temporary file lies in ``path``'s folder (so ``os.replace`` is a rename on one
    filesystem), so ``path`` is left as it was on any failure. Missing parent folders are
    created. ``durable``: fsync the folder after the rename, so the rename survives a power cut,
    and first remove temporary files that a writer of ``path`` killed outright left behind (one
    process writes a given path at a time).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if durable:
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_writer(path: str | Path, *, durable: bool = False) -> Iterator[BinaryIO]:
    """A binary file to write ``path``'s new content into; it replaces ``path`` on success, as
    :func:`atomic_path` says. ``durable``: the file is also fsynced before the rename."""
    with atomic_path(path, durable=durable) as tmp, tmp.open("wb") as f:
        yield f
        if durable:
            f.flush()
            os.fsync(f.fileno())


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
