from __future__ import annotations

import pytest

from trainer.threads import ThreadTuner


def run(tuner: ThreadTuner, seconds_for: dict[int, float], steps: int) -> None:
    for _ in range(steps):
        tuner.observe(seconds_for[tuner.current])


QUIET = {1: 0.5, 2: 0.3}
BUSY = {1: 0.5, 2: 3.0}  # another process holds a core: two threads are ten times slower
PROBE = 8  # per probe: (1 warm-up + 3 timed steps) x 2 candidates


def test_keeps_the_faster_count() -> None:
    calls: list[int] = []
    tuner = ThreadTuner([1, 2], probe=3, period_s=10, set_threads=calls.append)
    assert tuner.current == 1  # probing starts with the first candidate
    run(tuner, QUIET, PROBE)
    assert tuner.choices == [2] and tuner.current == 2 and calls[-1] == 2


def test_rechecks_periodically_and_backs_off_while_the_answer_holds() -> None:
    tuner = ThreadTuner([1, 2], probe=3, period_s=3.0, max_period_s=6.0, set_threads=lambda n: None)
    run(tuner, BUSY, PROBE)
    assert tuner.choices == [1]
    run(tuner, BUSY, 6)  # 6 x 0.5 s = 3 s: the next probe starts ...
    run(tuner, BUSY, PROBE)
    assert tuner.choices == [1, 1]
    run(tuner, BUSY, 6)  # ... but now the period has doubled to 6 s
    assert tuner.current == 1
    run(tuner, QUIET, 6 + PROBE)  # the machine went quiet; the next probe finds it
    assert tuner.choices == [1, 1, 2]


def test_a_sudden_slowdown_triggers_a_probe_at_once() -> None:
    tuner = ThreadTuner([1, 2], probe=3, period_s=1000, set_threads=lambda n: None)
    run(tuner, QUIET, PROBE + 50)
    assert tuner.choices == [2]  # steady: no probe within the period
    run(tuner, BUSY, 3 + PROBE)  # three slow steps, then a probe
    assert tuner.choices == [2, 1] and tuner.current == 1


def test_a_single_candidate_never_switches() -> None:
    calls: list[int] = []
    tuner = ThreadTuner([2, 2], set_threads=calls.append)
    run(tuner, {2: 0.1}, 50)
    assert calls == [2] and tuner.choices == []


def test_candidates_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        ThreadTuner([0, 2], set_threads=lambda n: None)


def test_a_restored_tuner_continues_exactly_where_the_saved_one_was() -> None:
    steps = [0.5, 0.4, 0.6, 0.5, 0.3, 0.2, 0.3, 0.3, 0.5, 2.0, 2.5, 3.0, 0.4, 0.5, 0.6]
    calls: list[int] = []
    straight = ThreadTuner([1, 2], probe=3, period_s=1.0, set_threads=lambda n: None)
    saved = ThreadTuner([1, 2], probe=3, period_s=1.0, set_threads=lambda n: None)
    for seconds in steps[:6]:  # mid-probe: the second candidate is being timed
        straight.observe(seconds)
        saved.observe(seconds)
    resumed = ThreadTuner([1, 2], probe=3, period_s=1.0, set_threads=calls.append)
    assert resumed.current == 1  # a fresh tuner would probe from the first candidate again
    resumed.load_state_dict(saved.state_dict())
    assert calls[-1] == 2  # the restored count is applied at once
    history = []
    for seconds in steps[6:]:
        straight.observe(seconds)
        resumed.observe(seconds)
        history.append((straight.current, resumed.current))
    assert all(a == b for a, b in history), history
    assert resumed.choices == straight.choices and resumed.state_dict() == straight.state_dict()


def test_a_state_for_other_candidates_is_ignored() -> None:
    tuner = ThreadTuner([1, 4], probe=3, set_threads=lambda n: None)
    other = ThreadTuner([1, 2], probe=3, set_threads=lambda n: None)
    tuner.load_state_dict(other.state_dict())
    assert tuner.candidates == [1, 4] and tuner.current == 1 and tuner.choices == []
