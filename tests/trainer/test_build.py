from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared.checkpoint import build_checkpoint, save_checkpoint
from shared.labels import LabelMap
from shared.model import build_model
from shared.preprocess import Normalization
from trainer.build import load_resume_checkpoint, make_criterion, make_schedule
from trainer.config import ConfigError, load_config

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


@pytest.mark.parametrize(
    ("backbone", "accepted"),
    [("mobilenet_v3_large_deeplabv3plus_s1_aspp160", True), ("mobilenet_v3_large", False)],
)
def test_resume_accepts_a_checkpoint_saved_under_the_old_id_of_its_backbone(
    tmp_path: Path, label_map: LabelMap, backbone: str, accepted: bool
) -> None:
    old = "mobilenet_v3_large_lean1"
    payload = build_checkpoint(
        build_model(old, num_classes=label_map.num_classes),
        backbone=old,
        aux_loss=False,
        label_map=label_map,
        normalization=Normalization(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
        config={},
    )
    payload["arch"]["backbone"] = old  # as the code before the rename saved it
    save_checkpoint(payload, tmp_path / "last.pt")
    cfg = load_config(None, [f"model.backbone={backbone}", f"train.resume={tmp_path / 'last.pt'}"])
    if accepted:
        assert load_resume_checkpoint(cfg)["arch"]["backbone"] == old
    else:
        with pytest.raises(ConfigError, match="checkpoint is mobilenet_v3_large_lean1"):
            load_resume_checkpoint(cfg)
