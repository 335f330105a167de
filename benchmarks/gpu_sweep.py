"""Several trainings at once on one GPU: candidate recipes x seeds, test scores in one JSON.

    python -m benchmarks.gpu_sweep --candidates FILE_OR_FOLDER [--seeds 42,7,1] [--parallel 4]
        [--budget-s 240] [--out DIR] [--allow-cpu]

A candidate is a line of a ``*.txt`` file (``NAME [--config PATH] key=value ...``; ``#`` starts
a comment) or a ``*.yaml`` config (named after the file). Lines without ``--config`` start from
``--base-config`` (the quick recipe). Each candidate runs once per seed (``train.seed``), unless
its line sets ``train.seed`` itself; runs start seed by seed, so a budget that runs out leaves
every candidate with its first seeds rather than some with none.

Each run gets its own run folder, ``train.device=cuda`` and an equal share of the CPUs (its
affinity, which its data-loading workers inherit). Runs still going when ``--budget-s`` is spent
are stopped. The JSON (``<out>/gpu_sweep.json``) holds each run's steps, images/s and test
IoUs, and per candidate the mean and standard deviation over its seeds; rewritten as runs end.
``<out>/gpu_sweep_runs.tar.gz`` holds each run's log, resolved config and test metrics.
Dependencies are installed from ``--wheelhouse`` as ``benchmarks/gpu_check.py`` does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from benchmarks.gpu_check import (
    REPO,
    child_env,
    install_wheels,
    print_rendered,
    run_logged,
    training_summary,
    write_report,
)

QUICK_RECIPE = "trainer/configs/quickstart.yaml"


@dataclass(frozen=True)
class Candidate:
    name: str
    config: str
    overrides: tuple[str, ...]


@dataclass
class Job:
    candidate: Candidate
    seed: int | None
    run_dir: Path
    proc: subprocess.Popen | None = None
    started: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.run_dir.name


def parse_line(line: str, base_config: str) -> Candidate | None:
    """``NAME [--config PATH] key=value ...`` -> Candidate; None for blank and comment lines."""
    tokens = shlex.split(line, comments=True)
    if not tokens:
        return None
    name, rest = tokens[0], tokens[1:]
    if "=" in name or name.startswith("-"):
        raise ValueError(f"candidate line must start with a name: {line.strip()!r}")
    config = base_config
    overrides: list[str] = []
    i = 0
    while i < len(rest):
        token = rest[i]
        if token == "--config" and i + 1 < len(rest):
            config, i = rest[i + 1], i + 2
            continue
        if token.startswith("--config="):
            config = token.split("=", 1)[1]
        elif "=" in token:
            overrides.append(token)
        else:
            raise ValueError(f"candidate {name}: {token!r} is not key=value")
        i += 1
    return Candidate(name, config, tuple(overrides))


def load_candidates(path: Path, base_config: str) -> list[Candidate]:
    """Candidates from a ``.txt`` file, a ``.yaml`` config, or a folder of them."""
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    found: list[Candidate] = []
    for file in files:
        if file.suffix in (".yaml", ".yml"):
            found.append(Candidate(file.stem, str(file), ()))
        elif file.suffix == ".txt" or file == path:
            for line in file.read_text().splitlines():
                candidate = parse_line(line, base_config)
                if candidate is not None:
                    found.append(candidate)
    names = [c.name for c in found]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"candidate names used twice: {', '.join(duplicates)}")
    if not found:
        raise ValueError(f"no candidates in {path} (*.txt lines or *.yaml configs)")
    return found


def plan(candidates: list[Candidate], seeds: list[int], work: Path) -> list[Job]:
    """One job per candidate and seed, seed-major; a candidate that sets train.seed runs once."""
    jobs: list[Job] = []
    for k, seed in enumerate(seeds):
        for c in candidates:
            fixed = any(o.startswith("train.seed=") for o in c.overrides)
            if fixed and k > 0:
                continue
            run = c.name if fixed else f"{c.name}-s{seed}"
            jobs.append(Job(c, None if fixed else seed, work / run))
    return jobs


def command(job: Job, args: argparse.Namespace) -> list[str]:
    c = job.candidate
    cmd = [args.python, "-m", "trainer.fit", "--config", c.config]
    cmd += [
        f"data.root={args.data}",
        f"out_dir={job.run_dir.parent}",
        f"run_name={job.run_dir.name}",
        "overwrite=true",
        f"train.device={'cpu' if args.allow_cpu else 'cuda'}",
        "log.progress=lines",
    ]
    if job.seed is not None:
        cmd.append(f"train.seed={job.seed}")
    return cmd + list(c.overrides)  # the candidate's own keys win


def check_plan(jobs: list[Job], args: argparse.Namespace) -> list[str]:
    """Each run's config resolved as ``trainer.fit`` would (unknown keys and bad values fail
    here, before any GPU time is spent); returns one line per run, or raises ValueError."""
    from trainer.config import ConfigError, load_config

    lines = []
    for job in jobs:
        cmd = command(job, args)
        try:
            cfg = load_config(job.candidate.config, cmd[5:])
        except ConfigError as err:
            raise ValueError(f"candidate {job.candidate.name}: {err}") from None
        t = cfg.train
        steps = "max_steps unset: time-bounded" if t.max_steps is None else f"{t.max_steps} steps"
        lines.append(
            f"{job.name}: {cfg.model.backbone}, {steps}, max_minutes {t.max_minutes}, "
            f"seed {t.seed}, batch {t.batch_size}, image_size {cfg.data.image_size}"
        )
    return lines


def cpu_slots(parallel: int) -> list[set[int]]:
    """The CPUs this process may use, split into ``parallel`` equal disjoint sets."""
    cpus = sorted(os.sched_getaffinity(0))
    share = max(1, len(cpus) // parallel)
    return [set(cpus[(i * share) % len(cpus) :][:share]) for i in range(parallel)]


def aggregate(jobs: list[Job]) -> dict[str, dict[str, Any]]:
    """Per candidate: how many runs scored, and mean/std of each test IoU, mIoU and steps."""
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(j.candidate.name for j in jobs):
        done = [j.result for j in jobs if j.candidate.name == name and "test" in j.result]
        values: dict[str, list[float]] = {}
        for r in done:
            for cls, iou in r["test"]["iou"].items():
                if iou is not None:
                    values.setdefault(f"{cls}_iou", []).append(iou)
            if r["test"]["miou"] is not None:
                values.setdefault("miou", []).append(r["test"]["miou"])
            for key in ("steps", "images_per_s", "minutes"):
                if r.get(key) is not None:
                    values.setdefault(key, []).append(r[key])
        entry: dict[str, Any] = {"runs_scored": len(done)}
        for key, v in values.items():
            entry[key] = {
                "mean": statistics.fmean(v),
                "std": statistics.stdev(v) if len(v) > 1 else None,
                "values": v,
            }
        out[name] = entry
    return out


def table(report: dict[str, Any]) -> str:
    """Markdown: per candidate, the scored seeds and mean +- std of each test IoU and steps."""

    def cell(entry: dict[str, Any] | None) -> str:
        if not entry:
            return "-"
        std = entry.get("std")
        return f"{entry['mean']:.3f}" + ("" if std is None else f" +- {std:.3f}")

    keys = ("ocean_iou", "land_iou", "lake_iou", "miou")
    lines = [
        "| candidate | seeds scored | ocean | land | lake | mIoU | steps | images/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in report.get("by_candidate", {}).items():
        steps, rate = entry.get("steps"), entry.get("images_per_s")
        cells = [name, str(entry["runs_scored"]), *(cell(entry.get(k)) for k in keys)]
        cells.append(f"{steps['mean']:.0f}" if steps else "-")
        cells.append(f"{rate['mean']:.1f}" if rate else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sweep(args: argparse.Namespace, candidates: list[Candidate]) -> int:
    out, work = args.out, args.work
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    deadline = start + args.budget_s
    json_path = out / "gpu_sweep.json"
    report: dict[str, Any] = {
        "sweep": "benchmarks/gpu_sweep.py",
        "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "budget_s": args.budget_s,
        "parallel": args.parallel,
        "seeds": args.seeds,
        "device": "cpu" if args.allow_cpu else "cuda",
    }
    with open(out / "gpu_sweep.log", "a", encoding="utf-8") as log:
        env = child_env(args.site, cuda=not args.allow_cpu)

        def run(cmd: list[str], limit: float):
            return run_logged(cmd, limit_s=limit, env=env, log=log)

        report["wheels"] = install_wheels(args.python, args.wheelhouse, args.site, run)
        jobs = plan(candidates, args.seeds, work)
        report["candidates"] = [c.__dict__ for c in candidates]
        slots = cpu_slots(args.parallel)
        free = list(range(args.parallel))
        queue, running = list(jobs), {}
        while (queue or running) and time.monotonic() < deadline:
            while queue and free:
                job, slot = queue.pop(0), free.pop(0)
                job.run_dir.mkdir(parents=True, exist_ok=True)
                cmd = command(job, args)
                job.result = {"command": " ".join(cmd[1:]), "cpus": sorted(slots[slot])}
                job.started = time.monotonic()
                with open(job.run_dir / "stdout.log", "w") as stdout:
                    job.proc = subprocess.Popen(
                        cmd,
                        cwd=REPO,
                        env=env,
                        stdout=stdout,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        preexec_fn=lambda cpus=slots[slot]: os.sched_setaffinity(0, cpus),
                    )
                running[job.name] = (job, slot)
                say(log, f"started {job.name} on cpus {sorted(slots[slot])}")
            time.sleep(1.0)
            for name, (job, slot) in list(running.items()):
                if job.proc is None or job.proc.poll() is None:
                    continue
                say(log, finish(job, job.proc.returncode, timed_out=False))
                del running[name]
                free.append(slot)
                report["runs"] = [j.result | {"name": j.name} for j in jobs]
                report["by_candidate"] = aggregate(jobs)
                write_report(json_path, report)
        stop_all([job for job, _ in running.values()])
        for job, _ in running.values():
            say(log, finish(job, None, timed_out=True))
        for job in queue:
            job.result = {"status": "not run", "error": "the sweep's budget was spent first"}
    report["runs"] = [j.result | {"name": j.name} for j in jobs]
    report["by_candidate"] = aggregate(jobs)
    report["wall_s"] = round(time.monotonic() - start, 1)
    report["finished_utc"] = datetime.now(UTC).isoformat(timespec="seconds")
    write_report(json_path, report)
    pack_runs(jobs, out / "gpu_sweep_runs.tar.gz")
    print(json.dumps(report["by_candidate"], indent=1, default=str))
    print(f"wrote {json_path}")
    scored = sum(1 for j in jobs if "test" in j.result)
    return 0 if scored == len(jobs) else 1


def stop_all(jobs: list[Job], grace_s: float = 10.0) -> None:
    """SIGTERM every job's process group at once, then SIGKILL what is left after ``grace_s``."""
    live = [j.proc for j in jobs if j.proc is not None and j.proc.poll() is None]
    for proc in live:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    end = time.monotonic() + grace_s
    for proc in live:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, end - time.monotonic()))
    for proc in live:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def say(log: TextIO, message: str) -> None:
    print(message, flush=True)
    log.write(message + "\n")
    log.flush()


def finish(job: Job, returncode: int | None, *, timed_out: bool) -> str:
    """Record how ``job`` ended, with its training summary; returns a one-line account."""
    seconds = time.monotonic() - job.started
    summary = training_summary(job.run_dir)
    ok = returncode == 0 and "test" in summary
    status = "timeout" if timed_out else ("passed" if ok else "failed")
    job.result.update(summary, status=status, returncode=returncode, seconds=round(seconds, 1))
    if timed_out:
        job.result["error"] = "stopped when the sweep's budget was spent"
    if not ok:
        log = job.run_dir / "stdout.log"
        lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
        job.result["log_tail"] = lines[-15:]
    return f"{status} {job.name} in {seconds:.0f} s"


def pack_runs(jobs: list[Job], path: Path) -> None:
    """Each run's logs, resolved config and test metrics (no checkpoints) in one archive."""
    with tarfile.open(path, "w:gz") as tar:
        for job in jobs:
            for name in ("stdout.log", "train.log", "config.yaml", "test_metrics.json"):
                file = job.run_dir / name
                if file.is_file():
                    tar.add(file, arcname=f"{job.name}/{name}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--candidates", type=Path, required=True)
    parser.add_argument("--base-config", default=QUICK_RECIPE)
    parser.add_argument("--seeds", default="42,7,1")
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--budget-s", type=float, default=240.0)
    default_out = os.environ.get("OUT") or str(REPO / "runs" / "gpu-sweep")
    parser.add_argument("--out", type=Path, default=Path(default_out))
    parser.add_argument("--work", type=Path, default=Path("/tmp/satseg-gpu-sweep"))
    parser.add_argument("--data", type=Path, default=REPO / "data" / "bluemarble")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--wheelhouse", default=os.environ.get("WHEELHOUSE", "wheelhouse/cuda"))
    parser.add_argument(
        "--site", type=Path, default=Path(os.environ.get("GPU_CHECK_SITE", "/tmp/satseg-site"))
    )
    parser.add_argument("--allow-cpu", action="store_true", help="train on the CPU (rehearsal)")
    parser.add_argument(
        "--check", action="store_true", help="resolve every run's config and list them; no training"
    )
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    wheelhouse = args.wheelhouse.strip()
    args.wheelhouse = (REPO / wheelhouse) if wheelhouse else None
    if args.parallel < 1:
        parser.error("--parallel must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--table"]:  # --table gpu_sweep.json: print the per-candidate table
        return print_rendered(argv, table, "python -m benchmarks.gpu_sweep --table gpu_sweep.json")
    args = parse_args(argv)
    try:
        candidates = load_candidates(args.candidates, args.base_config)
    except (OSError, ValueError) as err:
        print(f"error: {args.candidates}: {err}", file=sys.stderr)
        return 2
    if args.check:
        try:
            lines = check_plan(plan(candidates, args.seeds, args.work), args)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print("\n".join(lines) + f"\n{len(lines)} runs, {args.parallel} at a time")
        return 0
    return sweep(args, candidates)


if __name__ == "__main__":
    sys.exit(main())
