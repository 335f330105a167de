"""Learning-rate schedule: linear warm-up, then poly or cosine decay (or constant).

Progress through the run is the larger of two fractions: optimiser steps over the planned
steps, and elapsed time over the time budget (when there is one). A run limited by
``train.max_minutes`` therefore reaches ``min_lr`` as its time runs out, whatever the speed
of the machine.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer


def lr_at(
    step: int,
    progress: float,
    *,
    base_lr: float,
    warmup_steps: int = 0,
    kind: str = "poly",
    power: float = 0.9,
    min_lr: float = 0.0,
) -> float:
    """Learning rate for optimiser step ``step`` (0-based) at ``progress`` in [0, 1].

    Warm-up ramps linearly from ``base_lr / warmup_steps`` to ``base_lr`` over the first
    ``warmup_steps`` steps; afterwards ``poly``: ``min + (base - min) * (1 - p) ** power``,
    ``cosine``: ``min + (base - min) * (1 + cos(pi * p)) / 2``, ``constant``: ``base``.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    p = min(max(progress, 0.0), 1.0)
    if kind == "constant":
        return base_lr
    if kind == "poly":
        return min_lr + (base_lr - min_lr) * (1.0 - p) ** power
    if kind == "cosine":
        return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))
    raise ValueError(f"unknown schedule {kind!r}; expected poly, cosine or constant")


class LRSchedule:
    """Sets the optimiser's learning rate before each step; its state is the step count.

    ``total_steps`` is the planned number of optimiser steps (epochs x steps per epoch);
    ``budget_s`` the time budget in seconds or None.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        base_lr: float,
        total_steps: int,
        warmup_steps: int = 0,
        kind: str = "poly",
        power: float = 0.9,
        min_lr: float = 0.0,
        budget_s: float | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.base_lr = base_lr
        self.total_steps = max(1, total_steps)
        self.warmup_steps = warmup_steps
        self.kind = kind
        self.power = power
        self.min_lr = min_lr
        self.budget_s = budget_s
        self.step_count = 0
        self.last_lr = base_lr

    def progress(self, elapsed_s: float) -> float:
        """Fraction of the run done: steps over planned steps, or time over budget if larger."""
        p = self.step_count / self.total_steps
        if self.budget_s:
            p = max(p, elapsed_s / self.budget_s)
        return min(p, 1.0)

    def apply(self, elapsed_s: float = 0.0) -> float:
        """Set the rate for the coming step on every parameter group; returns it."""
        lr = lr_at(
            self.step_count,
            self.progress(elapsed_s),
            base_lr=self.base_lr,
            warmup_steps=self.warmup_steps,
            kind=self.kind,
            power=self.power,
            min_lr=self.min_lr,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.last_lr = lr
        return lr

    def step(self) -> None:
        """Count one optimiser step."""
        self.step_count += 1

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "last_lr": self.last_lr}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.last_lr = float(state["last_lr"])
