"""Normalisation and the eval transform: the one preset used by training-time validation,
``trainer.evaluate`` and the service, so a model is always scored on what it will be served.

Images stay uint8 until they are on their device: a uint8 batch is a quarter of the bytes of a
float32 one to copy host -> GPU, and normalising there is one fused pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Normalization:
    """Per-channel RGB mean and std on the 0..1 scale (ImageNet statistics by default)."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        for name in ("mean", "std"):
            values = getattr(self, name)
            try:
                floats = tuple(float(v) for v in values)
            except (TypeError, ValueError):
                raise ValueError(
                    f"normalization {name} must be 3 numbers, got {values!r}"
                ) from None
            if len(floats) != 3 or not all(math.isfinite(v) for v in floats):
                raise ValueError(f"normalization {name} must be 3 finite numbers, got {values!r}")
            object.__setattr__(self, name, floats)
        if any(s <= 0 for s in self.std):
            raise ValueError(f"normalization std must be positive, got {self.std}")

    def to_dict(self) -> dict:
        """``{"mean": [r, g, b], "std": [r, g, b]}`` (plain floats; safe in checkpoints)."""
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalization:
        """Inverse of :meth:`to_dict`; missing keys take the ImageNet defaults.

        Raises:
            ValueError: unknown keys or values that are not 3 finite numbers (std > 0).
        """
        if not isinstance(data, dict):
            raise ValueError(f"normalization must be a mapping, got {type(data).__name__}")
        unknown = set(data) - {"mean", "std"}
        if unknown:
            raise ValueError(f"unknown normalization keys {sorted(unknown)}")
        return cls(
            mean=tuple(data.get("mean", IMAGENET_MEAN)),  # type: ignore[arg-type]
            std=tuple(data.get("std", IMAGENET_STD)),  # type: ignore[arg-type]
        )


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 -> ``(3, H, W)`` uint8 tensor.

    The result is a permuted view sharing memory with ``image`` when the array is writable
    (read-only arrays are copied once, as torch cannot share them safely).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if not image.flags.writeable:
        image = image.copy()
    return torch.from_numpy(image).permute(2, 0, 1)


def normalize(batch: torch.Tensor, norm: Normalization) -> torch.Tensor:
    """``(N, 3, H, W)`` uint8 on any device -> float32 ``(x / 255 - mean) / std`` on that device.

    The memory format of ``batch`` (e.g. channels_last) is kept.
    """
    if batch.ndim != 4 or batch.shape[1] != 3 or batch.dtype != torch.uint8:
        raise ValueError(
            f"batch must be (N, 3, H, W) uint8, got {tuple(batch.shape)} {batch.dtype}"
        )
    # (x/255 - m)/s == (x - 255m) / (255s): two in-place ops on the one float copy.
    mean = torch.tensor(norm.mean, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(norm.std, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    out = batch.to(torch.float32)
    return out.sub_(mean * 255.0).div_(std * 255.0)


def preprocess(image: np.ndarray, norm: Normalization) -> torch.Tensor:
    """The eval transform: ``(H, W, 3)`` uint8 RGB -> ``(1, 3, H, W)`` float32 normalised.

    No resizing: the model is fully convolutional and tiling handles large scenes.
    """
    return normalize(image_to_tensor(image).unsqueeze(0), norm)
