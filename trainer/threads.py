"""Choosing the number of CPU threads while training on a machine shared with other work.

On an idle 2-core machine two intra-op threads train about 1.7x faster than one. When another
process holds one of the cores, the same two threads can be ten times slower than one: every
parallel region waits for the thread that is not scheduled. :class:`ThreadTuner` times a few
steps with each candidate count, keeps the fastest, and checks again from time to time.
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
    pays for its own start-up) and keeps the fastest by median. The next probe comes after
    ``period_s`` seconds of training, doubling (up to ``max_period_s``) while the same count
    keeps winning, so a count that is far slower is rarely tried; and at once when the last
    ``probe`` steps take ``slowdown`` times as long as the probe measured (the machine got
    busier). ``set_threads`` is injectable for tests.

    Thread counts sum in different orders, so the count is part of a run's numerics: its state
    goes into the training checkpoint, and a resumed run carries on with the same count and
    the same point of the probe schedule instead of starting a new probe.
    """

    def __init__(
        self,
        candidates: Sequence[int],
        *,
        probe: int = 3,
        period_s: float = 60.0,
        max_period_s: float = 240.0,
        slowdown: float = 2.0,
        set_threads: Callable[[int], None] = torch.set_num_threads,
    ) -> None:
        self.candidates = sorted(set(candidates))
        if not self.candidates or self.candidates[0] < 1:
            raise ValueError(f"thread candidates must be positive, got {list(candidates)}")
        self.probe = probe
        self.base_period_s = period_s
        self.max_period_s = max_period_s
        self.slowdown = slowdown
        self._set = set_threads
        self.choices: list[int] = []  # the count chosen by each probe (for logs and tests)
        self.current = self.candidates[-1]
        self._period_s = period_s
        self._since_probe_s = 0.0
        self._expected_s = 0.0  # the chosen count's step time during the last probe
        self._recent: list[float] = []
        self._timings: dict[int, list[float]] = {}
        self._queue: list[int] = []
        self._warmup = 0
        if len(self.candidates) > 1:
            self._start_probe()
        else:
            self._use(self.current)

    def state_dict(self) -> dict:
        """Plain numbers and lists only (``torch.load(weights_only=True)`` reads them)."""
        return {
            "candidates": list(self.candidates),
            "choices": list(self.choices),
            "current": self.current,
            "period_s": self._period_s,
            "since_probe_s": self._since_probe_s,
            "expected_s": self._expected_s,
            "recent": list(self._recent),
            "timings": [[count, list(t)] for count, t in self._timings.items()],
            "queue": list(self._queue),
            "warmup": self._warmup,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`; a different candidate list starts afresh."""
        if [int(c) for c in state["candidates"]] != self.candidates:
            return
        self.choices = [int(c) for c in state["choices"]]
        self._period_s = float(state["period_s"])
        self._since_probe_s = float(state["since_probe_s"])
        self._expected_s = float(state["expected_s"])
        self._recent = [float(t) for t in state["recent"]]
        self._timings = {int(c): [float(x) for x in t] for c, t in state["timings"]}
        self._queue = [int(c) for c in state["queue"]]
        self.current = int(state["current"])
        self._set(self.current)
        self._warmup = int(state["warmup"])

    def observe(self, seconds: float) -> None:
        if len(self.candidates) == 1:
            return
        if self._queue:
            self._probe_step(seconds)
            return
        self._since_probe_s += seconds
        self._recent = (self._recent + [seconds])[-self.probe :]
        slower = (
            len(self._recent) == self.probe
            and statistics.median(self._recent) > self.slowdown * self._expected_s
        )
        if slower:
            self._period_s = self.base_period_s
        if slower or self._since_probe_s >= self._period_s:
            self._start_probe()

    def _use(self, count: int) -> None:
        self.current = count
        self._set(count)
        self._warmup = 1

    def _start_probe(self) -> None:
        self._timings = {c: [] for c in self.candidates}
        self._queue = list(self.candidates)
        self._use(self._queue[0])

    def _probe_step(self, seconds: float) -> None:
        if self._warmup:
            self._warmup -= 1
            return
        samples = self._timings[self.current]
        samples.append(seconds)
        if len(samples) < self.probe:
            return
        self._queue.pop(0)
        if self._queue:
            self._use(self._queue[0])
            return
        medians = {c: statistics.median(t) for c, t in self._timings.items()}
        best = min(self.candidates, key=medians.__getitem__)
        if self.choices and self.choices[-1] == best:
            self._period_s = min(2 * self._period_s, self.max_period_s)
        else:
            self._period_s = self.base_period_s
            log.info(
                "cpu threads: %s s/step -> using %d",
                ", ".join(f"{c}: {m:.2f}" for c, m in medians.items()),
                best,
            )
        self.choices.append(best)
        self._expected_s = medians[best]
        self._recent = []
        self._since_probe_s = 0.0
        self._use(best)
        self._warmup = 0
