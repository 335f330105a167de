from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared.labels import LabelMap
from trainer.build import make_criterion, make_schedule
from trainer.config import load_config

QUICK_RECIPE = Path(__file__).resolve().parents[2] / "trainer" / "configs" / "quickstart.yaml"


def _schedule(*overrides: str):
    cfg = load_config(
        None,
        [
            "train.epochs=200",
            "train.lr=0.001",
            "train.min_lr=0.00001",
            "train.warmup_steps=0",
            "train.schedule=poly",
            *overrides,
        ],
    )
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    return make_schedule(optimizer, cfg, batches_per_epoch=36)


def test_a_run_ended_by_max_steps_decays_to_min_lr_at_its_last_step() -> None:
    schedule = _schedule("train.max_steps=10")
    for _ in range(9):
        schedule.step()
    # The 10th and last step: 1 - 9/10 of the way, poly 0.9, from 1e-3 towards 1e-5.
    assert schedule.apply() == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.1**0.9)
    schedule.step()
    assert schedule.apply() == pytest.approx(1e-5)


def test_without_max_steps_the_epochs_plan_the_decay() -> None:
    schedule = _schedule()
    for _ in range(9):
        schedule.step()
    # 9 of 200 x 36 planned steps done: the rate has barely moved.
    assert schedule.apply() == pytest.approx(1e-5 + (1e-3 - 1e-5) * (1 - 9 / 7200) ** 0.9)


def test_the_quick_recipe_scores_lovasz_per_crop() -> None:
    cfg = load_config(QUICK_RECIPE)
    criterion = make_criterion(cfg, LabelMap.load())
    assert criterion.terms == {"dice", "ce", "lovasz"} and criterion.lovasz_per_image
    pooled = make_criterion(load_config(None, ["train.loss=dice+ce+lovasz"]), LabelMap.load())
    assert not pooled.lovasz_per_image
