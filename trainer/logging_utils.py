"""What a run tells people: log lines or a progress bar, TensorBoard scalars and image grids.

Only rank 0 reports; other ranks get the silent variants, so the training loop never asks.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shared.labels import LabelMap, overlay

log = logging.getLogger("trainer")


def setup_logging(log_file: Path | None = None, *, enabled: bool = True) -> None:
    """Plain ``time message`` lines to stdout (and ``log_file``); silent when not enabled."""
    close_logging()
    root = logging.getLogger()
    if not enabled:
        logging.getLogger("trainer").setLevel(logging.WARNING)
        return
    fmt = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(fmt)
        handler._satseg = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("trainer").setLevel(logging.INFO)


def close_logging() -> None:
    """Remove and close the handlers :func:`setup_logging` added, so that a run finished inside
    a longer-lived process (a benchmark, a notebook) leaves no handler writing to its folder."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_satseg", False):
            root.removeHandler(handler)
            handler.close()


def format_scalars(values: Mapping[str, float]) -> str:
    """``{"loss": 0.41234, "lr": 1e-4}`` -> ``"loss 0.4123 lr 1.00e-04"``."""
    parts = []
    for key, value in values.items():
        if key == "lr":
            parts.append(f"{key} {value:.2e}")
        elif key.endswith("img/s"):
            parts.append(f"{value:.1f} {key}")
        else:
            parts.append(f"{key} {value:.4f}")
    return " ".join(parts)


class Progress:
    """Per-epoch progress: a tqdm bar in a terminal, log lines otherwise.

    ``mode``: "bar", "lines", "auto" (bar when stdout is a TTY) or "off" (non-zero ranks).
    :meth:`update` advances by ``n`` batches; with ``values`` the bar's text changes, or (in
    "lines" mode) one log line is written.
    """

    def __init__(self, total: int, *, desc: str, mode: str = "auto", initial: int = 0) -> None:
        self.desc = desc
        self.total = total
        self.count = initial
        self.bar: Any = None
        if mode == "auto":
            mode = "bar" if sys.stdout.isatty() else "lines"
        self.mode = mode
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False
            )

    def update(self, n: int = 1, values: Mapping[str, float] | None = None) -> None:
        self.count += n
        if self.mode == "bar":
            self.bar.update(n)
            if values is not None:
                self.bar.set_postfix_str(format_scalars(values), refresh=False)
        elif self.mode == "lines" and values is not None:
            log.info("%s [%d/%d] %s", self.desc, self.count, self.total, format_scalars(values))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Board:
    """TensorBoard writer (rank 0) or a no-op (other ranks, or TensorBoard switched off)."""

    def __init__(self, log_dir: Path | None) -> None:
        self.writer: Any = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, values: Mapping[str, float | None], step: int) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """``image`` (H,W,3) uint8."""
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="HWC")

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def metric_scalars(prefix: str, result: Mapping[str, Any]) -> dict[str, float | None]:
    """TensorBoard tags for a :func:`shared.metrics.scores` result: mIoU, pixel accuracy,
    mean Dice and per-class IoU / Dice (``val/iou/lake``...)."""
    out: dict[str, float | None] = {
        f"{prefix}/miou": result.get("miou"),
        f"{prefix}/pixel_accuracy": result.get("pixel_accuracy"),
        f"{prefix}/mean_dice": result.get("mean_dice"),
    }
    for c in result.get("per_class", []):
        out[f"{prefix}/iou/{c['name']}"] = c["iou"]
        out[f"{prefix}/dice/{c['name']}"] = c["dice"]
    return out


def overlay_grid(
    samples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    label_map: LabelMap,
    *,
    alpha: float = 0.5,
    gap: int = 4,
) -> np.ndarray:
    """One row per sample: input | truth overlay | prediction overlay, (H,W,3) uint8.

    samples: (image (h,w,3) uint8, truth (h,w) ids, prediction (h,w) ids), all of one size
    (samples of another size than the first are left out). Colours are the label map's, via
    :func:`shared.labels.overlay`, the same as everywhere else.
    """
    if not samples:
        raise ValueError("no samples for the image grid")
    h, w = samples[0][0].shape[:2]
    rows = []
    for image, truth, pred in samples:
        if image.shape[:2] != (h, w):
            continue
        panels = [
            image,
            overlay(image, truth, label_map, alpha),
            overlay(image, pred, label_map, alpha),
        ]
        spacer = np.full((h, gap, 3), 255, dtype=np.uint8)
        row = np.concatenate([panels[0], spacer, panels[1], spacer, panels[2]], axis=1)
        rows.append(row)
    spacer = np.full((gap, rows[0].shape[1], 3), 255, dtype=np.uint8)
    out = [rows[0]]
    for row in rows[1:]:
        out += [spacer, row]
    return np.concatenate(out, axis=0)
