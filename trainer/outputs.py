"""The run folder: created and proven writable at start-up, so a bad ``out_dir`` or a full disk
fails before any training instead of after the first epoch.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from torch import nn

# Files that mark a folder as holding a run.
RUN_FILES = ("last.pt", "best.pt")


class OutputDirError(RuntimeError):
    """The run folder cannot be created or written, or lacks the space a run needs."""


def default_run_name() -> str:
    """A UTC timestamp, e.g. ``20250101-120000``."""
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S")


def prepare_run_dir(run_dir: Path, *, overwrite: bool = False, resuming: bool = False) -> Path:
    """Create ``run_dir`` and prove a file can be written, synced and removed there.

    A folder that already holds a run is refused unless ``overwrite`` (or ``resuming``, which
    continues that run): silently replacing a trained model is worse than stopping.
    """
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputDirError(f"out_dir: {run_dir} exists and is not a folder") from None
    except OSError as err:
        raise OutputDirError(f"out_dir: cannot create {run_dir} ({err.strerror or err})") from None
    existing = [name for name in RUN_FILES if (run_dir / name).exists()]
    if existing and not (overwrite or resuming):
        raise OutputDirError(
            f"run folder {run_dir} already holds {', '.join(existing)}; continue it with "
            f"train.resume={run_dir / 'last.pt'}, pick another run_name, or set overwrite=true"
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=run_dir)
        try:
            os.write(fd, b"0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        raise OutputDirError(
            f"out_dir: {run_dir} is not writable ({err.strerror or err})"
        ) from None
    return run_dir


def checkpoint_bytes(model: nn.Module, *, optimizer_slots: int = 2) -> int:
    """Rough size of ``last.pt``: the weights plus ``optimizer_slots`` copies (Adam's moments)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return params * (1 + optimizer_slots) + buffers


def check_free_space(run_dir: Path, needed: int) -> None:
    """Raise OutputDirError when the disk of ``run_dir`` has less than ``needed`` bytes free."""
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise OutputDirError(
            f"out_dir: {run_dir} has {free / 2**20:.0f} MiB free; checkpoints need about "
            f"{needed / 2**20:.0f} MiB"
        )
