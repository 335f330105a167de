"""BatchNorm statistics recomputed for the weights that are validated and saved (precise BN).

The weight average (:mod:`trainer.ema`) copies its BatchNorm running statistics from the
training weights, whose statistics are themselves a momentum average over the last few batches
of weights that kept changing. Neither belongs to the averaged weights, and in a short run the
mismatch moves the rare classes' logits: with the copied statistics, the quick recipe's saved
models called whole semi-enclosed seas lake in some runs and not in others. Recomputing the
statistics with the saved weights, over the training crops they were trained on, takes that
chance out of the result (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021;
``torch.optim.swa_utils.update_bn`` does the pass).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.optim.swa_utils import update_bn


def recompute_statistics(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    limit: int,
    seed: int = 0,
    autocast: torch.dtype | None = None,
) -> int:
    """Reset ``model``'s BatchNorm running statistics and set them to the equal-weight average
    over up to ``limit`` input ``batches`` (normalised, on the model's device), run under
    ``autocast`` as training ran. The model's train/eval mode is kept. Returns the batches
    used.

    The pass runs in training mode, dropout included, as the statistics were gathered in
    training; its random numbers come from ``seed`` in a forked generator, so the pass is
    reproducible and the training that follows draws the same numbers with or without it."""
    used = 0

    def counted() -> Iterator[torch.Tensor]:
        nonlocal used
        for batch in itertools.islice(batches, limit):
            used += 1
            yield batch

    device = next(model.parameters()).device
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            update_bn(counted(), model)
    return used
