"""Segmentation losses: multiclass soft Dice, cross-entropy, Lovasz-softmax, and sums of them.

Shapes: logits (N,C,H,W) float, targets (N,H,W) integer class ids where ``ignore_index`` marks
pixels that carry no label (padding, unlabelled areas).
"""

from __future__ import annotations

import math
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


def lovasz_softmax_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = 255,
    per_image: bool = False,
) -> torch.Tensor:
    """Lovasz-softmax (Berman et al., 2018): the convex surrogate of 1 - IoU, per class, averaged
    over the classes present.

    logits (N,C,H,W), target (N,H,W) int64; ``ignore_index`` pixels are left out. By default all
    pixels of the batch form one set, as the IoU metric pools them. For each class the pixel
    errors ``|1{g = c} - p_c|`` are sorted in decreasing order and weighted by the gradient of
    the Lovasz extension of the Jaccard loss. Unlike Dice, the penalty of a missed pixel grows
    with how small the class is, which is what a class covering 0.1% of the pixels needs.

    ``per_image``: the loss of each image on its own, averaged over the images that hold a
    labelled pixel (Berman's ``per_image``). Pooled, a crop's few-pixel lake is a sliver of the
    batch's lake pixels when another crop holds a large lake; per image, missing it costs that
    crop's whole lake term.

    Every set and class is scored at once (one batched sort), with no value read back to the
    host: on CUDA the term never waits for the GPU. Computed in float32. Returns a scalar.
    """
    num_classes = logits.shape[1]
    probs = logits.float().softmax(dim=1).flatten(2)  # (sets, C, pixels)
    labels = target.flatten(1)
    if not per_image:  # the whole batch is one set of pixels
        probs = probs.transpose(0, 1).reshape(1, num_classes, -1)
        labels = labels.reshape(1, -1)
    valid = (labels != ignore_index).unsqueeze(1)
    classes = torch.arange(num_classes, device=labels.device).view(1, -1, 1)
    fg = ((labels.unsqueeze(1) == classes) & valid).to(probs.dtype)
    # An ignored pixel's error is 0: it sorts after every pixel that adds to the loss, so it
    # changes no weight that multiplies a non-zero error.
    errors = (fg - probs).abs() * valid
    errors_sorted, order = errors.sort(dim=-1, descending=True)
    fg_sorted = fg.gather(-1, order)
    gts = fg.sum(-1, keepdim=True)
    intersection = gts - fg_sorted.cumsum(-1)
    union = gts + (1.0 - fg_sorted).cumsum(-1)  # >= 1: never a division by zero
    jaccard = 1.0 - intersection / union
    jaccard_steps = torch.cat([jaccard[..., :1], jaccard.diff(dim=-1)], dim=-1)
    per_class = (errors_sorted * jaccard_steps).sum(-1)  # (sets, C)
    # As in soft_dice_loss: an absent class says nothing about its overlap.
    present = (gts.squeeze(-1) > 0).to(probs.dtype)
    per_set = (per_class * present).sum(-1) / present.sum(-1).clamp(min=1.0)
    labelled = present.amax(-1)  # sets with a labelled pixel; none: a zero still in the graph
    return (per_set * labelled).sum() / labelled.sum().clamp(min=1.0)


LOSSES = ("dice", "ce", "dice+ce", "lovasz", "ce+lovasz", "dice+ce+lovasz")


class SegmentationLoss(nn.Module):
    """A sum of ``dice``, ``ce`` and ``lovasz`` terms (one of :data:`LOSSES`) on the main
    output, plus ``aux_weight`` times the same on the auxiliary head when the model has one.

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
        lovasz_per_image: bool = False,
    ) -> None:
        super().__init__()
        if kind not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {kind!r}")
        if class_weights is not None and class_weights.shape != (num_classes,):
            raise ValueError(f"class_weights must have shape ({num_classes},)")
        self.kind = kind
        self.terms = set(kind.split("+"))
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.smooth = smooth
        self.aux_weight = aux_weight
        self.lovasz_per_image = lovasz_per_image
        self.register_buffer("class_weights", class_weights, persistent=False)

    def _single(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        parts: dict[str, torch.Tensor] = {}
        if "ce" in self.terms:
            ce = F.cross_entropy(
                logits.float(), target, weight=self.class_weights, ignore_index=self.ignore_index
            )
            # A batch of only ignored pixels gives 0/0 = nan; it carries no signal.
            parts["ce"] = torch.nan_to_num(ce, nan=0.0)
        if "dice" in self.terms:
            parts["dice"] = soft_dice_loss(
                logits,
                target,
                ignore_index=self.ignore_index,
                smooth=self.smooth,
                class_weights=self.class_weights,
            )
        if "lovasz" in self.terms:
            parts["lovasz"] = lovasz_softmax_loss(
                logits, target, ignore_index=self.ignore_index, per_image=self.lovasz_per_image
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


def logit_adjustment(weights: Mapping[str, float], names: list[str]) -> list[float] | None:
    """{"lake": 6.0} + ["ocean", "land", "lake"] -> [0, 0, -log 6]; None when no class is weighted.

    Weighting a class w times in cross-entropy moves the loss's optimum from p(c|x) to
    w * p(c|x) (normalised): the model learns to call a pixel lake where lake is only about
    1/(1+w) likely, which fattens every lake by its uncertain border. Subtracting log w from
    the class's logit at inference undoes that shift (Menon et al., "Long-tail learning via
    logit adjustment", ICLR 2021), keeping what the weight was for, a class the loss does
    not ignore while training.
    """
    if not weights:
        return None
    # 0.0 - log(1) is 0.0, where -log(1) would be -0.0 (printed so in /model).
    return [0.0 - math.log(float(weights.get(n, 1.0))) for n in names]
