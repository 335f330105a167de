"""Segmentation metrics: a confusion matrix, the scores derived from it, and boundary IoU.

Rows of the confusion matrix are the true class, columns the predicted class. Every score is
derived from its true positives, support (row sums) and predicted pixels (column sums), with one
zero-division policy: a ratio whose denominator is 0 is ``None`` (JSON ``null``), never 0 or 1,
and ``None`` values are left out of the means. In particular a class absent from both the truth
and the prediction has IoU ``None``; a class that was predicted but never present has IoU 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class ConfusionMatrix:
    """Accumulates a ``(C, C)`` int64 confusion matrix over batches.

    Args:
        num_classes: C; valid class ids are ``0..C-1``.
        ignore_index: target value whose pixels are not counted.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix: np.ndarray = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> None:
        """Count one batch.

        Args:
            pred: predicted class ids, any shape (e.g. ``(N, H, W)``), values in ``0..C-1``.
            target: true class ids, same shape; ``ignore_index`` pixels are skipped.

        Raises:
            ValueError: shapes differ, or ids outside ``0..C-1`` (named in the message).
        """
        p, t = _as_numpy(pred), _as_numpy(target)
        if p.shape != t.shape:
            raise ValueError(f"pred shape {p.shape} != target shape {t.shape}")
        keep = t != self.ignore_index
        p, t = p[keep].astype(np.int64, copy=False), t[keep].astype(np.int64, copy=False)
        _check_range(t, self.num_classes, "target")
        _check_range(p, self.num_classes, "pred")
        c = self.num_classes
        self.matrix += np.bincount(t * c + p, minlength=c * c).reshape(c, c)

    def merge(self, other: ConfusionMatrix) -> None:
        """Add another matrix's counts (e.g. from another worker)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes} classes into {self.num_classes}")
        self.matrix += other.matrix

    def reset(self) -> None:
        self.matrix[...] = 0


def scores(matrix: np.ndarray, class_names: Sequence[str]) -> dict:
    """Scores of a ``(C, C)`` confusion matrix (rows truth, columns prediction).

    Returns:
        ``{"pixel_accuracy", "miou", "mean_dice", "per_class": [{"id", "name", "iou", "dice",
        "precision", "recall", "support_pixels", "predicted_pixels"}, ...]}``. Ratios with a zero
        denominator are ``None``; ``miou``/``mean_dice`` average the non-``None`` values (``None``
        if there are none); ``pixel_accuracy`` is ``None`` for an empty matrix.
    """
    m = np.asarray(matrix, dtype=np.int64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {m.shape}")
    if len(class_names) != m.shape[0]:
        raise ValueError(f"{len(class_names)} class names for a {m.shape[0]}-class matrix")
    tp = np.diag(m)
    support = m.sum(axis=1)
    predicted = m.sum(axis=0)

    per_class = []
    for i, name in enumerate(class_names):
        t, s, p = int(tp[i]), int(support[i]), int(predicted[i])
        per_class.append(
            {
                "id": i,
                "name": str(name),
                "iou": _ratio(t, s + p - t),
                "dice": _ratio(2 * t, s + p),
                "precision": _ratio(t, p),
                "recall": _ratio(t, s),
                "support_pixels": s,
                "predicted_pixels": p,
            }
        )
    return {
        "pixel_accuracy": _ratio(int(tp.sum()), int(m.sum())),
        "miou": _mean([c["iou"] for c in per_class]),
        "mean_dice": _mean([c["dice"] for c in per_class]),
        "per_class": per_class,
    }


class BoundaryIoU:
    """Per-class IoU restricted to the pixels near each class's boundary.

    For a class c with binary masks P (prediction) and T (truth), the boundary band of a mask is
    its pixels within ``width`` px (chessboard distance) of a pixel outside it, i.e.
    ``M & ~erode(M, width)``. Boundary IoU is ``|Bp & Bt| / |Bp | Bt|``, with intersections and
    unions summed over every update. Pixels whose target is ``ignore_index`` are not counted and
    are neutral for erosion: the edge of an unlabelled area is no boundary, in the truth or in
    the prediction. Nor is the image edge (erosion pads by replication): a tile cut through the
    sea has no coastline at its edge, and counting one would reward every easy tile.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, width: int = 3) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.width = int(width)
        self.intersection = np.zeros(num_classes, dtype=np.int64)
        self.union = np.zeros(num_classes, dtype=np.int64)

    def update(self, pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> None:
        """Count one batch: ``(H, W)`` or ``(N, H, W)`` class ids, same shape."""
        p, t = _as_numpy(pred), _as_numpy(target)
        if p.shape != t.shape:
            raise ValueError(f"pred shape {p.shape} != target shape {t.shape}")
        if p.ndim not in (2, 3):
            raise ValueError(f"expected (H, W) or (N, H, W), got shape {p.shape}")
        ignored = t == self.ignore_index
        valid = ~ignored
        _check_range(t[valid], self.num_classes, "target")
        _check_range(p, self.num_classes, "pred")
        for c in range(self.num_classes):
            band_p = boundary_band(p == c, self.width, neutral=ignored) & valid
            band_t = boundary_band(t == c, self.width, neutral=ignored) & valid
            self.intersection[c] += np.count_nonzero(band_p & band_t)
            self.union[c] += np.count_nonzero(band_p | band_t)

    def compute(self) -> list[float | None]:
        """Boundary IoU per class; ``None`` for a class with no boundary pixels in either."""
        return [_ratio(int(i), int(u)) for i, u in zip(self.intersection, self.union, strict=True)]

    def reset(self) -> None:
        self.intersection[...] = 0
        self.union[...] = 0


def boundary_band(mask: np.ndarray, width: int, neutral: np.ndarray | None = None) -> np.ndarray:
    """Pixels of a boolean ``(..., H, W)`` mask within ``width`` px of its outside.

    ``neutral`` pixels (same shape) count as inside for the erosion, so they create no boundary.
    """
    mask = np.asarray(mask, dtype=bool)
    inside = mask if neutral is None else mask | neutral
    return mask & ~erode(inside, width)


def erode(mask: np.ndarray, width: int) -> np.ndarray:
    """Binary erosion of a boolean ``(..., H, W)`` mask by a ``(2w+1, 2w+1)`` square.

    Separable: a running AND along W, then along H, over an edge-replicated pad, so the image
    border neither erodes nor protects anything.
    """
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape[-2:]
    pad = [(0, 0)] * (mask.ndim - 2) + [(width, width), (width, width)]
    padded = np.pad(mask, pad, mode="edge")
    rows = padded[..., :, 0:w].copy()
    for s in range(1, 2 * width + 1):
        rows &= padded[..., :, s : s + w]
    out = rows[..., 0:h, :].copy()
    for s in range(1, 2 * width + 1):
        out &= rows[..., s : s + h, :]
    return out


def _as_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _check_range(values: np.ndarray, num_classes: int, what: str) -> None:
    if values.size == 0:
        return
    if values.dtype.kind not in "iub":
        raise ValueError(f"{what} must hold integer class ids, got dtype {values.dtype}")
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi >= num_classes:
        bad = np.unique(values[(values < 0) | (values >= num_classes)])[:20].tolist()
        raise ValueError(f"{what} has ids outside 0..{num_classes - 1}: {bad}")


def _ratio(numerator: int, denominator: int) -> float | None:
    return None if denominator == 0 else numerator / denominator


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None
