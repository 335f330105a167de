"""A tiny synthetic dataset in the workshop layout, and the settings of a tiny training run."""

from __future__ import annotations

import functools
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

import trainer.build
from shared.labels import LabelMap
from trainer import distributed
from trainer.build import build_run
from trainer.config import Config
from trainer.fit import train_epochs
from trainer.run import Run
from trainer.threads import ThreadTuner

# Distinct colours per class so an image says what its mask holds (and a model can learn it).
CLASS_RGB = np.array([[20, 60, 170], [90, 160, 30], [0, 220, 250]], dtype=np.uint8)


def synthetic_pair(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(image (size,size,3) uint8, mask (size,size) uint8): ocean with a land block and, in
    about half the tiles, a lake; the image is the class colour plus a little noise."""
    mask = np.zeros((size, size), dtype=np.uint8)
    y0, x0 = rng.integers(0, size // 2, 2)
    h, w = rng.integers(size // 4, size // 2, 2)
    mask[y0 : y0 + h, x0 : x0 + w] = 1
    if rng.random() < 0.5:
        ly, lx = rng.integers(0, size - size // 8, 2)
        mask[ly : ly + size // 8, lx : lx + size // 8] = 2
    noise = rng.integers(-10, 11, (size, size, 3))
    image = np.clip(CLASS_RGB[mask].astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return image, mask


def make_dataset(
    root: Path, *, n_train: int = 12, n_test: int = 2, size: int = 64, seed: int = 0
) -> Path:
    """Write ``root/TAIN_VAL_SET`` and ``root/TEST_SET`` with PNG images and index masks."""
    rng = np.random.default_rng(seed)
    for split, count in (("TAIN_VAL_SET", n_train), ("TEST_SET", n_test)):
        (root / split / "IMAGES").mkdir(parents=True)
        (root / split / "MASKS").mkdir(parents=True)
        for i in range(count):
            image, mask = synthetic_pair(rng, size)
            Image.fromarray(image).save(root / split / "IMAGES" / f"tile{i:03d}.png")
            Image.fromarray(mask, mode="L").save(root / split / "MASKS" / f"tile{i:03d}.png")
    return root


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data")


@pytest.fixture
def lm() -> LabelMap:
    return LabelMap.load()


def tiny_overrides(data: Path, out: Path, **extra: object) -> list[str]:
    """Overrides for a seconds-long CPU run: MobileNetV3 at 32x32 crops, 2 steps, fp32."""
    values: dict[str, object] = {
        "data.root": str(data),
        "data.image_size": 32,
        "data.num_workers": 0,
        "data.val_fraction": 0.25,
        "model.backbone": "mobilenet_v3_large",
        "model.weights": "none",
        "train.epochs": 1,
        "train.batch_size": 2,
        "train.max_steps": 2,
        "train.precision": "fp32",
        "train.device": "cpu",
        "train.threads": 1,
        "train.log_every": 1,
        "eval.tile": 64,
        "eval.overlap": 16,
        "log.tensorboard": False,
        "log.progress": "lines",
        "out_dir": str(out),
        "run_name": "run",
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={_yaml(v)}" for k, v in values.items()]


def _yaml(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def train_in_process(
    cfg: Config, seconds_per_step: float, *, planned_steps: int | None = None
) -> tuple[Run, list[tuple[int, float, int | None]]]:
    """Build and train the run for ``cfg`` on the CPU with a clock that advances
    ``seconds_per_step`` per optimiser step: the time budget and the thread tuner then see the
    same times in every run, whatever the machine's speed.

    The thread tuner (``train.adapt_threads``) decides as in a real run, but torch's thread
    count stays as it is: two threads on a machine shared with other work are slow, and the
    decisions are what a test compares.

    ``planned_steps`` replaces the steps the learning rate decays over: a run cut short by
    ``train.max_steps`` plans its decay to end there, where a run killed part-way (what a resume
    test stands for) had planned the whole run's.

    Returns the run and, for every optimiser step it took, (step, learning rate, the thread
    count the tuner had chosen or None).
    """
    quiet_tuner = functools.partial(ThreadTuner, set_threads=lambda count: None)
    with mock.patch.object(trainer.build, "ThreadTuner", quiet_tuner):
        run = build_run(cfg, distributed.setup(torch.device("cpu")))
    run.clock = lambda: run.state.step * seconds_per_step
    if planned_steps is not None:
        run.schedule.total_steps = planned_steps
    applied: list[tuple[int, float, int | None]] = []
    apply = run.schedule.apply

    def record(elapsed_s: float = 0.0) -> float:
        lr = apply(elapsed_s)
        applied.append((run.state.step, lr, run.threads.current if run.threads else None))
        return lr

    run.schedule.apply = record  # type: ignore[method-assign]
    train_epochs(run)
    run.board.close()
    return run, applied
