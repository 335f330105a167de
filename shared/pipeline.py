"""The one image -> mask path, for every caller: rows -> tiles -> run(model) -> blended rows.

``run`` is the model call: ``Predictor.run_batch`` locally, the service's batcher in the
service. It maps ``(N, 3, t, t)`` uint8 tiles (``(N, B, t, t)`` float32 band values for a
multi-band model, ``Rows.pixels``) to ``(N, C, t, t)`` float logits. Tile logits are weighted by
:func:`shared.tiling.blend_window` and summed over a rolling band of rows: memory does not grow
with the scene's height, and the mask equals a whole-scene sum bit for bit. The data flow, the
blending and its memory bound: docs/inference-path.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from shared.memory import release_free_memory
from shared.raster import ArrayRaster, RasterSource, Rows
from shared.tiling import blend_window, check_tile_overlap, pad_reflect, round_up, tile_origins

RunFn = Callable[[torch.Tensor], torch.Tensor]
# Row starts and column starts of a scene's tiles.
TileOrigins = tuple[Sequence[int], Sequence[int]]


@dataclass(frozen=True)
class Tiling:
    """How a scene is cut for the model.

    Attributes:
        tile: side of the square tiles, a positive multiple of 32.
        overlap: pixels shared by neighbouring tiles, ``0 <= overlap < tile``.
        batch_size: tiles per ``run`` call.
    """

    tile: int = 512
    overlap: int = 64
    batch_size: int = 4

    def __post_init__(self) -> None:
        check_tile_overlap(self.tile, self.overlap, aligned=True)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")


@dataclass(frozen=True)
class Band:
    """Finished output rows ``[row, row + h)`` of a scene.

    Attributes:
        row: first row.
        mask: ``(h, W)`` uint8 class ids; ``ignore_index`` where the input was nodata.
        probabilities: ``(C, h, W)`` uint8 softmax x 255 (each pixel's bands sum to 255; 0 in
            every band where the input was nodata), or None when not asked for.
        rgb: ``(h, W, 3)`` uint8, the input rows (for overlays).
    """

    row: int
    mask: np.ndarray
    probabilities: np.ndarray | None
    rgb: np.ndarray


@dataclass(frozen=True)
class Prediction:
    """A whole scene's outputs, for images that fit in memory."""

    mask: np.ndarray
    probabilities: np.ndarray | None = None


class BandWriter(Protocol):
    """Takes a scene's bands in order (see :mod:`shared.codec`)."""

    def write(self, band: Band) -> None: ...


class WholeScene:
    """A :class:`BandWriter` that gathers a scene's bands into whole arrays: the mask, and the
    probabilities (``classes`` bands) and input RGB when asked for (scenes that fit in memory)."""

    def __init__(self, height: int, width: int, *, classes: int = 0, rgb: bool = False) -> None:
        self.mask = np.empty((height, width), dtype=np.uint8)
        self.probabilities = np.empty((classes, height, width), dtype=np.uint8) if classes else None
        self.rgb = np.empty((height, width, 3), dtype=np.uint8) if rgb else None

    def write(self, band: Band) -> None:
        rows = slice(band.row, band.row + band.mask.shape[0])
        self.mask[rows] = band.mask
        if self.probabilities is not None and band.probabilities is not None:
            self.probabilities[:, rows] = band.probabilities
        if self.rgb is not None:
            self.rgb[rows] = band.rgb


def stream(
    source: RasterSource,
    run: RunFn,
    *,
    num_classes: int,
    tiling: Tiling | None = None,
    probabilities: bool = False,
    ignore_index: int = 255,
    origins: TileOrigins | None = None,
) -> Iterator[Band]:
    """Segment ``source`` a band of rows at a time; bands come top to bottom, full width.

    ``origins``: the tiles' row and column starts, when ``source`` is a window of a larger
    scene whose own tile grid must be kept (:mod:`shared.blocks`); by default the scene's
    :func:`shared.tiling.tile_origins`.

    Raises:
        ValueError: ``run`` returned logits of the wrong shape, or bad arguments.
    """
    tiling = tiling or Tiling()
    if not 1 <= num_classes <= 256:
        raise ValueError(f"num_classes must be in 1..256 for a uint8 mask, got {num_classes}")
    tile, height, width = tiling.tile, source.height, source.width
    if height < 1 or width < 1:
        raise ValueError(f"image is empty ({height}x{width})")
    finish = _Finisher(num_classes, probabilities, ignore_index)
    if height <= tile and width <= tile:
        rows = source.read_rows(0, height)
        logits = run_padded(_chw(rows.model_input)[None], run, num_classes)[0]
        mask, probs = finish(logits)
        yield finish.band(0, mask, probs, rows.valid, rows.rgb)
        return

    # A side shorter than a tile (a 100 x 3000 strip) is mirror-padded to one tile.
    padded_h, padded_w = max(height, tile), max(width, tile)
    if origins is None:
        ys, xs = (
            tile_origins(padded_h, tile, tiling.overlap),
            tile_origins(padded_w, tile, tiling.overlap),
        )
    else:
        ys, xs = list(origins[0]), list(origins[1])
    window = blend_window(tile, tiling.overlap)
    # Logits of every tile in row-major order (a batch spans two bands only in memory).
    rows_of: dict[int, Rows] = {}
    # An in-memory scene's rows are views: nothing is freed band by band, and its batches may
    # span bands. A file's rows are read band by band and must not pile up.
    in_memory = isinstance(source, ArrayRaster)
    logits_of = _tile_logits(
        source, run, num_classes, tiling, ys, xs, padded_w, rows_of, spans_bands=in_memory
    )
    # Rows of the previous bands' sums that overlap this band: (C [+1 weight], rows, padded_w).
    carry: torch.Tensor | None = None
    for band_index, y in enumerate(ys):
        done_to = padded_h if band_index == len(ys) - 1 else ys[band_index + 1]
        done_rows = done_to - y  # rows [y, done_to) get no more contributions after this band
        band_mask: torch.Tensor | None = None
        band_probs: torch.Tensor | None = None
        next_carry: torch.Tensor | None = None
        side: torch.Tensor | None = None  # this band's sums in columns shared with the next tile
        for k, x in enumerate(xs):
            logits = next(logits_of)
            device = logits.device
            if band_mask is None:
                window = window.to(device)
                band_mask = torch.empty((done_rows, padded_w), dtype=torch.uint8, device=device)
                if probabilities:
                    shape = (num_classes, done_rows, padded_w)
                    band_probs = torch.empty(shape, dtype=torch.uint8, device=device)
                if done_rows < tile:
                    shape = (finish.channels, tile - done_rows, padded_w)
                    next_carry = torch.empty(shape, dtype=torch.float32, device=device)
            x_done = padded_w if k == len(xs) - 1 else xs[k + 1]
            block = torch.zeros((finish.channels, tile, tile), device=device)
            if carry is not None:
                block[:, : carry.shape[1]] = carry[:, :, x : x + tile]
            if side is not None:
                block[:, :, : side.shape[2]] = side
            # Product and sum as two roundings, as a plain "acc += logits * w" does.
            block[:num_classes] += logits.float() * window
            if probabilities:
                block[num_classes] += window
            cols = x_done - x
            mask, probs = finish(block[:, :done_rows, :cols], weighted=True)
            band_mask[:, x:x_done] = mask
            if band_probs is not None:
                band_probs[:, :, x:x_done] = probs
            if next_carry is not None:
                next_carry[:, :, x:x_done] = block[:, done_rows:, :cols]
            side = block[:, :, cols:]
        carry = next_carry
        assert band_mask is not None
        rows = rows_of.pop(band_index)
        kept = min(done_rows, height - y)
        band = finish.band(
            y,
            band_mask[:kept, :width],
            None if band_probs is None else band_probs[:, :kept, :width],
            None if rows.valid is None else rows.valid[:kept],
            rows.rgb[:kept],
        )
        # Only the consumer holds this band's rows from here; the next band is not read
        # until it asks (see _tile_logits), so one band of input rows is alive at a time.
        del rows, band_mask, band_probs, logits
        yield band
        del band
        if not in_memory:
            # Full-width rows are freed band after band; glibc would keep them in its heap, and
            # the resident size would grow with the width of the scene (Dask trims the same way).
            release_free_memory()


def predict(
    source: RasterSource | np.ndarray,
    run: RunFn,
    *,
    num_classes: int,
    tiling: Tiling | None = None,
    probabilities: bool = False,
    ignore_index: int = 255,
    origins: TileOrigins | None = None,
) -> Prediction:
    """:func:`stream`, gathered into whole-scene arrays (for scenes that fit in memory).

    ``source`` may be an ``(H, W, 3)`` uint8 array.
    """
    if isinstance(source, np.ndarray):
        source = ArrayRaster(source)
    whole = WholeScene(source.height, source.width, classes=num_classes if probabilities else 0)
    write(
        source,
        run,
        [whole],
        num_classes=num_classes,
        tiling=tiling,
        probabilities=probabilities,
        ignore_index=ignore_index,
        origins=origins,
    )
    return Prediction(whole.mask, whole.probabilities)


def write(
    source: RasterSource,
    run: RunFn,
    writers: Sequence[BandWriter],
    *,
    num_classes: int,
    tiling: Tiling | None = None,
    probabilities: bool = False,
    ignore_index: int = 255,
    origins: TileOrigins | None = None,
) -> None:
    """Stream ``source`` into ``writers``, each band to every writer in turn."""
    for band in stream(
        source,
        run,
        num_classes=num_classes,
        tiling=tiling,
        probabilities=probabilities,
        ignore_index=ignore_index,
        origins=origins,
    ):
        for writer in writers:
            writer.write(band)
        del band  # not held while the next band is computed


@dataclass(frozen=True)
class BatchPrediction:
    """Masks of a batch of same-sized images.

    Attributes:
        masks: ``(N, H, W)`` uint8 class ids on the host.
        logits: ``(N, C, H, W)`` float logits on the model's device when the images were run in
            one pass (no larger than one tile), else None.
    """

    masks: np.ndarray
    logits: torch.Tensor | None


def predict_batch(
    images: torch.Tensor, run: RunFn, *, num_classes: int, tiling: Tiling | None = None
) -> BatchPrediction:
    """``(N, 3, H, W)`` uint8 same-sized images (``(N, B, H, W)`` float32 band values for a
    multi-band model) -> their masks: one forward pass when they fit a tile (exactly what
    :func:`stream` does with each alone), else each streamed in turn."""
    tiling = tiling or Tiling()
    rgb = images.ndim == 4 and images.shape[1] == 3 and images.dtype == torch.uint8
    if not rgb and (images.ndim != 4 or images.dtype != torch.float32):
        raise ValueError(
            f"images must be (N, 3, H, W) uint8 or (N, B, H, W) float32, got "
            f"{tuple(images.shape)} {images.dtype}"
        )
    height, width = images.shape[-2:]
    if height <= tiling.tile and width <= tiling.tile:
        logits = run_padded(images, run, num_classes)
        masks = logits.argmax(dim=1).to(torch.uint8).cpu().numpy()
        return BatchPrediction(masks, logits)
    hwc = images.permute(0, 2, 3, 1).cpu().numpy()
    sources = [
        img if rgb else ArrayRaster(np.zeros((height, width, 3), np.uint8), pixels=img)
        for img in hwc
    ]
    masks = np.stack(
        [predict(src, run, num_classes=num_classes, tiling=tiling).mask for src in sources]
    )
    return BatchPrediction(masks, None)


def run_padded(images: torch.Tensor, run: RunFn, num_classes: int) -> torch.Tensor:
    """``(N, 3, h, w)`` uint8 -> ``(N, C, h, w)`` logits of one pass at the size mirror-padded
    up to a multiple of 32 (DeepLabV3 downsamples by up to 32), cropped back."""
    height, width = images.shape[-2:]
    logits = _checked(run, pad_reflect(images, round_up(height), round_up(width)), num_classes)
    return logits[:, :, :height, :width]


def quantize_probabilities(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(C, ...)`` float probabilities -> uint8 x 255 whose bands sum to exactly 255 and whose
    argmax (first maximum, as everywhere) is ``mask``.

    Each class is rounded down and what that loses (0 to C - 1 levels) goes to the class of
    ``mask``. Where the classes are all but tied, rounding can still leave an earlier class level
    with the mask's; that class gives one level to the mask's.
    """
    levels = torch.floor(probs * 255.0).clamp_(0, 255).to(torch.int32)
    index = mask.long().unsqueeze(0)
    deficit = (255 - levels.sum(dim=0, keepdim=True)).to(torch.int32)
    levels.scatter_add_(0, index, deficit)
    top = levels.gather(0, index)
    classes = torch.arange(levels.shape[0], device=levels.device).view(-1, *[1] * mask.ndim)
    # Levels never exceed the mask's (it has the largest probability); ties ahead of it are
    # what argmax would pick instead.
    tied = ((levels == top) & (classes < index)).to(torch.int32)
    levels -= tied
    levels.scatter_add_(0, index, tied.sum(dim=0, keepdim=True, dtype=torch.int32))
    return levels.to(torch.uint8)


class _Finisher:
    """Turns summed logits into mask (and probability) bytes, and applies nodata."""

    def __init__(self, num_classes: int, probabilities: bool, ignore_index: int) -> None:
        self.num_classes = num_classes
        self.probabilities = probabilities
        self.ignore_index = ignore_index
        # The blend weights are summed alongside when probabilities need the weighted mean.
        self.channels = num_classes + int(probabilities)

    def __call__(
        self, logits: torch.Tensor, *, weighted: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(C [+1 weight], h, w)`` summed (``weighted``) or plain logits -> mask, probs."""
        scores = logits[: self.num_classes]
        mask = scores.argmax(dim=0).to(torch.uint8)
        if not self.probabilities:
            return mask, None
        mean = scores / logits[self.num_classes] if weighted else scores.float()
        return mask, quantize_probabilities(torch.softmax(mean, dim=0), mask)

    def band(
        self,
        row: int,
        mask: torch.Tensor,
        probs: torch.Tensor | None,
        valid: np.ndarray | None,
        rgb: np.ndarray,
    ) -> Band:
        mask_np = mask.cpu().numpy()
        probs_np = None if probs is None else np.ascontiguousarray(probs.cpu().numpy())
        if valid is not None:
            # The model saw zeros there; its answer means nothing (QGIS shows nodata as empty).
            mask_np = mask_np.copy()
            mask_np[~valid] = self.ignore_index
            if probs_np is not None:
                probs_np[:, ~valid] = 0
        return Band(row, np.ascontiguousarray(mask_np), probs_np, rgb)


def _tile_logits(
    source: RasterSource,
    run: RunFn,
    num_classes: int,
    tiling: Tiling,
    ys: list[int],
    xs: list[int],
    padded_w: int,
    rows_of: dict[int, Rows],
    *,
    spans_bands: bool,
) -> Iterator[torch.Tensor]:
    """``(C, tile, tile)`` logits of every tile in row-major order, up to ``batch_size`` tiles
    per ``run`` call. A band's rows are read when its first tile joins a batch and left in
    ``rows_of`` for the caller.

    A batch spans two bands only if ``spans_bands`` (a scene in memory, whose rows are views):
    read from a file, the next band's rows are read after this band has been handed on, so one
    band of full-width rows is alive at a time (a short batch at each band's end costs less
    than a second band's memory on a wide scene).
    """
    tile, size = tiling.tile, tiling.batch_size
    pending: list[torch.Tensor] = []
    for band_index, y in enumerate(ys):
        rows = rows_of[band_index] = source.read_rows(y, tile)
        image = pad_reflect(_chw(rows.model_input), tile, padded_w)
        del rows
        for k, x in enumerate(xs):
            pending.append(image[:, :, x : x + tile])
            if len(pending) == size or (k == len(xs) - 1 and not spans_bands):
                batch = torch.stack(pending)
                pending = []
                yield from _checked(run, batch, num_classes)
        del image
    if pending:
        yield from _checked(run, torch.stack(pending), num_classes)


def _chw(rgb: np.ndarray) -> torch.Tensor:
    # A (3, h, w) view of (h, w, 3) rows; tiles are copied out of it when stacked. torch
    # wants writable memory (it never writes here); read-only decoder output is copied.
    if not rgb.flags.writeable:
        rgb = rgb.copy()
    return torch.from_numpy(rgb).permute(2, 0, 1)


def _checked(run: RunFn, batch: torch.Tensor, num_classes: int) -> torch.Tensor:
    logits = run(batch)
    expected = (batch.shape[0], num_classes, batch.shape[2], batch.shape[3])
    if tuple(logits.shape) != expected:
        raise ValueError(f"run returned logits of shape {tuple(logits.shape)}, expected {expected}")
    return logits
