"""Tests for benchmarks/common.py: percentiles, timing, tables, JSON, machine description."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.common import (
    Timing,
    describe,
    machine,
    markdown_table,
    percentile,
    time_calls,
    time_interleaved,
    write_json,
)


def test_percentile_interpolates_between_order_statistics() -> None:
    values = [4.0, 1.0, 3.0, 2.0]  # sorted: 1 2 3 4
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 95) == pytest.approx(3.85)
    assert percentile([7.0], 95) == 7.0
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        percentile([1.0], 101)


def test_timing_summary() -> None:
    timing = Timing((0.3, 0.1, 0.2))
    assert timing.median == 0.2
    summary = timing.to_dict()
    assert summary["min_s"] == 0.1 and summary["runs"] == 3 and summary["p50_s"] == 0.2


def test_time_calls_counts_warmup_apart() -> None:
    calls = []
    timing = time_calls(lambda: calls.append(1), repeat=3, warmup=2)
    assert len(calls) == 5 and len(timing.seconds) == 3
    with pytest.raises(ValueError, match="repeat"):
        time_calls(lambda: None, repeat=0)


def test_time_interleaved_takes_turns() -> None:
    order: list[str] = []
    timings = time_interleaved(
        {"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeat=2, warmup=1
    )
    assert order == ["a", "b", "a", "b", "a", "b"]  # warm-up a, b, then two timed rounds
    assert set(timings) == {"a", "b"} and len(timings["a"].seconds) == 2


def test_markdown_table() -> None:
    table = markdown_table(["a", "b"], [["x", 1.23456], ["y", None], ["z", 1234.5]])
    assert table.splitlines() == [
        "| a | b |",
        "|---|---|",
        "| x | 1.23 |",
        "| y | - |",
        "| z | 1234 |",
    ]


def test_write_json_creates_the_folder_and_serialises_timings(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "out.json"
    write_json(path, {"t": Timing((1.0,)), "device": torch.device("cpu"), "p": Path("/x")})
    data = json.loads(path.read_text())
    assert data["t"]["median_s"] == 1.0 and data["device"] == "cpu" and data["p"] == "/x"


def test_machine_describes_this_process() -> None:
    info = machine()
    for key in ("date", "cpu", "cpu_count", "torch", "torch_threads", "cpu_flags", "cuda"):
        assert key in info
    assert info["torch_threads"] == torch.get_num_threads()
    assert info["cpu"] in describe(info)
