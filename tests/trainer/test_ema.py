from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer.ema import ModelEma


def test_average_moves_towards_the_weights_by_the_warmed_up_decay() -> None:
    model = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    nn.init.zeros_(model[0].weight)
    ema = ModelEma(model, decay=0.99)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[1].running_mean.fill_(5.0)
    ema.update(model, step=1)
    # d = min(0.99, 2 / 11): the average moves 9/11 of the way.
    assert torch.allclose(ema.module[0].weight, torch.full((1, 2), 9 / 11))
    assert ema.module[1].running_mean.item() == 5.0  # buffers are copied
    for _ in range(2000):
        ema.update(model, step=10_000)
    assert torch.allclose(ema.module[0].weight, torch.ones(1, 2), atol=1e-6)
    assert not ema.module.training
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_decay_must_be_a_fraction() -> None:
    with pytest.raises(ValueError, match="decay"):
        ModelEma(nn.Linear(1, 1), decay=1.0)
