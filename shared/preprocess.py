"""Normalisation and the eval transform: the one preset used by training-time validation,
``trainer.evaluate`` and the service, so a model is always scored on what it will be served.

Images stay uint8 until they are on their device: a uint8 batch is a quarter of the bytes of a
float32 one to copy host -> GPU, and normalising there is one fused pass.

Which statistics: 8-bit red, green, blue keeps the ImageNet mean and std its pretrained weights
were trained with. Every other band list (more bands, 16-bit, float) is standardised per band
with the mean and std of the training split, nodata pixels excluded (:class:`BandStatistics`,
``python -m trainer.prepare stats``), stored in :data:`STATS_FILE` and in the checkpoint.
Mean/std rather than percentile ranges: it is what the pretrained layers assume (zero mean, unit
variance inputs), it streams exactly in one pass, and percentile clipping was not measured to be
better here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.bands import SUPPORTED_DTYPES, BandSpec

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# 8-bit values are divided by this before the ImageNet mean and std apply.
UINT8_SCALE = 255.0
# Written by ``python -m trainer.prepare stats DIR`` into DIR.
STATS_FILE = "band_stats.json"


@dataclass(frozen=True)
class Normalization:
    """Per-band ``(x / scale - mean) / std``.

    The default is ImageNet's RGB statistics on the 0..1 scale (``scale`` 255). Statistics
    measured on a dataset are in the bands' own units, with ``scale`` 1.
    """

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    scale: float = UINT8_SCALE

    def __post_init__(self) -> None:
        for name in ("mean", "std"):
            values = getattr(self, name)
            try:
                floats = tuple(float(v) for v in values)
            except (TypeError, ValueError):
                raise ValueError(
                    f"normalization {name} must be numbers, one per band, got {values!r}"
                ) from None
            if not floats or not all(math.isfinite(v) for v in floats):
                raise ValueError(
                    f"normalization {name} must be finite numbers, one per band, got {values!r}"
                )
            object.__setattr__(self, name, floats)
        if len(self.mean) != len(self.std):
            raise ValueError(f"normalization has {len(self.mean)} means but {len(self.std)} stds")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"normalization std must be positive, got {self.std}")
        try:
            scale = float(self.scale)
        except (TypeError, ValueError):
            raise ValueError(f"normalization scale must be a number, got {self.scale!r}") from None
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"normalization scale must be positive, got {self.scale!r}")
        object.__setattr__(self, "scale", scale)

    @property
    def channels(self) -> int:
        return len(self.mean)

    def to_dict(self) -> dict:
        """``{"mean": [...], "std": [...], "scale": s}`` (plain floats; safe in checkpoints)."""
        return {"mean": list(self.mean), "std": list(self.std), "scale": self.scale}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalization:
        """Inverse of :meth:`to_dict`; missing keys take the ImageNet defaults (scale 255).

        Raises:
            ValueError: unknown keys, or values that are not finite numbers (std > 0), one
                per band.
        """
        if not isinstance(data, dict):
            raise ValueError(f"normalization must be a mapping, got {type(data).__name__}")
        unknown = set(data) - {"mean", "std", "scale"}
        if unknown:
            raise ValueError(f"unknown normalization keys {sorted(unknown)}")
        return cls(
            mean=tuple(data.get("mean", IMAGENET_MEAN)),  # type: ignore[arg-type]
            std=tuple(data.get("std", IMAGENET_STD)),  # type: ignore[arg-type]
            scale=data.get("scale", UINT8_SCALE),
        )


@dataclass
class BandStatistics:
    """Per-band count, mean and sum of squared deviations, merged one image at a time.

    Images are merged with Chan et al.'s pairwise update in float64, so a split of 16-bit
    scenes gives the same mean and std as one pass over all its valid pixels, without the
    cancellation of sum-of-squares formulas.
    """

    count: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    m2: np.ndarray = field(default_factory=lambda: np.zeros(0))
    minimum: np.ndarray = field(default_factory=lambda: np.zeros(0))
    maximum: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def update(self, data: np.ndarray, nodata: np.ndarray | None = None) -> None:
        """Add the valid pixels of ``(C, H, W)`` ``data``; ``nodata`` is ``(H, W)`` bool."""
        data = np.asarray(data)
        if data.ndim != 3:
            raise ValueError(f"data must be (C, H, W), got shape {data.shape}")
        bands = data.shape[0]
        if self.count.size == 0:
            self.count = np.zeros(bands, dtype=np.int64)
            self.mean, self.m2 = np.zeros(bands), np.zeros(bands)
            self.minimum, self.maximum = np.full(bands, np.inf), np.full(bands, -np.inf)
        elif bands != self.count.size:
            raise ValueError(f"data has {bands} bands, earlier images had {self.count.size}")
        valid = data.reshape(bands, -1)
        if nodata is not None:
            if nodata.shape != data.shape[1:]:
                raise ValueError(f"nodata mask {nodata.shape} does not match {data.shape[1:]}")
            valid = valid[:, ~nodata.reshape(-1)]
        n = valid.shape[1]
        if n == 0:
            return
        values = valid.astype(np.float64)
        mean = values.mean(axis=1)
        m2 = ((values - mean[:, None]) ** 2).sum(axis=1)
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total
        self.minimum = np.minimum(self.minimum, values.min(axis=1))
        self.maximum = np.maximum(self.maximum, values.max(axis=1))

    def normalization(self, names: Sequence[str] | None = None) -> Normalization:
        """Mean and (population) std per band, in the bands' units (``scale`` 1).

        Raises:
            ValueError: no valid pixel was seen, or a band is constant (its std is 0); the
                message names the band.
        """
        if self.count.size == 0 or not self.count.all():
            raise ValueError("no valid (non-nodata) pixels to compute band statistics from")
        std = np.sqrt(self.m2 / self.count)
        for i, value in enumerate(std):
            if not value > 0:
                name = names[i] if names is not None else f"band {i + 1}"
                raise ValueError(
                    f"{name} is constant ({self.mean[i]:g}) over every valid pixel: it carries "
                    "no information; leave it out of data.bands"
                )
        return Normalization(mean=tuple(self.mean), std=tuple(std), scale=1.0)


def normalization_for(spec: BandSpec, measured: Normalization | None) -> Normalization:
    """The normalisation a model over ``spec`` uses: ImageNet for 8-bit RGB, else ``measured``.

    Raises:
        ValueError: a band list other than 8-bit RGB without measured statistics, or
            statistics for another number of bands.
    """
    if spec.is_rgb8():
        return Normalization()
    if measured is None:
        raise ValueError(
            f"bands {', '.join(spec.names)} ({spec.dtype}) need per-band statistics: run "
            "python -m trainer.prepare stats DATASET"
        )
    if measured.channels != spec.count:
        raise ValueError(
            f"band statistics hold {measured.channels} bands but the model reads {spec.count} "
            f"({', '.join(spec.names)})"
        )
    return measured


def save_stats(
    path: str | Path, spec: BandSpec, stats: BandStatistics, *, split: str, files: int
) -> Normalization:
    """Write the statistics of ``spec``'s bands to ``path`` (JSON) and return them."""
    norm = stats.normalization(spec.names)
    payload = {
        "split": split,
        "files": files,
        "bands": spec.to_dict(),
        "valid_pixels": [int(c) for c in stats.count],
        "minimum": [float(v) for v in stats.minimum],
        "maximum": [float(v) for v in stats.maximum],
        "normalization": norm.to_dict(),
    }
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")
    return norm


def load_stats(path: str | Path, spec: BandSpec | None = None) -> Normalization:
    """Read a :data:`STATS_FILE`; with ``spec``, check it was measured on the same bands.

    Raises:
        ValueError: unreadable file, malformed contents, or other bands than ``spec``'s; the
            message names the file.
    """
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
        norm = Normalization.from_dict(payload["normalization"])
        measured = BandSpec.from_dict(payload["bands"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"band statistics file {path} is unreadable: {exc}") from None
    if spec is not None and (measured.indexes, measured.names) != (spec.indexes, spec.names):
        raise ValueError(
            f"band statistics file {path} was measured on bands "
            f"{', '.join(measured.names)}, not {', '.join(spec.names)}: rerun "
            "python -m trainer.prepare stats"
        )
    return norm


_BATCH_DTYPES = frozenset(getattr(torch, name) for name in SUPPORTED_DTYPES)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """``(H, W, B)`` array -> ``(B, H, W)`` tensor of the same dtype (uint8, uint16, int16,
    float32).

    The result is a permuted view sharing memory with ``image`` when the array is writable
    (read-only arrays are copied once, as torch cannot share them safely).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.dtype.name not in SUPPORTED_DTYPES:
        raise ValueError(
            f"image must be (H, W, bands) of {', '.join(SUPPORTED_DTYPES)}, "
            f"got {image.shape} {image.dtype}"
        )
    if not image.flags.writeable:
        image = image.copy()
    return torch.from_numpy(image).permute(2, 0, 1)


def normalize(
    batch: torch.Tensor, norm: Normalization, nodata: torch.Tensor | None = None
) -> torch.Tensor:
    """``(N, B, H, W)`` on any device -> float32 ``(x / scale - mean) / std`` on that device.

    ``batch`` holds the bands as read (uint8, uint16, int16 or float32). ``nodata``, an
    ``(N, H, W)`` bool tensor, sets those pixels to 0 in every band, the training mean, so
    fill values (0, -9999, 65535) do not reach the model as extreme inputs. The memory format
    of ``batch`` (e.g. channels_last) is kept.
    """
    if batch.ndim != 4 or batch.shape[1] != norm.channels or batch.dtype not in _BATCH_DTYPES:
        raise ValueError(
            f"batch must be (N, {norm.channels}, H, W) of "
            f"{', '.join(SUPPORTED_DTYPES)}, got {tuple(batch.shape)} {batch.dtype}"
        )
    # (x/k - m)/s == (x - km) / (ks): two in-place ops on the one float copy.
    shape = (1, norm.channels, 1, 1)
    mean = torch.tensor(norm.mean, dtype=torch.float32, device=batch.device).view(shape)
    std = torch.tensor(norm.std, dtype=torch.float32, device=batch.device).view(shape)
    out = batch.to(torch.float32)
    out = out.sub_(mean * norm.scale).div_(std * norm.scale)
    if nodata is not None:
        if nodata.shape != (batch.shape[0], *batch.shape[2:]):
            raise ValueError(
                f"nodata must be (N, H, W) = {(batch.shape[0], *batch.shape[2:])}, "
                f"got {tuple(nodata.shape)}"
            )
        out.masked_fill_(nodata.to(out.device, torch.bool).unsqueeze(1), 0.0)
    return out
