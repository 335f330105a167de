"""Tests for benchmarks/gpu_check.py: which wheels it installs, how it reads pytest's and the
trainer's results, and that one failing stage leaves the others' results in the JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check
from benchmarks.gpu_check import (
    junit_summary,
    marked_result,
    run_logged,
    select_wheels,
    training_summary,
    wheel_fits,
    wheel_name_version,
)

SUPPORTED = {
    "cp312-cp312-manylinux_2_28_x86_64",
    "py3-none-any",
    "cp312-abi3-manylinux_2_17_x86_64",
}


def touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


def test_wheel_names_and_tags() -> None:
    wheel = Path("pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl")
    assert wheel_name_version(wheel) == ("pydantic_core", "2.50.5")
    assert not wheel_fits(wheel, SUPPORTED)
    assert wheel_fits(wheel, SUPPORTED | {"cp312-cp312-manylinux_2_17_x86_64"})
    assert wheel_fits(Path("click_plugins-1.1.1.2-py2.py3-none-any.whl"), SUPPORTED)
    with pytest.raises(ValueError, match="not a wheel"):
        wheel_name_version(Path("notes.whl"))


def test_select_wheels_keeps_the_machines_torch_and_skips_what_is_installed(tmp_path) -> None:
    house, site = tmp_path / "house", tmp_path / "site"
    touch(
        house,
        "torch-2.14.1-cp312-cp312-manylinux_2_28_x86_64.whl",
        "nvidia_cudnn_cu13-9.24.0.43-py3-none-manylinux_2_27_x86_64.whl",
        "triton-3.8.0-cp312-cp312-manylinux_2_28_x86_64.whl",
        "rasterio-1.4.4-cp311-cp311-manylinux_2_28_x86_64.whl",  # another Python
        "rasterio-1.4.4-cp312-cp312-manylinux_2_28_x86_64.whl",
        "fastapi-0.165.0-py3-none-any.whl",
        "typing_extensions-4.16.0-py3-none-any.whl",
    )
    (site / "typing_extensions-4.16.0.dist-info").mkdir(parents=True)
    (site / "fastapi-0.164.0.dist-info").mkdir()  # an older version: replaced
    chosen, skipped = select_wheels(house, site, SUPPORTED)
    assert [w.name for w in chosen] == [
        "fastapi-0.165.0-py3-none-any.whl",
        "rasterio-1.4.4-cp312-cp312-manylinux_2_28_x86_64.whl",
    ]
    assert len(skipped["torch_family"]) == 3
    assert skipped["other_platform"] == ["rasterio-1.4.4-cp311-cp311-manylinux_2_28_x86_64.whl"]
    assert skipped["present"] == ["typing_extensions-4.16.0-py3-none-any.whl"]


def test_junit_summary_names_failures_and_skips(tmp_path) -> None:
    xml = tmp_path / "r.xml"
    xml.write_text(
        """<testsuites><testsuite name="pytest" tests="3">
        <testcase classname="tests.shared.test_x" name="test_ok"/>
        <testcase classname="tests.shared.test_x" name="test_bad">
          <failure message="assert 1 == 2">trace</failure></testcase>
        <testcase classname="tests.shared.test_x" name="test_gpu">
          <skipped message="needs CUDA"/></testcase>
        </testsuite></testsuites>"""
    )
    got = junit_summary(xml)
    assert got["tests"] == 3 and got["passed"] == 1
    assert got["failed"] == {"tests.shared.test_x::test_bad": "assert 1 == 2"}
    assert got["skipped"] == {"tests.shared.test_x::test_gpu": "needs CUDA"}


def test_training_summary_reads_the_log_and_the_test_metrics(tmp_path) -> None:
    (tmp_path / "train.log").write_text(
        "12:00:00 epoch 1/60: train loss 0.9\n"
        "12:03:00 done: 7 epoch(s), 140 steps, 3.0 min of training at 48.5 img/s; "
        "best val mIoU 0.7\n"
    )
    per_class = [{"name": "ocean", "iou": 0.97}, {"name": "lake", "iou": 0.3}]
    metrics = {"miou": 0.8, "per_class": per_class, "device": "cuda", "images_per_s": 90.0}
    (tmp_path / "test_metrics.json").write_text(json.dumps(metrics))
    got = training_summary(tmp_path)
    assert (got["epochs"], got["steps"], got["minutes"], got["images_per_s"]) == (7, 140, 3.0, 48.5)
    assert got["test"]["iou"] == {"ocean": 0.97, "lake": 0.3}
    assert got["test"]["device"] == "cuda" and got["test"]["miou"] == 0.8


def test_run_logged_stops_a_command_at_its_limit(tmp_path) -> None:
    with open(tmp_path / "log", "w") as log:
        slow = run_logged(
            [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
            limit_s=2,
            env={},
            log=log,
        )
        quick = run_logged(
            [sys.executable, "-c", "print('GPU_CHECK_RESULT {\"a\": 1}'); raise SystemExit(3)"],
            limit_s=60,
            env={},
            log=log,
        )
    assert slow.timed_out and slow.returncode is None and slow.tail[0] == "started"
    assert not quick.timed_out and quick.returncode == 3
    assert marked_result(quick) == {"a": 1}
    assert "started" in (tmp_path / "log").read_text()


def run_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stages, *extra: str) -> int:
    monkeypatch.setattr(gpu_check, "STAGES", stages)
    return gpu_check.main(["--out", str(tmp_path), "--wheelhouse", "", *extra])


def test_a_failing_stage_leaves_the_others_in_the_json(tmp_path, monkeypatch) -> None:
    def environment(ctx):
        ctx.cuda = True
        return {"ok": True, "status": "passed", "device_name": "Test GPU", "torch": "2.11"}

    def broken(ctx):
        raise RuntimeError("the trainer exploded")

    def inference(ctx):
        return {"ok": True, "status": "passed", "result": {"cuda": {"rows": []}}}

    stages = (("environment", environment), ("train", broken), ("inference", inference))
    assert run_check(tmp_path, monkeypatch, stages) == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["ok"] is False and report["failed"] == ["train"]
    assert report["stages"]["train"]["error"] == "RuntimeError: the trainer exploded"
    assert report["stages"]["inference"]["ok"] is True
    assert report["summary"]["device"] == "Test GPU" and report["mode"] == "cuda"


def test_without_cuda_the_check_stops_with_exit_code_2(tmp_path, monkeypatch) -> None:
    ran = []

    def environment(ctx):
        return {"ok": False, "status": "failed", "error": "CUDA is not available"}

    def later(ctx):
        ran.append("later")
        return {"ok": True, "status": "passed"}

    stages = (("environment", environment), ("gpu_tests", later))
    assert run_check(tmp_path, monkeypatch, stages) == 2
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert ran == [] and report["mode"] == "no cuda"
    assert report["stages"]["environment"]["error"] == "CUDA is not available"


def test_gpu_test_files_are_found() -> None:
    files = gpu_check.gpu_test_files(gpu_check.REPO / "tests")
    assert gpu_check.REPO / "tests" / "shared" / "test_inference.py" in files
    assert all("pytest.mark.gpu" in f.read_text() for f in files)


def test_markdown_renders_the_cuda_numbers(tmp_path, capsys) -> None:
    rows = [{"batch": 1, "images_per_s": 120.0, "median_s": 0.0083}]
    compiled = {"rows": [{"batch": 8, "images_per_s": 900.0, "median_s": 0.0089}]}
    report = {
        "started_utc": "2026-11-27T15:00:00+00:00",
        "train_minutes": 3.0,
        "stages": {
            "environment": {"status": "passed", "device_name": "NVIDIA H100", "torch": "2.11"},
            "train": {
                "status": "passed",
                "steps": 400,
                "test": {"iou": {"lake": 0.41}, "miou": 0.78, "precision": "bf16"},
            },
            "inference": {
                "status": "timeout",
                "error": "stopped at its time limit",
                "result": {"cuda": {"precision": "bf16", "rows": rows, "compiled": compiled}},
            },
        },
        "summary": {"gpu_tests": "7 passed, 0 failed, 0 skipped"},
    }
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps(report))
    assert gpu_check.main(["--markdown", str(path)]) == 0
    text = capsys.readouterr().out
    assert "Machine: NVIDIA H100" in text and "| inference | timeout |" in text
    assert "400 steps" in text and "lake 0.41" in text and "7 passed" in text
    assert "| cuda eager (bf16) | 1 | 120 |" in text
    assert "| cuda compiled (bf16) | 8 | 900 |" in text
    assert "torch.compile time inside it" in text
    assert gpu_check.main(["--markdown", str(tmp_path / "missing.json")]) == 2

    # A run trained with overrides says so: its steps are not the recipe's.
    report["train_overrides"] = ["train.compile=False"]
    path.write_text(json.dumps(report))
    assert gpu_check.main(["--markdown", str(path)]) == 0
    text = capsys.readouterr().out
    assert "`train.compile=False`" in text and "not compiled" in text
    report["train_overrides"] = ["train.compile=false", "train.compile=true"]
    path.write_text(json.dumps(report))
    assert gpu_check.main(["--markdown", str(path)]) == 0
    assert "torch.compile time inside it" in capsys.readouterr().out


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting to be reaped does not count)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_run_logged_also_stops_the_commands_children(tmp_path) -> None:
    script = (
        "import subprocess, time; child = subprocess.Popen(['sleep', '60']); "
        "print(child.pid, flush=True); time.sleep(60)"
    )
    with open(tmp_path / "log", "w") as log:
        outcome = run_logged([sys.executable, "-c", script], limit_s=2, env={}, log=log)
    assert outcome.timed_out
    assert not _running(int(outcome.tail[0]))
