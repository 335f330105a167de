"""Tests for benchmarks/gpu_sweep.py: reading candidates, planning runs, aggregating seeds."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from benchmarks.gpu_sweep import (
    QUICK_RECIPE,
    Candidate,
    Job,
    aggregate,
    cpu_slots,
    load_candidates,
    parse_line,
    plan,
)
from trainer.config import load_config

REPO = Path(__file__).resolve().parents[2]


def test_parse_line_reads_name_config_and_overrides() -> None:
    got = parse_line("focus  train.max_steps=600 augment.focus_crop=0.3  # lakes", QUICK_RECIPE)
    assert got == Candidate(
        "focus", QUICK_RECIPE, ("train.max_steps=600", "augment.focus_crop=0.3")
    )
    got = parse_line("r18 --config trainer/configs/x.yaml train.lr=0.002", QUICK_RECIPE)
    assert got == Candidate("r18", "trainer/configs/x.yaml", ("train.lr=0.002",))
    assert parse_line("   # only a comment", QUICK_RECIPE) is None
    with pytest.raises(ValueError, match="must start with a name"):
        parse_line("train.lr=0.1", QUICK_RECIPE)
    with pytest.raises(ValueError, match="not key=value"):
        parse_line("bad train.lr 0.1", QUICK_RECIPE)


def test_load_candidates_from_a_folder_of_lines_and_configs(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("base\nlr2 train.lr=0.002\n")
    (tmp_path / "wide.yaml").write_text("train: {lr: 0.001}\n")
    (tmp_path / "FORMAT.md").write_text("not a candidate")
    got = load_candidates(tmp_path, QUICK_RECIPE)
    assert [c.name for c in got] == ["base", "lr2", "wide"]
    assert got[2].config == str(tmp_path / "wide.yaml")
    (tmp_path / "b.txt").write_text("lr2 train.lr=0.003\n")
    with pytest.raises(ValueError, match="used twice: lr2"):
        load_candidates(tmp_path, QUICK_RECIPE)


def test_plan_runs_seed_by_seed_and_once_for_a_fixed_seed(tmp_path: Path) -> None:
    a = Candidate("a", QUICK_RECIPE, ())
    fixed = Candidate("f", QUICK_RECIPE, ("train.seed=5",))
    jobs = plan([a, fixed], [42, 7], tmp_path)
    assert [(j.name, j.seed) for j in jobs] == [("a-s42", 42), ("f", None), ("a-s7", 7)]


def test_aggregate_gives_mean_and_std_over_scored_seeds(tmp_path: Path) -> None:
    c = Candidate("a", QUICK_RECIPE, ())
    jobs = []
    for seed, lake in ((1, 0.30), (2, 0.40), (3, None)):
        job = Job(c, seed, tmp_path / f"a-s{seed}")
        if lake is not None:
            job.result = {"steps": 600, "test": {"miou": 0.7, "iou": {"lake": lake}}}
        jobs.append(job)
    got = aggregate(jobs)["a"]
    assert got["runs_scored"] == 2
    assert got["lake_iou"]["mean"] == pytest.approx(0.35)
    assert got["lake_iou"]["std"] == pytest.approx(statistics.stdev([0.30, 0.40]))
    assert got["steps"]["values"] == [600, 600]


def test_cpu_slots_are_disjoint_equal_shares() -> None:
    slots = cpu_slots(1)
    assert len(slots) == 1 and slots[0]
    many = cpu_slots(len(slots[0]))
    assert all(len(s) == 1 for s in many)
    assert len(set().union(*many)) == len(slots[0])


def test_check_resolves_each_run_and_names_a_bad_key(tmp_path: Path, capsys) -> None:
    from benchmarks.gpu_sweep import main

    (tmp_path / "c.txt").write_text("fixed train.max_steps=600 train.max_minutes=null\n")
    args = ["--candidates", str(tmp_path), "--seeds", "1,2", "--check", "--wheelhouse", ""]
    assert main(args) == 0
    out = capsys.readouterr().out
    backbone = load_config(REPO / "trainer/configs/quickstart.yaml", []).model.backbone
    assert f"fixed-s1: {backbone}, 600 steps, max_minutes None, seed 1" in out
    assert "fixed-s2:" in out and "2 runs" in out
    (tmp_path / "c.txt").write_text("typo train.max_step=600\n")
    assert main(args) == 2
    assert "candidate typo" in capsys.readouterr().err


def test_table_shows_mean_and_std_and_unscored_candidates(tmp_path: Path) -> None:
    from benchmarks.gpu_sweep import table

    c, d = Candidate("a", QUICK_RECIPE, ()), Candidate("b", QUICK_RECIPE, ())
    jobs = [Job(c, s, tmp_path / f"a-s{s}") for s in (1, 2)] + [Job(d, 1, tmp_path / "b-s1")]
    for job, lake in zip(jobs[:2], (0.30, 0.40), strict=True):
        job.result = {
            "steps": 600,
            "images_per_s": 50.0,
            "test": {"miou": 0.7, "iou": {"lake": lake}},
        }
    text = table({"by_candidate": aggregate(jobs)})
    assert "| a | 2 | - | - | 0.350 +- 0.071 | 0.700 +- 0.000 | 600 | 50.0 |" in text
    assert "| b | 0 | - | - | - | - | - | - |" in text
