"""Helpers shared by the benchmarks: what machine ran them, timing, tables and JSON."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torchvision

from benchmarks.stats import percentile
from shared.cpu import cpu_flags, cpu_model

REPO = Path(__file__).resolve().parents[1]
# CPU features that decide which kernels run (int8 dot products, bf16, AMX tiles).
_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of repeated calls (warm-up calls excluded)."""

    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def p50(self) -> float:
        return percentile(self.seconds, 50)

    @property
    def p95(self) -> float:
        return percentile(self.seconds, 95)

    def to_dict(self) -> dict[str, Any]:
        return {
            "median_s": self.median,
            "p50_s": self.p50,
            "p95_s": self.p95,
            "min_s": min(self.seconds),
            "runs": len(self.seconds),
        }


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures the kernels and not their launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    fn: Callable[[], object], *, repeat: int, warmup: int = 1, device: torch.device | None = None
) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``repeat`` times timed (GPU-synchronised)."""
    if repeat < 1:
        raise ValueError(f"repeat must be positive, got {repeat}")
    device = device or torch.device("cpu")
    for _ in range(warmup):
        fn()
    synchronize(device)
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return Timing(tuple(seconds))


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    repeat: int,
    warmup: int = 1,
    device: torch.device | None = None,
) -> dict[str, Timing]:
    """Time several functions in turns (a, b, a, b, ...), so that a busy or throttling
    machine slows them alike and their ratio stays meaningful."""
    if repeat < 1:
        raise ValueError(f"repeat must be positive, got {repeat}")
    device = device or torch.device("cpu")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    return {name: Timing(tuple(values)) for name, values in seconds.items()}


def machine() -> dict[str, Any]:
    """Where and when a benchmark ran: CPU, cores, threads, load, memory, GPU, versions."""
    flags = cpu_flags()
    info: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": [f for f in _FLAGS if f in flags],
        "memory_gib": _memory_gib(),
        # A busy machine skews every number: record how busy it was.
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cuda": None,
        "git_commit": _git_commit(),
        "command": " ".join([Path(sys.executable).name, "-m", _module_name(), *sys.argv[1:]]),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["cuda"] = {
            "device": torch.cuda.get_device_name(0),
            "count": torch.cuda.device_count(),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "cuda_version": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }
    return info


def describe(info: dict[str, Any]) -> str:
    """One line naming the machine, for table captions."""
    gpu = f", GPU {info['cuda']['device']}" if info.get("cuda") else ", no GPU"
    load = info.get("load_average")
    busy = f", load average {load[0]:.1f}" if load else ""
    return (
        f"{info['cpu']} ({info['cpus_usable']} usable CPUs, {info['torch_threads']} torch "
        f"threads, {'/'.join(info['cpu_flags']) or 'no AVX'}){gpu}; torch {info['torch']}{busy}"
    )


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table; floats get 3 significant decimals."""

    def cell(value: object) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_random_checkpoint(path: str | Path, *, seed: int = 0) -> Path:
    """Save a random-initialised 3-class DeepLabV3-MobileNetV3-Large (the quick recipe's model)
    to ``path`` through :mod:`shared.checkpoint`, as the trainer saves its checkpoints: a model
    to time, or to run the paths around it, when no trained one is at hand. Same ``seed``, same
    weights."""
    from shared.checkpoint import build_checkpoint, save_checkpoint
    from shared.labels import LabelMap
    from shared.model import build_model
    from shared.preprocess import Normalization

    torch.manual_seed(seed)
    model = build_model("mobilenet_v3_large", num_classes=3, weights="none", aux_loss=False)
    payload = build_checkpoint(
        model,
        backbone="mobilenet_v3_large",
        aux_loss=False,
        label_map=LabelMap.load(),
        normalization=Normalization(),
        config={"model": {"backbone": "mobilenet_v3_large", "weights": "none"}, "epochs": 0},
        metrics={"val": {"miou": 0.0}},
    )
    save_checkpoint(payload, path)
    return Path(path)


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def _jsonable(value: object) -> object:
    if hasattr(value, "to_dict"):
        return value.to_dict()  # type: ignore[no-any-return]
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)  # type: ignore[arg-type]
    if isinstance(value, Path | torch.device | torch.dtype):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else Path(sys.argv[0]).stem
