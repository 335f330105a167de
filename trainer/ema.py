"""Exponential moving average of a model's weights, the model that is validated and saved.

Averaging the weights of the last few hundred steps smooths out the noise of single small
batches; in short runs it scores more steadily than the raw weights of the final step.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma:
    """``module``: an eval-mode copy of the model whose weights trail the training weights.

    After optimiser step ``step`` (1-based) each parameter moves towards the trained one by
    ``1 - d`` with ``d = min(decay, (1 + step) / (10 + step))``: early on, while the weights
    change fast, the average forgets quickly; later it averages about ``1 / (1 - decay)``
    steps. Buffers (BatchNorm running statistics) are copied, as they are averages already.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1.0 + step) / (10.0 + step))
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - d)
        for ema_buffer, buffer in zip(self.module.buffers(), model.buffers(), strict=True):
            ema_buffer.copy_(buffer)
