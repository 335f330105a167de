"""One prepared check of a CUDA machine, with every stage's result in one JSON.

    benchmarks/gpu_check.sh [--out DIR] [--train-minutes 3] [--budget-s 480] [--allow-cpu]
    make gpu-check

For a machine with PyTorch preinstalled: the project's other dependencies come from a wheelhouse
(``WHEELHOUSE``, default ``wheelhouse/cuda`` as ``make wheelhouse`` fills it), installed with
``--no-index --no-deps`` into a folder put on ``PYTHONPATH`` (``GPU_CHECK_SITE``); wheels of the
PyTorch family (torch, torchvision, triton, nvidia-*, cuda-*) and wheels this interpreter cannot
load are left out, so the machine's own PyTorch is what runs. The project itself is not
installed: the stages run from the checkout.

Stages, in order, each in a subprocess under its own time limit and all within ``--budget-s``:

1. **wheels**: the install above;
2. **environment**: ``nvidia-smi``, the device torch sees, versions against pyproject's pins.
   Without CUDA the check stops here with exit code 2, unless ``--allow-cpu``
   (``GPU_CHECK_ALLOW_CPU=1``), which runs every stage shrunk on the CPU to try the plumbing;
3. **imports**: every module of shared, trainer, service and benchmarks imports;
4. **gpu_tests**: ``pytest -m gpu`` on the test files that hold such tests;
5. **train**: the full recipe (``trainer/config.yaml``, DeepLabV3-ResNet50) for
   ``--train-minutes`` on ``--data``, then its test-split evaluation;
6. **inference**: ``benchmarks.inference --quick``: the service's engine against the CPU fp32
   torchvision baseline, then its CUDA section at ``--cuda-batches`` (eager, and
   ``torch.compile`` with CUDA graphs), on the checkpoint just trained.

The JSON (``<out>/gpu_check.json``) is rewritten after every stage, so a stage that fails or
runs out of time leaves the others' results and its own error; every stage's output is in
``<out>/gpu_check.log``. Exit code: 0 all stages passed, 1 one failed, 2 no CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

# Standard library only, like this module: it runs before the wheels are installed.
from shared.files import atomic_write_bytes

REPO = Path(__file__).resolve().parents[1]
RESULT_MARK = "GPU_CHECK_RESULT "
# Distributions that come with a CUDA build of PyTorch: the machine's own are kept.
TORCH_FAMILY = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia[-_].+|cuda[-_].+)$")
# Missing modules that only optional extras need (pyproject's [ray]).
OPTIONAL_MODULES = frozenset({"ray"})
# The CPU rehearsal: every stage, shrunk to a few steps and small tiles.
CPU_TRAIN_OVERRIDES = (
    "train.max_minutes=null",
    "train.max_steps=2",
    "train.epochs=1",
    "train.batch_size=2",
    "train.compile=false",
    "data.image_size=128",
    "data.num_workers=0",
    "eval.tile=256",
    "eval.overlap=32",
)
CPU_INFERENCE_ARGS = ("--size", "128", "--repeat", "1", "--agreement-tiles", "1")
CPU_INFERENCE_ARGS += ("--precision", "fp32")  # no int8 calibration
# Tiles of each split the CPU rehearsal trains and evaluates on.
CPU_TILES = {"TAIN_VAL_SET": 24, "TRAIN_VAL_SET": 24, "TEST_SET": 6}


# ----- running a stage ---------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """How a subprocess ended: its exit code (None when killed at its limit) and output tail."""

    returncode: int | None
    seconds: float
    timed_out: bool
    tail: list[str]
    results: list[str]  # whole lines that start with RESULT_MARK (probes' answers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "returncode": self.returncode,
            "seconds": round(self.seconds, 2),
            "timed_out": self.timed_out,
            "log_tail": self.tail,
        }


def run_logged(
    cmd: Sequence[str],
    *,
    limit_s: float,
    env: dict[str, str],
    log: TextIO,
    tail_lines: int = 40,
) -> Outcome:
    """Run ``cmd`` in the checkout, its output copied to ``log`` and this process's stdout as it
    comes; killed with its children (a process group) after ``limit_s`` seconds."""
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    tail: deque[str] = deque(maxlen=tail_lines)
    results: list[str] = []
    start = time.monotonic()
    proc = subprocess.Popen(
        list(cmd),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )

    def copy() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            sys.stdout.write(line)
            tail.append(line.rstrip("\n")[-400:])
            if line.startswith(RESULT_MARK):
                results.append(line)
        log.flush()
        sys.stdout.flush()

    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=max(limit_s, 1.0))
    except subprocess.TimeoutExpired:
        timed_out = True
        kill_group(proc)
    reader.join(timeout=10)
    seconds = time.monotonic() - start
    if timed_out:
        tail.append(f"[killed after its limit of {limit_s:.0f} s]")
        log.write(tail[-1] + "\n")
    returncode = None if timed_out else proc.returncode
    return Outcome(returncode, seconds, timed_out, list(tail), results)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group; after up to ten seconds, SIGKILL whatever is left of it
    (data-loading workers, compile workers)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def marked_result(outcome: Outcome) -> dict[str, Any] | None:
    """The JSON a probe printed after :data:`RESULT_MARK`, if any."""
    if not outcome.results:
        return None
    return json.loads(outcome.results[-1][len(RESULT_MARK) :])


# ----- wheels ------------------------------------------------------------------------------


def wheel_name_version(path: Path) -> tuple[str, str]:
    """``("pydantic_core", "2.50.5")`` from a wheel's file name (PEP 427)."""
    parts = path.name[: -len(".whl")].split("-")
    if len(parts) < 5:
        raise ValueError(f"{path.name} is not a wheel file name")
    return re.sub(r"[-_.]+", "_", parts[0]).lower(), parts[1]


def _supported_tags() -> set[str]:
    try:
        from packaging.tags import sys_tags
    except ImportError:  # pip vendors packaging
        from pip._vendor.packaging.tags import sys_tags
    return {str(t) for t in sys_tags()}


def wheel_fits(path: Path, supported: set[str]) -> bool:
    """Whether this interpreter can load the wheel (one of its tags is supported)."""
    python, abi, plat = path.name[: -len(".whl")].split("-")[-3:]
    return any(
        f"{p}-{a}-{pl}" in supported
        for p in python.split(".")
        for a in abi.split(".")
        for pl in plat.split(".")
    )


def select_wheels(
    wheelhouse: Path, site: Path, supported: set[str]
) -> tuple[list[Path], dict[str, list[str]]]:
    """The wheels to install into ``site``, and what was left out, by reason."""
    chosen: list[Path] = []
    skipped: dict[str, list[str]] = {"torch_family": [], "other_platform": [], "present": []}
    for wheel in sorted(wheelhouse.glob("*.whl")):
        name, version = wheel_name_version(wheel)
        if TORCH_FAMILY.match(name.replace("_", "-")):
            skipped["torch_family"].append(wheel.name)
        elif not wheel_fits(wheel, supported):
            skipped["other_platform"].append(wheel.name)
        elif any(
            re.sub(r"[-_.]+", "_", d.name[: -len(f"-{version}.dist-info")]).lower() == name
            for d in site.glob(f"*-{version}.dist-info")
        ):
            skipped["present"].append(wheel.name)
        else:
            chosen.append(wheel)
    return chosen, skipped


def install_wheels(
    python: str,
    wheelhouse: Path | None,
    site: Path,
    run: Callable[[list[str], float], Outcome],
) -> dict[str, Any]:
    """Install the wheels :func:`select_wheels` picks into ``site`` (``--no-index --no-deps``),
    with ``run(cmd, limit_s)``; returns the stage entry."""
    if wheelhouse is None:
        return {"ok": True, "status": "skipped", "note": "no wheelhouse given (WHEELHOUSE empty)"}
    if not wheelhouse.is_dir():
        return {
            "ok": True,
            "status": "skipped",
            "note": f"wheelhouse {wheelhouse} does not exist; using the interpreter's packages",
        }
    site.mkdir(parents=True, exist_ok=True)
    chosen, skipped = select_wheels(wheelhouse, site, _supported_tags())
    entry: dict[str, Any] = {
        "wheelhouse": str(wheelhouse),
        "site": str(site),
        "installed": [w.name for w in chosen],
        "skipped": skipped,
    }
    if not chosen:
        return {"ok": True, "status": "passed", **entry}
    cmd = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    cmd += ["--no-cache-dir", "--upgrade", "--target", str(site), *map(str, chosen)]
    outcome = run(cmd, 180)
    return {**_status(outcome, outcome.returncode == 0), **entry, **outcome.to_dict()}


def stage_wheels(ctx: Context) -> dict[str, Any]:
    return install_wheels(ctx.python, ctx.wheelhouse, ctx.site, ctx.run)


def child_env(site: Path, *, cuda: bool) -> dict[str, str]:
    """The stages' environment: the checkout, then the installed wheels, on ``PYTHONPATH``;
    without CUDA the service's engine is kept on the CPU."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    paths = [str(REPO), str(site), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    if not cuda:
        env.setdefault("SATSEG_DEVICE", "cpu")
    return env


# ----- probes run by the checked interpreter ------------------------------------------------

ENVIRONMENT_PROBE = r"""
import json, os, platform, sys, tomllib
from importlib import metadata
import torch
info = {
    "python": platform.python_version(),
    "executable": sys.executable,
    "torch": torch.__version__,
    "torch_cuda": torch.version.cuda,
    "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    "cuda_available": torch.cuda.is_available(),
    "cpu_count": os.cpu_count(),
}
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info.update(
        device_count=torch.cuda.device_count(),
        device_name=props.name,
        capability=f"{props.major}.{props.minor}",
        memory_gib=round(props.total_memory / 2**30, 1),
        multiprocessors=props.multi_processor_count,
        bf16_supported=torch.cuda.is_bf16_supported(),
    )
from packaging.requirements import Requirement
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
packages, unmet = {}, []
for spec in project["dependencies"]:
    req = Requirement(spec)
    try:
        version = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        version = None
    packages[req.name] = version
    if version is None or not req.specifier.contains(version, prereleases=True):
        unmet.append(f"{spec} (found {version})")
info["packages"] = packages
info["pins_unmet"] = unmet
print("GPU_CHECK_RESULT " + json.dumps(info))
"""

IMPORTS_PROBE = r"""
import importlib, json, pkgutil
names, failed, missing = [], {}, {}
for package in ("shared", "trainer", "service", "benchmarks"):
    module = importlib.import_module(package)
    names += [m.name for m in pkgutil.walk_packages(module.__path__, package + ".")
              if not m.name.endswith("__main__")]
for name in names:
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed[name] = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, ModuleNotFoundError) and exc.name:
            missing[name] = exc.name.split(".")[0]
print("GPU_CHECK_RESULT " + json.dumps({"modules": len(names), "failed": failed,
                                        "missing": missing}))
"""


def stage_environment(ctx: Context) -> dict[str, Any]:
    entry: dict[str, Any] = {"nvidia_smi": nvidia_smi()}
    outcome = ctx.run([ctx.python, "-c", ENVIRONMENT_PROBE], 90)
    info = marked_result(outcome)
    if info is None:
        return {**_status(outcome, False), **entry, **outcome.to_dict()}
    entry.update(info)
    ctx.cuda = bool(info["cuda_available"])
    # For the record, not a failure: what pip finds unmet among the installed distributions,
    # the wheels' own requirements against the interpreter's packages included.
    entry["pip_check"] = ctx.run([ctx.python, "-m", "pip", "check"], 60).tail[-20:]
    if not ctx.cuda and not ctx.allow_cpu:
        entry["error"] = (
            f"CUDA is not available: torch {info['torch']} sees no GPU "
            f"(nvidia-smi: {entry['nvidia_smi'].get('error') or 'answered'}); "
            "--allow-cpu (GPU_CHECK_ALLOW_CPU=1) rehearses every stage on the CPU"
        )
        return {"ok": False, "status": "failed", **entry}
    return {"ok": True, "status": "passed", **entry}


def nvidia_smi() -> dict[str, Any]:
    """The GPUs as ``nvidia-smi`` lists them, or why it could not."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"error": "nvidia-smi not found"}
    fields = "name,driver_version,memory.total,memory.used,clocks.max.sm,power.limit"
    try:
        out = subprocess.run(
            [exe, f"--query-gpu={fields}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip()[-300:] or f"exit {out.returncode}"}
    keys = fields.split(",")
    gpus = [
        dict(zip(keys, (v.strip() for v in row.split(",")), strict=False))
        for row in out.stdout.strip().splitlines()
    ]
    return {"gpus": gpus}


def stage_imports(ctx: Context) -> dict[str, Any]:
    outcome = ctx.run([ctx.python, "-c", IMPORTS_PROBE], 120)
    found = marked_result(outcome)
    if found is None:
        return {**_status(outcome, False), **outcome.to_dict()}
    required = {
        m: e for m, e in found["failed"].items() if found["missing"].get(m) not in OPTIONAL_MODULES
    }
    entry = {
        "modules": found["modules"],
        "failed": required,
        "optional_missing": sorted(set(found["failed"]) - set(required)),
    }
    if required:
        entry["error"] = f"{len(required)} module(s) do not import: " + "; ".join(
            f"{m}: {e}" for m, e in list(required.items())[:5]
        )
    return {**_status(outcome, not required), **entry}


# ----- tests, training, inference ----------------------------------------------------------


def gpu_test_files(tests: Path) -> list[Path]:
    """Test files that hold ``@pytest.mark.gpu`` tests."""
    return sorted(p for p in tests.rglob("test_*.py") if "pytest.mark.gpu" in p.read_text())


def junit_summary(path: Path) -> dict[str, Any]:
    """Counts, and the failed and skipped tests with their messages, from a JUnit XML file."""
    root = ET.parse(path).getroot()
    failed, skipped, passed = {}, {}, []
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        problem = case.find("failure")
        problem = problem if problem is not None else case.find("error")
        skip = case.find("skipped")
        if problem is not None:
            failed[name] = (problem.get("message") or problem.text or "")[:400]
        elif skip is not None:
            skipped[name] = (skip.get("message") or "")[:200]
        else:
            passed.append(name)
    return {
        "tests": len(passed) + len(failed) + len(skipped),
        "passed": len(passed),
        "failed": failed,
        "skipped": skipped,
    }


def stage_gpu_tests(ctx: Context) -> dict[str, Any]:
    files = gpu_test_files(REPO / "tests")
    if not files:
        return {"ok": False, "status": "failed", "error": "no test file holds a gpu-marked test"}
    xml = ctx.work / "gpu_tests.xml"
    xml.unlink(missing_ok=True)
    cmd = [ctx.python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    cmd += [f"--junitxml={xml}", *(str(f.relative_to(REPO)) for f in files)]
    outcome = ctx.run(cmd, ctx.limits["gpu_tests"])
    entry: dict[str, Any] = {"files": [str(f.relative_to(REPO)) for f in files]}
    if xml.is_file():
        entry.update(junit_summary(xml))
    ok = outcome.returncode == 0 and xml.is_file()
    if ok and ctx.cuda and entry["passed"] == 0:
        ok, entry["error"] = False, "every gpu test was skipped although CUDA is available"
    elif entry.get("failed"):
        entry["error"] = f"{len(entry['failed'])} gpu test(s) failed: " + ", ".join(entry["failed"])
    return {**_status(outcome, ok), **entry, **outcome.to_dict()}


DONE_LINE = re.compile(
    r"done: (?P<epochs>\d+) epoch\(s\), (?P<steps>\d+) steps, (?P<minutes>[\d.]+) min of "
    r"training at (?P<images_per_s>[\d.]+) img/s"
)


def training_summary(run_dir: Path) -> dict[str, Any]:
    """Steps, epochs and images/s from the run's log, and the test split's scores."""
    entry: dict[str, Any] = {"run_dir": str(run_dir)}
    log = run_dir / "train.log"
    if log.is_file():
        text = log.read_text(errors="replace")
        done = list(DONE_LINE.finditer(text))
        if done:
            entry.update({k: float(v) for k, v in done[-1].groupdict().items()})
        entry["epoch_lines"] = [line for line in text.splitlines() if "epoch " in line][-5:]
    metrics = run_dir / "test_metrics.json"
    if metrics.is_file():
        test = json.loads(metrics.read_text())
        entry["test"] = {
            "miou": test.get("miou"),
            "iou": {c["name"]: c["iou"] for c in test.get("per_class", [])},
            "pixel_accuracy": test.get("pixel_accuracy"),
            "precision": test.get("precision"),
            "device": test.get("device"),
            "images_per_s": test.get("images_per_s"),
        }
    return entry


def rehearsal_data(source: Path, dest: Path) -> Path:
    """The first few image/mask pairs of each split of ``source`` (:data:`CPU_TILES`), copied
    to ``dest``: the CPU rehearsal's dataset."""
    shutil.rmtree(dest, ignore_errors=True)
    for split, count in CPU_TILES.items():
        if not (source / split).is_dir():
            continue
        masks = {p.stem: p for p in (source / split / "MASKS").iterdir()}
        images = sorted(p for p in (source / split / "IMAGES").iterdir() if p.stem in masks)
        for kind in ("IMAGES", "MASKS"):
            (dest / split / kind).mkdir(parents=True)
        for image in images[:count]:
            shutil.copy2(image, dest / split / "IMAGES" / image.name)
            shutil.copy2(masks[image.stem], dest / split / "MASKS" / masks[image.stem].name)
    return dest


def stage_train(ctx: Context) -> dict[str, Any]:
    run_dir = ctx.work / "train-resnet50"
    data = ctx.data if ctx.cuda else rehearsal_data(ctx.data, ctx.work / "rehearsal-data")
    cmd = [ctx.python, "-m", "trainer.fit", "--config", "trainer/config.yaml"]
    cmd += [
        f"data.root={data}",
        f"out_dir={ctx.work}",
        f"run_name={run_dir.name}",
        "overwrite=true",
        f"train.device={'cuda' if ctx.cuda else 'cpu'}",
        f"train.max_minutes={ctx.train_minutes:g}",
        "log.progress=lines",
    ]
    if not ctx.cuda:
        cmd += CPU_TRAIN_OVERRIDES
    cmd += ctx.train_overrides
    outcome = ctx.run(cmd, ctx.limits["train"])
    entry = {"command": " ".join(cmd[1:]), **training_summary(run_dir)}
    ok = outcome.returncode == 0 and "test" in entry
    if outcome.returncode == 0 and not ok:
        entry["error"] = f"no test_metrics.json in {run_dir}"
    ctx.checkpoint = next(
        (p for p in (run_dir / "best.pt", run_dir / "last.pt") if p.is_file()), None
    )
    return {**_status(outcome, ok), **entry, **outcome.to_dict()}


def stage_inference(ctx: Context) -> dict[str, Any]:
    out = ctx.work / "inference.json"
    out.unlink(missing_ok=True)
    cmd = [ctx.python, "-m", "benchmarks.inference", "--quick", "--skip-candidates"]
    # The CPU peer runtimes (ONNX Runtime, OpenVINO) are not what a GPU check measures, and on a
    # machine that has them installed they would spend the CUDA section's time.
    cmd += ["--skip-scaling", "--skip-service", "--skip-peers", "--json", str(out)]
    if ctx.checkpoint is not None:
        cmd += ["--checkpoint", str(ctx.checkpoint)]
    if ctx.cuda:
        cmd += ["--cuda-batches", ctx.cuda_batches]
    if not ctx.cuda:
        cmd += CPU_INFERENCE_ARGS
    outcome = ctx.run(cmd, ctx.limits["inference"])
    entry: dict[str, Any] = {
        "command": " ".join(cmd[1:]),
        "checkpoint": str(ctx.checkpoint) if ctx.checkpoint else "random init (no training)",
    }
    if out.is_file():
        entry["result"] = json.loads(out.read_text())
    ok = outcome.returncode == 0 and "result" in entry
    if ok and ctx.cuda and "cuda" not in entry["result"]:
        ok, entry["error"] = False, "the benchmark wrote no cuda section"
    return {**_status(outcome, ok), **entry, **outcome.to_dict()}


# ----- the check -----------------------------------------------------------------------------


@dataclass
class Context:
    """What the stages share: where things are, the time left, what earlier stages found."""

    python: str
    out: Path
    work: Path
    data: Path
    site: Path
    wheelhouse: Path | None
    train_minutes: float
    train_overrides: list[str]
    cuda_batches: str
    allow_cpu: bool
    deadline: float
    log: TextIO
    limits: dict[str, float]
    cuda: bool = False
    checkpoint: Path | None = None

    def run(self, cmd: Sequence[str], limit_s: float) -> Outcome:
        """``cmd`` under ``limit_s``, cut to the time left in the whole check's budget."""
        left = self.deadline - time.monotonic()
        env = child_env(self.site, cuda=self.cuda)
        return run_logged(cmd, limit_s=min(limit_s, left), env=env, log=self.log)


def _status(outcome: Outcome, ok: bool) -> dict[str, Any]:
    if outcome.timed_out:
        return {"ok": False, "status": "timeout", "error": "stopped at its time limit"}
    entry: dict[str, Any] = {"ok": ok, "status": "passed" if ok else "failed"}
    if not ok:
        entry["error"] = f"exit code {outcome.returncode}: " + (
            outcome.tail[-1] if outcome.tail else ""
        )
    return entry


STAGES: tuple[tuple[str, Callable[[Context], dict[str, Any]]], ...] = (
    ("wheels", stage_wheels),
    ("environment", stage_environment),
    ("imports", stage_imports),
    ("gpu_tests", stage_gpu_tests),
    ("train", stage_train),
    ("inference", stage_inference),
)


def summarize(stages: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The numbers a reader looks for first, lifted out of the stages."""
    env, train = stages.get("environment", {}), stages.get("train", {})
    tests = stages.get("gpu_tests", {})
    inference = stages.get("inference", {}).get("result", {})
    cuda = inference.get("cuda", {})
    summary: dict[str, Any] = {
        "device": env.get("device_name") or ("cpu" if env else None),
        "torch": env.get("torch"),
        "gpu_tests": (
            f"{tests['passed']} passed, {len(tests['failed'])} failed, "
            f"{len(tests['skipped'])} skipped"
            if "passed" in tests
            else None
        ),
        "train_steps": train.get("steps"),
        "train_images_per_s": train.get("images_per_s"),
        "test_iou": train.get("test", {}).get("iou"),
        "test_miou": train.get("test", {}).get("miou"),
        "engine_images_per_s": {r["batch"]: r["images_per_s"] for r in cuda.get("rows", [])},
        "compiled_images_per_s": {
            r["batch"]: r["images_per_s"] for r in cuda.get("compiled", {}).get("rows", [])
        },
        "cuda_precision": cuda.get("precision"),
    }
    return summary


def _num(value: Any, digits: int = 3) -> str:
    return (
        "-" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)
    )


def markdown(report: dict[str, Any]) -> str:
    """A RESULTS.md section from a ``gpu_check.json``: the machine, each stage's outcome, the
    training's numbers and the inference tables."""
    stages = report.get("stages", {})
    env, train = stages.get("environment", {}), stages.get("train", {})
    inference = stages.get("inference", {}).get("result", {})
    gpu = (env.get("nvidia_smi", {}).get("gpus") or [{}])[0]
    lines = [
        f"### CUDA, measured {report.get('started_utc', '?')[:10]} with `benchmarks/gpu_check.sh`",
        "",
        f"Machine: {env.get('device_name', '?')} ({_num(env.get('memory_gib'))} GiB, "
        f"{env.get('multiprocessors', '?')} SMs, driver {gpu.get('driver_version', '?')}), "
        f"{env.get('cpu_count', '?')} CPUs; Python {env.get('python', '?')}, torch "
        f"{env.get('torch', '?')} (CUDA {env.get('torch_cuda', '?')}, "
        f"cuDNN {env.get('cudnn', '?')}). "
        f"Budget {_num(report.get('budget_s'))} s, wall {_num(report.get('wall_s'))} s.",
        "",
        "| stage | status | seconds | note |",
        "|---|---|---|---|",
    ]
    for name, entry in stages.items():
        note = str(entry.get("error") or "").replace("|", "/")[:120]
        lines.append(f"| {name} | {entry.get('status')} | {_num(entry.get('seconds'))} | {note} |")
    summary = report.get("summary", {})
    if train.get("test"):
        iou = train["test"]["iou"]
        overrides = report.get("train_overrides") or []
        compiled = _compiles(overrides)
        lines += [
            "",
            "Training (`trainer/config.yaml`"
            + "".join(f" `{o}`" for o in overrides)
            + f", {_num(report.get('train_minutes'))} min budget"
            + (", torch.compile time inside it): " if compiled else ", not compiled): ")
            + f"{_num(train.get('steps'))} steps, {_num(train.get('epochs'))} epochs, "
            f"{_num(train.get('images_per_s'))} images/s; test split "
            + ", ".join(f"{k} {_num(v)}" for k, v in iou.items())
            + f", mIoU {_num(train['test'].get('miou'))} "
            f"({train['test'].get('precision')}, {_num(train['test'].get('images_per_s'))} "
            "images/s evaluated).",
        ]
    if summary.get("gpu_tests"):
        lines += ["", f"gpu tests: {summary['gpu_tests']}."]
    cuda = inference.get("cuda")
    if inference:
        base = inference.get("baseline", {})
        lines += [
            "",
            "| path | batch | images/s | median s/batch |",
            "|---|---|---|---|",
            f"| baseline: {base.get('what', '?')} (CPU) | 1 | {_num(base.get('images_per_s'))} | "
            f"{_num(base.get('median_s'))} |",
        ]
        engine = inference.get("engine", {})
        for r in engine.get("rows", []):
            lines.append(
                f"| engine ({engine.get('precision')}, {engine.get('device')}) | {r['batch']} | "
                f"{_num(r['images_per_s'])} | {_num(r.get('median_s'))} |"
            )
        for label, section in (
            ("cuda eager", cuda or {}),
            ("cuda compiled", (cuda or {}).get("compiled", {})),
        ):
            for r in section.get("rows", []):
                lines.append(
                    f"| {label} ({(cuda or {}).get('precision')}) | {r['batch']} | "
                    f"{_num(r['images_per_s'])} | {_num(r.get('median_s'))} |"
                )
        if cuda:
            compiled = cuda.get("compiled", {})
            lines += [
                "",
                f"Pixel agreement with the fp32 baseline: engine "
                f"{_num(inference.get('pixel_agreement'), 5)}, cuda eager "
                f"{_num(cuda.get('pixel_agreement'), 5)}, compiled "
                f"{_num(compiled.get('pixel_agreement'), 5)}; peak GPU memory "
                f"{_num(cuda.get('peak_memory_mib'), 4)} MiB."
                + (f" Compilation failed: {compiled['error']}" if "error" in compiled else ""),
            ]
    return "\n".join(lines) + "\n"


def _compiles(overrides: Sequence[str]) -> bool:
    """Whether the full recipe (``train.compile: true``) still compiles under these overrides;
    the last ``train.compile`` override wins, as in ``trainer.fit``."""
    value = "true"
    for override in overrides:
        key, _, text = override.partition("=")
        if key.strip() == "train.compile":
            value = text.strip().lower()
    return value not in ("false", "no", "off", "0")


def write_report(path: Path, report: dict[str, Any]) -> None:
    # Rewritten after every stage: a reader (or a killed check) sees one whole report or another.
    atomic_write_bytes(path, (json.dumps(report, indent=2, default=str) + "\n").encode())


def check(args: argparse.Namespace) -> int:
    out, work = args.out, args.work
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    json_path = out / "gpu_check.json"
    start = time.monotonic()
    report: dict[str, Any] = {
        "check": "benchmarks/gpu_check.sh",
        "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "budget_s": args.budget_s,
        "train_minutes": args.train_minutes,
        "train_overrides": list(args.train_override),
        "mode": None,
        "stages": {},
    }
    with open(out / "gpu_check.log", "a", encoding="utf-8") as log:
        ctx = Context(
            python=args.python,
            out=out,
            work=work,
            data=args.data,
            site=args.site,
            wheelhouse=args.wheelhouse,
            train_minutes=args.train_minutes,
            train_overrides=list(args.train_override),
            cuda_batches=args.cuda_batches,
            allow_cpu=args.allow_cpu,
            deadline=start + args.budget_s,
            log=log,
            limits={
                "gpu_tests": args.tests_limit_s,
                "train": args.train_minutes * 60 + args.train_overhead_s,
                "inference": args.inference_limit_s,
            },
        )
        stages: dict[str, dict[str, Any]] = report["stages"]
        for name, stage in STAGES:
            print(f"\n== gpu_check: {name}", flush=True)
            log.write(f"\n== {name}\n")
            t0 = time.monotonic()
            if time.monotonic() >= ctx.deadline:
                entry = {"ok": False, "status": "not run", "error": "the check's budget is spent"}
            else:
                try:
                    entry = stage(ctx)
                except Exception as exc:  # one broken stage must not lose the others
                    entry = {
                        "ok": False,
                        "status": "failed",
                        "error": f"{type(exc).__name__}: {exc}",
                    }
            entry.setdefault("seconds", round(time.monotonic() - t0, 2))
            stages[name] = entry
            report["mode"] = (
                "cuda" if ctx.cuda else ("cpu rehearsal" if ctx.allow_cpu else "no cuda")
            )
            report["summary"] = summarize(stages)
            report["wall_s"] = round(time.monotonic() - start, 1)
            write_report(json_path, report)
            print(
                f"== gpu_check: {name} {entry['status']} in {entry['seconds']:.0f} s"
                + (f": {entry['error']}" if entry.get("error") else ""),
                flush=True,
            )
            if name == "environment" and not entry["ok"]:
                break  # no CUDA (or no torch): nothing after this can run as meant
    failed = [n for n, e in stages.items() if not e["ok"]]
    report.update(
        ok=not failed and len(stages) == len(STAGES),
        failed=failed,
        finished_utc=datetime.now(UTC).isoformat(timespec="seconds"),
        wall_s=round(time.monotonic() - start, 1),
    )
    write_report(json_path, report)
    verdict = "all stages passed" if report["ok"] else "failed: " + ", ".join(failed)
    print(f"\nwrote {json_path}: {verdict}")
    print(json.dumps(report["summary"], indent=1))
    if "environment" in failed and not ctx.cuda:
        return 2
    return 0 if report["ok"] else 1


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/gpu_check.sh",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    default_out = os.environ.get("OUT") or str(REPO / "runs" / "gpu-check")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(default_out),
        help="folder of gpu_check.json and gpu_check.log (default $OUT, else runs/gpu-check)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="folder of the training run and scratch files (default <out>/work, "
        "or a temporary folder when <out> is $OUT)",
    )
    parser.add_argument("--data", type=Path, default=REPO / "data" / "bluemarble")
    parser.add_argument("--python", default=sys.executable, help="interpreter the stages run")
    parser.add_argument(
        "--wheelhouse",
        default=os.environ.get("WHEELHOUSE", "wheelhouse/cuda"),
        help="wheels to install (WHEELHOUSE; empty: install nothing)",
    )
    parser.add_argument(
        "--site",
        type=Path,
        default=Path(os.environ.get("GPU_CHECK_SITE", "/tmp/satseg-site")),
        help="where the wheels are installed (GPU_CHECK_SITE)",
    )
    parser.add_argument("--budget-s", type=float, default=480.0, help="the whole check's limit")
    parser.add_argument("--train-minutes", type=float, default=3.0)
    parser.add_argument(
        "--train-overhead-s",
        type=float,
        default=75.0,
        help="start-up and test evaluation beyond --train-minutes",
    )
    parser.add_argument(
        "--train-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra trainer.fit override (repeatable)",
    )
    parser.add_argument("--tests-limit-s", type=float, default=120.0)
    parser.add_argument(
        "--cuda-batches",
        default="1,8",
        help="batch sizes of the CUDA inference benchmark; each costs one torch.compile",
    )
    parser.add_argument("--inference-limit-s", type=float, default=240.0)
    parser.add_argument(
        "--allow-cpu",
        action="store_true",
        default=_flag("GPU_CHECK_ALLOW_CPU"),
        help="without CUDA, rehearse every stage shrunk on the CPU (GPU_CHECK_ALLOW_CPU=1)",
    )
    args = parser.parse_args(argv)
    wheelhouse = args.wheelhouse.strip()
    args.wheelhouse = (REPO / wheelhouse) if wheelhouse else None
    if args.work is None:
        args.work = (
            Path("/tmp/satseg-gpu-check")
            if os.environ.get("OUT") == str(args.out)
            else args.out / "work"
        )
    return args


def print_rendered(argv: Sequence[str], render: Callable[[dict[str, Any]], str], usage: str) -> int:
    """``OPTION report.json``: print ``render`` of the JSON report (exit code 0), or say what
    is wrong (2)."""
    if len(argv) != 2:
        print(f"usage: {usage}", file=sys.stderr)
        return 2
    try:
        print(render(json.loads(Path(argv[1]).read_text())), end="")
    except (OSError, ValueError) as err:
        print(f"error: {argv[1]}: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--markdown"]:  # --markdown gpu_check.json: print a RESULTS.md section
        usage = "benchmarks/gpu_check.sh --markdown gpu_check.json"
        return print_rendered(argv, markdown, usage)
    return check(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
