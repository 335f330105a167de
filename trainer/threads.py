"""Choosing the number of CPU threads while training on a machine shared with other work.

On an idle 2-core machine two intra-op threads train about 1.7x faster than one. When another
process holds one of the cores, the same two threads can be ten times slower than one: every
parallel region waits for the thread that is not scheduled. :class:`ThreadTuner` times a few
steps with each candidate count, keeps the fastest, and checks again every ``period`` steps.
"""

from __future__ import annotations

import logging
import os
import statistics
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger("trainer")


def available_cpus() -> int:
    """CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


class ThreadTuner:
    """Call :meth:`observe` after every optimiser step with the step's duration in seconds.

    A probe times ``probe`` steps per candidate (after one warm-up step, as a new thread count
    pays for its own start-up) and switches to the fastest by median; it repeats after
    ``period`` steps at the chosen count. ``set_threads`` is injectable for tests.
    """

    def __init__(
        self,
        candidates: Sequence[int],
        *,
        probe: int = 3,
        period: int = 200,
        set_threads: Callable[[int], None] = torch.set_num_threads,
    ) -> None:
        self.candidates = sorted(set(candidates))
        if not self.candidates or self.candidates[0] < 1:
            raise ValueError(f"thread candidates must be positive, got {list(candidates)}")
        self.probe = probe
        self.period = period
        self._set = set_threads
        self.current = self.candidates[-1]
        self._timings: dict[int, list[float]] = {}
        self._queue: list[int] = []
        self._skip = 0
        self._until_probe = 0
        self.choices: list[int] = []  # the count chosen after each probe (for logs and tests)
        self._start_probe()

    def _use(self, count: int) -> None:
        self.current = count
        self._set(count)
        self._skip = 1

    def _start_probe(self) -> None:
        self._timings = {c: [] for c in self.candidates}
        self._queue = list(self.candidates)
        self._use(self._queue[0])

    def observe(self, seconds: float) -> None:
        if len(self.candidates) == 1:
            return
        if self._queue:
            if self._skip:
                self._skip -= 1
                return
            samples = self._timings[self.current]
            samples.append(seconds)
            if len(samples) >= self.probe:
                self._queue.pop(0)
                if self._queue:
                    self._use(self._queue[0])
                else:
                    best = min(self.candidates, key=lambda c: statistics.median(self._timings[c]))
                    if best != self.current or not self.choices or self.choices[-1] != best:
                        log.info(
                            "cpu threads: %s s/step -> using %d",
                            ", ".join(
                                f"{c}: {statistics.median(self._timings[c]):.2f}"
                                for c in self.candidates
                            ),
                            best,
                        )
                    self.choices.append(best)
                    self._use(best)
                    self._skip = 0
                    self._until_probe = self.period
            return
        self._until_probe -= 1
        if self._until_probe <= 0:
            self._start_probe()
