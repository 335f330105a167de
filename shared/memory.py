"""Process memory: handing freed heap memory back to the operating system."""

from __future__ import annotations

import contextlib
import ctypes


def release_free_memory() -> None:
    """Hand freed heap memory back to the operating system (glibc keeps it otherwise, and a
    long-running server's resident size would stay at its start-up peak)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
