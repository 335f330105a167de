"""Admission by memory: a budget of working memory shared by the requests admitted at once.

The budget defaults to half of the memory this process may use: the container's cgroup limit
when there is one (cgroup v2 ``memory.max``, v1 ``memory.limit_in_bytes``), else the machine's
physical memory. The other half is left to the model, the framework and the allocator's slack.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
# cgroup v1 reports "no limit" as a huge number (PAGE_COUNTER_MAX pages); anything above this
# is treated as no limit.
_NO_LIMIT = 1 << 60
BUDGET_SHARE = 0.5


def memory_limit(cgroup_root: Path = CGROUP_ROOT) -> tuple[int, str]:
    """``(bytes, where it came from)``: the cgroup's memory limit when set, else physical memory."""
    for name in ("memory.max", "memory/memory.limit_in_bytes", "memory.limit_in_bytes"):
        try:
            text = (cgroup_root / name).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < _NO_LIMIT:
            return int(text), f"cgroup {cgroup_root / name}"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical memory"


def default_memory_budget(cgroup_root: Path = CGROUP_ROOT) -> int:
    """Half of :func:`memory_limit`."""
    return int(memory_limit(cgroup_root)[0] * BUDGET_SHARE)


class MemoryBudget:
    """Reservations of estimated bytes against a fixed total; thread-safe.

    A reservation that does not fit waits (bounded) for others to be released; one larger than
    the whole budget can never fit and is refused at once by the caller.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self._reserved = 0
        self._freed = threading.Condition()

    @property
    def reserved(self) -> int:
        return self._reserved

    def try_reserve(self, nbytes: int, timeout: float) -> bool:
        """Reserve ``nbytes`` when they fit within ``timeout`` seconds; False if they did not."""
        with self._freed:
            fits = self._freed.wait_for(
                lambda: self._reserved + nbytes <= self.total, timeout=max(0.0, timeout)
            )
            if fits:
                self._reserved += nbytes
            return fits

    def release(self, nbytes: int) -> None:
        with self._freed:
            self._reserved -= nbytes
            self._freed.notify_all()
