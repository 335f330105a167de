"""DeepLabV3-shaped toy models whose right answers are known, for the optimised forward and its
int8 agreement gate: one whose int8 version keeps every class, inputs on which int8 costs one
class (lake) and nothing else; and BatchNorm statistics measured on images for random models."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

LAKE = 2


class Toy(nn.Module):
    """DeepLabV3's shape in miniature: backbone, a classifier whose [4] is the last 1x1 conv,
    an auxiliary head, and a dict output. Its answer is the argmax of the input channels."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU())
        self.classifier = nn.Sequential(*(nn.Identity() for _ in range(4)), nn.Conv2d(3, 3, 1))
        self.aux_classifier = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            for conv in (self.backbone[0], self.classifier[4]):
                conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
                conv.bias.zero_()
            # Eval BatchNorm: (x - 0.5) / 2 * 2 + 0.5 = x, but only once folded correctly.
            bn = self.backbone[1]
            bn.running_mean.fill_(0.5)
            bn.running_var.fill_(4.0 - bn.eps)
            bn.weight.fill_(2.0)
            bn.bias.fill_(0.5)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"out": self.classifier(self.backbone(x))}
        if self.aux_classifier is not None:  # as torchvision's DeepLabV3 does
            out["aux"] = self.aux_classifier(x)
        return out


def one_hot_images(n: int, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, size, size) inputs whose winning channel leads by at least 0.5, and its labels."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n, size, size), generator=gen)
    noise = torch.rand((n, 3, size, size), generator=gen) * 0.3
    x = nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float() * 0.8 + noise
    return x, labels


def lake_fragile_inputs(
    n: int = 4, size: int = 32, lakes_per_image: int = 4
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Calibration and check batches on which the :class:`Toy`'s int8 version loses lakes only.

    Calibration inputs span 0..8 in every channel, so int8 activations step by about 8/255 =
    0.03. In the check images ocean and land lead by 0.8 (they survive that step), while each
    lake pixel leads land by 0.001 (0.501 against 0.500): int8 rounds both to the same level,
    the tie goes to land, and every lake pixel is lost. Lakes are ``lakes_per_image`` pixels of
    ``size * size`` (0.4% with the defaults), so the share of pixels that agree stays above
    99.5% while the lake IoU between int8 and float32 is 0.
    """
    gen = torch.Generator().manual_seed(0)
    calibration = [torch.rand((n, 3, size, size), generator=gen) * 8.0]
    labels = torch.randint(0, 2, (n, size, size), generator=gen)  # ocean and land only
    x = nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float() * 0.8 + 0.1
    for i in range(n):
        for k in range(lakes_per_image):
            y, col = (3 + 7 * k) % size, (5 + 11 * k + i) % size
            x[i, :, y, col] = torch.tensor([0.0, 0.500, 0.501])
    return calibration, [x]


def measure_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Re-estimate every BatchNorm's statistics on ``batches`` (a plain average), as training
    leaves them, and return the model in eval mode.

    Straight from initialisation, DeepLabV3's default statistics shrink or flatten its feature
    maps (a random MobileNetV3's logits are about 1e-9): masks come out one class everywhere
    and half precision underflows. Measured statistics keep each layer at unit scale.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    return model.eval()
