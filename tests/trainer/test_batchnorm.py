from __future__ import annotations

import torch
from torch import nn

from trainer.batchnorm import recompute_statistics


def _identity_then_batchnorm() -> nn.Sequential:
    conv = nn.Conv2d(1, 1, 1, bias=False)
    nn.init.ones_(conv.weight)
    return nn.Sequential(conv, nn.BatchNorm2d(1, momentum=0.1))


def test_statistics_are_the_equal_weight_average_of_the_first_batches() -> None:
    model = _identity_then_batchnorm().eval()
    with torch.no_grad():
        model[1].running_mean.fill_(50.0)  # stale statistics, as copied from other weights
        model[1].running_var.fill_(9.0)
    # Batch means 1 and 3, each with variance 0; the third batch is past the limit.
    batches = [torch.full((2, 1, 4, 4), value) for value in (1.0, 3.0, 100.0)]
    used = recompute_statistics(model, iter(batches), limit=2)
    assert used == 2
    bn = model[1]
    assert bn.running_mean.item() == 2.0  # not 1.9 or 2.6: a plain average, not momentum 0.1
    assert bn.running_var.item() == 0.0
    assert bn.num_batches_tracked.item() == 2
    assert bn.momentum == 0.1  # restored for training
    assert not model.training  # the eval-mode copy stays in eval mode


def test_fewer_batches_than_the_limit_are_all_used() -> None:
    model = _identity_then_batchnorm().train()
    used = recompute_statistics(model, iter([torch.full((2, 1, 2, 2), 4.0)]), limit=36)
    assert used == 1
    assert model[1].running_mean.item() == 4.0
    assert model.training
