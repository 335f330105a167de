"""Segmentation losses: multiclass soft Dice, cross-entropy, and their sum.

Shapes: logits (N,C,H,W) float, targets (N,H,W) integer class ids where ``ignore_index`` marks
pixels that carry no label (padding, unlabelled areas).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn


def soft_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = 255,
    smooth: float = 1.0,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """1 - mean per-class soft Dice over the batch, from softmax probabilities.

    logits (N,C,H,W), target (N,H,W) int64. Pixels equal to ``ignore_index`` are removed from
    both the probabilities and the one-hot target, so they change nothing. Each class's Dice is
    ``(2 * sum(p * g) + smooth) / (sum(p) + sum(g) + smooth)`` summed over all pixels of the batch.
    Classes absent from this batch's target are left out of the mean: a tile without lakes says
    nothing about lake overlap, and counting it would reward predicting no lake anywhere (the
    cross-entropy term still penalises false positives). ``class_weights`` (C,) weighs the mean.
    Computed in float32 whatever the autocast dtype. Returns a scalar.
    """
    num_classes = logits.shape[1]
    probs = logits.float().softmax(dim=1)
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    one_hot = F.one_hot(safe_target, num_classes).permute(0, 3, 1, 2).to(probs.dtype)
    mask = valid.unsqueeze(1).to(probs.dtype)
    probs = probs * mask
    one_hot = one_hot * mask
    dims = (0, 2, 3)
    intersection = (probs * one_hot).sum(dims)
    cardinality = probs.sum(dims) + one_hot.sum(dims)
    dice = (2.0 * intersection + smooth) / (cardinality + smooth)
    present = one_hot.sum(dims) > 0
    weights = present.to(probs.dtype)
    if class_weights is not None:
        weights = weights * class_weights.to(device=probs.device, dtype=probs.dtype)
    total = weights.sum()
    if total <= 0:
        # Nothing labelled in the batch: a zero that still belongs to the graph.
        return (probs * 0.0).sum()
    return ((1.0 - dice) * weights).sum() / total


class SegmentationLoss(nn.Module):
    """``dice``, ``ce`` or ``dice+ce`` on the main output, plus ``aux_weight`` times the same on
    the auxiliary head when the model has one.

    forward(outputs, target): outputs is the torchvision dict {"out": (N,C,H,W), "aux"?: ...} or a
    bare (N,C,H,W) tensor; target (N,H,W) int64. Returns (total, parts) where parts holds detached
    scalar tensors for logging (kept on device so logging does not force a sync every step).
    """

    def __init__(
        self,
        kind: str = "dice+ce",
        *,
        num_classes: int,
        ignore_index: int = 255,
        smooth: float = 1.0,
        class_weights: torch.Tensor | None = None,
        aux_weight: float = 0.4,
    ) -> None:
        super().__init__()
        if kind not in ("dice", "ce", "dice+ce"):
            raise ValueError(f"loss must be dice, ce or dice+ce, got {kind!r}")
        if class_weights is not None and class_weights.shape != (num_classes,):
            raise ValueError(f"class_weights must have shape ({num_classes},)")
        self.kind = kind
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.smooth = smooth
        self.aux_weight = aux_weight
        self.register_buffer("class_weights", class_weights, persistent=False)

    def _single(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        parts: dict[str, torch.Tensor] = {}
        if self.kind in ("ce", "dice+ce"):
            ce = F.cross_entropy(
                logits.float(), target, weight=self.class_weights, ignore_index=self.ignore_index
            )
            # A batch of only ignored pixels gives 0/0 = nan; it carries no signal.
            parts["ce"] = torch.nan_to_num(ce, nan=0.0)
        if self.kind in ("dice", "dice+ce"):
            parts["dice"] = soft_dice_loss(
                logits,
                target,
                ignore_index=self.ignore_index,
                smooth=self.smooth,
                class_weights=self.class_weights,
            )
        return parts

    def forward(
        self, outputs: Mapping[str, torch.Tensor] | torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        main = outputs if isinstance(outputs, torch.Tensor) else outputs["out"]
        parts = self._single(main, target)
        total = sum(parts.values())
        log = {k: v.detach() for k, v in parts.items()}
        aux = None if isinstance(outputs, torch.Tensor) else outputs.get("aux")
        if aux is not None and self.aux_weight > 0:
            aux_parts = self._single(aux, target)
            aux_total = sum(aux_parts.values())
            total = total + self.aux_weight * aux_total
            log["aux"] = aux_total.detach()
        log["total"] = total.detach()
        return total, log


def class_weight_tensor(weights: Mapping[str, float], names: list[str]) -> torch.Tensor | None:
    """{"lake": 5.0} + ["ocean", "land", "lake"] -> tensor([1., 1., 5.]); None when empty."""
    if not weights:
        return None
    return torch.tensor([float(weights.get(n, 1.0)) for n in names], dtype=torch.float32)
