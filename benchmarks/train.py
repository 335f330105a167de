"""Training benchmark: the trainer's real step against a plain fp32 eager loop, same run.

    python -m benchmarks.train [--quick] [--json PATH] [--config YAML] [key.path=value ...]

Both loops train the same architecture on the same data (the trainer's dataset and
augmentations, from ``data.root``) at the same batch size and crop size:

- **trainer**: the run wired by trainer.fit's own ``build_run``, running its
  ``train_one_epoch`` -- DataLoader workers, autocast (bf16/fp16), channels_last, the configured
  loss, accumulation, gradient clipping, schedule and EMA (the thread tuner is off by default,
  ``train.adapt_threads=false``, so both loops run on the same threads);
- **plain**: what a first PyTorch loop looks like: ``DataLoader(num_workers=0)``, fp32, NCHW,
  cross-entropy, Adam.

Each reports images/s over the timed steps (after warm-up steps) and the share of wall time
spent waiting for the next batch (time blocked in the loader's ``__next__``). The JSON holds
``trainer_over_plain`` and ``data_wait_share`` for both, and the machine.
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from benchmarks.common import REPO, describe, machine, markdown_table, write_json
from shared.inference import resolve_device
from shared.labels import DEFAULT_LABEL_MAPPING, LabelMap
from shared.model import build_model
from shared.preprocess import Normalization, normalize
from trainer import distributed
from trainer.build import build_run, load_data
from trainer.config import Config, load_config
from trainer.data import collate
from trainer.fit import train_one_epoch
from trainer.logging_utils import close_logging
from trainer.run import Run

DEFAULT_CONFIG = REPO / "trainer" / "configs" / "quickstart.yaml"
TARGET = {"trainer_over_plain": 1.5}


class TimedLoader:
    """Wraps a DataLoader and adds up the time spent waiting for each batch."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.wait_s = 0.0
        self.batches = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.wait_s += time.perf_counter() - start
            self.batches += 1
            yield batch


def build_trainer_run(cfg: Config, workdir: Path) -> Run:
    """The run exactly as ``python -m trainer.fit`` wires it (:func:`trainer.build.build_run`),
    in a scratch folder and without a time budget: the benchmark times a fixed step count."""
    cfg = copy.deepcopy(cfg)
    cfg.out_dir, cfg.run_name, cfg.overwrite = str(workdir), "bench", True
    cfg.train.max_minutes = None
    cfg.train.resume = None
    run = build_run(cfg, distributed.setup(resolve_device(cfg.train.device)))
    logging.getLogger("trainer").setLevel(logging.WARNING)
    return run


def run_trainer(
    cfg: Config, warmup: int, steps: int, workdir: Path, *, profile_step: bool = False
) -> dict[str, Any]:
    """Images/s and data-wait share of ``train_one_epoch`` over ``steps`` steps; with
    ``profile_step``, one more step under ``torch.profiler`` (its top operators, as text)."""
    run = build_trainer_run(cfg, workdir)
    timed = TimedLoader(run.loaders.train)
    run.loaders.train = timed  # type: ignore[assignment]
    device = run.info.device

    def train_until(total_steps: int) -> None:
        run.cfg.train.max_steps = total_steps
        while run.state.step < total_steps:
            train_one_epoch(run)

    train_until(warmup)  # worker start-up, allocator, first kernels
    _sync(device)
    timed.wait_s, timed.batches = 0.0, 0
    start = time.perf_counter()
    train_until(warmup + steps)
    _sync(device)
    wall = time.perf_counter() - start
    images = steps * cfg.train.batch_size * cfg.train.accumulate
    profile_table = None
    if profile_step:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities) as prof:
            train_until(warmup + steps + 1)
            _sync(device)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        profile_table = prof.key_averages().table(sort_by=sort, row_limit=12)
    what = (
        f"trainer.fit.train_one_epoch: {run.precision}, channels_last "
        f"{cfg.train.channels_last}, {cfg.data.num_workers} loader worker(s), "
        f"loss {cfg.train.loss}, compile {cfg.train.compile}"
    )
    return _result(what, run.precision, device, steps, images, wall, timed.wait_s) | {
        "profile": profile_table
    }


def run_plain(cfg: Config, warmup: int, steps: int) -> dict[str, Any]:
    """A plain loop on the trainer's own training dataset: fp32, NCHW, no workers, CE, Adam."""
    device = resolve_device(cfg.train.device)
    info = distributed.setup(device)
    label_map = LabelMap.load(cfg.data.label_map or DEFAULT_LABEL_MAPPING)
    dataset = load_data(cfg, label_map, info).train.dataset
    loader = DataLoader(
        dataset, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True, collate_fn=collate
    )
    timed = TimedLoader(loader)
    model = build_model(cfg.model.backbone, num_classes=label_map.num_classes).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    loss_fn = nn.CrossEntropyLoss(ignore_index=label_map.ignore_index)
    norm = Normalization()

    def train(count: int) -> None:
        done = 0
        while done < count:
            for images, masks in timed:
                x = normalize(images.to(device), norm)
                loss = loss_fn(model(x)["out"], masks.to(device).long())
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                done += 1
                if done == count:
                    return

    train(warmup)
    _sync(device)
    timed.wait_s = 0.0
    start = time.perf_counter()
    train(steps)
    _sync(device)
    wall = time.perf_counter() - start
    what = "plain loop: fp32, NCHW, DataLoader(num_workers=0), cross-entropy, Adam"
    return _result(what, "fp32", device, steps, steps * cfg.train.batch_size, wall, timed.wait_s)


def _result(
    what: str,
    precision: str,
    device: torch.device,
    steps: int,
    images: int,
    wall: float,
    wait_s: float,
) -> dict[str, Any]:
    """One measured loop: its throughput and the share of time spent waiting for data."""
    return {
        "what": what,
        "precision": precision,
        "device": str(device),
        "steps": steps,
        "images": images,
        "seconds": wall,
        "images_per_s": images / wall,
        "data_wait_s": wait_s,
        "data_wait_share": wait_s / wall,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    quick = args.quick
    warmup = args.warmup if args.warmup is not None else (1 if quick else 3)
    steps = args.steps or (3 if quick else 20)
    overrides = [
        "eval.enabled=false",
        "log.tensorboard=false",
        "train.adapt_threads=false",
        *args.overrides,
    ]
    cfg = load_config(args.config, overrides)
    cfg.log.progress = "off"  # type: ignore[assignment]  # no bar inside a benchmark
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)  # both loops, and the machine record

    info = machine()
    print(f"# training benchmark ({'quick' if quick else 'full'})\n{describe(info)}\n", flush=True)
    result: dict[str, Any] = {
        "machine": info,
        "quick": quick,
        "config": str(args.config),
        "overrides": overrides,
        "backbone": cfg.model.backbone,
        "batch_size": cfg.train.batch_size,
        "image_size": cfg.data.image_size,
        "warmup_steps": warmup,
        "targets": TARGET,
    }
    # The CPU always (the target is set there); the GPU too when there is one, unless the
    # config pins a device.
    devices = [cfg.train.device] if cfg.train.device not in ("auto", "cpu") else ["cpu"]
    if cfg.train.device == "auto" and torch.cuda.is_available() and not args.skip_cuda:
        devices.append("cuda")
    for device in devices:
        cfg.train.device = device
        section = run_device(cfg, warmup, steps, profile_step=args.profile or not quick)
        if device == devices[0]:
            result.update(section)
        else:
            result["cuda"] = section
        print(_table(cfg, section, args.profile), flush=True)
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


def run_device(cfg: Config, warmup: int, steps: int, *, profile_step: bool) -> dict[str, Any]:
    """Both loops on ``cfg.train.device``, and their ratio."""
    with tempfile.TemporaryDirectory(prefix="satseg-train-bench-") as workdir:
        try:
            trainer = run_trainer(cfg, warmup, steps, Path(workdir), profile_step=profile_step)
        finally:
            close_logging()  # the run's log file is about to be deleted with its folder
    plain = run_plain(cfg, warmup, steps)
    return {
        "trainer": trainer,
        "plain": plain,
        "trainer_over_plain": trainer["images_per_s"] / plain["images_per_s"],
        "data_wait_share": trainer["data_wait_share"],
    }


def _table(cfg: Config, section: dict[str, Any], show_profile: bool) -> str:
    rows = [
        [name, r["precision"], r["device"], r["steps"], r["images_per_s"], r["data_wait_share"]]
        for name, r in (("trainer step", section["trainer"]), ("plain fp32 loop", section["plain"]))
    ]
    headers = ["loop", "precision", "device", "timed steps", "images/s", "data wait share"]
    text = markdown_table(headers, rows)
    ratio = section["trainer_over_plain"]
    met = ratio >= TARGET["trainer_over_plain"]
    profile = section["trainer"]["profile"]
    if profile and (show_profile or not met):
        text += "\n\none trainer step under torch.profiler:\n" + profile
    return text + (
        f"\n\n{cfg.model.backbone}, batch {cfg.train.batch_size}, {cfg.data.image_size}px "
        f"crops, {cfg.train.device}: trainer_over_plain {ratio:.2f} (target >= "
        f"{TARGET['trainer_over_plain']}) {'met' if met else 'NOT met'}; trainer data wait "
        f"{section['data_wait_share']:.1%}\n"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few steps only")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="trainer YAML (default: quickstart)"
    )
    parser.add_argument("--steps", type=int, help="timed optimiser steps per loop")
    parser.add_argument("--warmup", type=int, help="untimed steps first")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table")
    parser.add_argument("--skip-cuda", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value")
    return parser.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    raise SystemExit(main())
