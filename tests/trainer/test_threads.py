from __future__ import annotations

import pytest

from trainer.threads import ThreadTuner


def run(tuner: ThreadTuner, seconds_for: dict[int, float], steps: int) -> None:
    for _ in range(steps):
        tuner.observe(seconds_for[tuner.current])


def test_keeps_the_faster_count_and_rechecks() -> None:
    calls: list[int] = []
    tuner = ThreadTuner([1, 2], probe=3, period=10, set_threads=calls.append)
    assert tuner.current == 1  # probing starts with the first candidate
    run(tuner, {1: 0.5, 2: 0.3}, 8)  # 1 warm-up + 3 timed steps each
    assert tuner.choices == [2] and tuner.current == 2
    run(tuner, {1: 0.5, 2: 0.3}, 5)
    assert tuner.current == 2  # no probe before `period` steps
    # Another process now holds a core: two threads become ten times slower.
    run(tuner, {1: 0.5, 2: 3.0}, 5 + 8)
    assert tuner.choices == [2, 1] and tuner.current == 1
    assert calls[-1] == 1


def test_a_single_candidate_never_switches() -> None:
    calls: list[int] = []
    tuner = ThreadTuner([2, 2], set_threads=calls.append)
    run(tuner, {2: 0.1}, 50)
    assert calls == [2] and tuner.choices == []


def test_candidates_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        ThreadTuner([0, 2], set_threads=lambda n: None)
