"""One training run: its pieces, wired once by :func:`trainer.build.build_run`, and its state."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.bands import BandSpec
from shared.inference import Predictor
from shared.labels import LabelMap
from shared.precision import autocast_dtype
from shared.preprocess import Normalization
from trainer import distributed
from trainer.config import Config
from trainer.data import Loaders
from trainer.distributed import DistInfo
from trainer.ema import ModelEma
from trainer.logging_utils import Board
from trainer.losses import SegmentationLoss
from trainer.schedule import LRSchedule
from trainer.threads import ThreadTuner


@dataclass
class RunState:
    """Where training stands; saved in ``training_state`` so a resumed run continues exactly."""

    epoch: int = 0  # the epoch in progress (== epochs done when batches_done is 0)
    batches_done: int = 0  # batches of `epoch` already trained (mid-epoch checkpoints)
    step: int = 0  # optimiser steps so far
    elapsed_s: float = 0.0  # training wall time before this process started
    best_miou: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0  # epochs since the last improvement (early stopping)
    last_val: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    """Everything a training step, a validation pass and a checkpoint need."""

    cfg: Config
    info: DistInfo
    run_dir: Path
    label_map: LabelMap
    normalization: Normalization
    model: nn.Module  # the bare model (weights, checkpoints, validation)
    train_model: nn.Module  # what the forward runs: DDP and/or compiled wrapper of `model`
    criterion: SegmentationLoss
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    scaler: torch.amp.GradScaler
    loaders: Loaders
    precision: str
    predictor: Predictor
    board: Board
    state: RunState = field(default_factory=RunState)
    threads: ThreadTuner | None = None
    ema: ModelEma | None = None
    bands: BandSpec = field(default_factory=BandSpec.rgb)  # the model's input bands
    gsd_m: float | None = None  # the training data's metres per pixel, when georeferenced
    # The time source of the budget and the thread tuner, read when training progresses; a
    # resumed run reproduces a straight one exactly when both runs read the same times.
    clock: Callable[[], float] = time.monotonic
    started: float = 0.0
    # This process's training throughput (not counting validation and checkpoints).
    images_trained: int = 0
    train_seconds: float = 0.0

    @property
    def eval_model(self) -> nn.Module:
        """What is validated and saved: the weights' moving average, or the weights."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return autocast_dtype(self.precision)

    def elapsed(self) -> float:
        """Training wall time, including what earlier (interrupted) processes spent."""
        return self.state.elapsed_s + self.clock() - self.started

    def out_of_time(self) -> bool:
        """The time budget is spent; every rank agrees (their clocks differ slightly)."""
        budget = self.cfg.train.max_minutes
        if budget is None:
            return False
        return distributed.any_rank(self.elapsed() >= budget * 60.0, self.info.device)

    def out_of_steps(self) -> bool:
        cap = self.cfg.train.max_steps
        return cap is not None and self.state.step >= cap
