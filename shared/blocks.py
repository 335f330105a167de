"""Blocks of a scene that can be segmented apart and put side by side without seams.

A block *finishes* a rectangle of the scene (its core) and *reads* the core plus a halo: the
whole of every tile of the scene's tile grid (:func:`shared.tiling.tile_origins`) that touches
the core. Core edges lie on tile starts of that grid, so the tiles a block reads are exactly the
scene's own tiles, in the same row-major order; run through :func:`shared.pipeline.predict`
they are weighted and summed as the whole scene's stream sums them, and the core's mask (and
probabilities) equal, bit for bit, the single-process result for the same pixels, provided the
model answers a tile the same way in both runs (same weights, device and thread count).

The halo is the tile that straddles each core edge: ``tile - overlap`` rows on one side and
``overlap`` on the other, plus more tiles when ``overlap > tile / 2``. It is computed by both
blocks beside the edge, so a block of ``k`` tiles a side costs about ``((k + 1) / k) ** 2`` of its
share of the scene; larger blocks waste less.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.pipeline import Prediction, RunFn, TileOrigins, Tiling, predict
from shared.raster import ArrayRaster, Rows
from shared.tiling import tile_origins

# A block spans at least two tiles a side where the scene has two: a read window of a single
# tile would take the pipeline's unweighted one-tile path and lose bit equality.
MIN_TILES = 2


@dataclass(frozen=True)
class Window:
    """Rows ``[row, row + height)`` and columns ``[col, col + width)`` of a scene."""

    row: int
    col: int
    height: int
    width: int

    @property
    def pixels(self) -> int:
        return self.height * self.width


@dataclass(frozen=True)
class Block:
    """A part of a scene segmented on its own.

    Attributes:
        index: position in :func:`plan_blocks`' row-major order.
        core: the pixels this block finishes.
        read: the pixels it reads (the core and its halo).
        origins: the scene's tile row and column starts within ``read`` (the tiles it runs).
    """

    index: int
    core: Window
    read: Window
    origins: TileOrigins


def plan_blocks(height: int, width: int, tiling: Tiling, block_size: int) -> list[Block]:
    """Cut a ``height x width`` scene into blocks of about ``block_size`` pixels a side (whole
    tiles of the scene's grid, at least :data:`MIN_TILES` where the scene has that many), in
    row-major order. A scene no larger than ``block_size`` is one block, read whole.

    Raises:
        ValueError: an empty scene or a non-positive ``block_size``.
    """
    if height < 1 or width < 1:
        raise ValueError(f"scene is empty ({height}x{width})")
    if block_size < 1:
        raise ValueError(f"block size must be positive, got {block_size}")
    if height <= block_size and width <= block_size:
        whole = Window(0, 0, height, width)
        return [Block(0, whole, whole, (_grid(height, tiling), _grid(width, tiling)))]
    rows = _axis(height, tiling, block_size)
    cols = _axis(width, tiling, block_size)
    row_grid, col_grid = _grid(height, tiling), _grid(width, tiling)
    blocks = []
    for core_r, read_r in rows:
        for core_c, read_c in cols:
            core = Window(core_r[0], core_c[0], core_r[1] - core_r[0], core_c[1] - core_c[0])
            read = Window(read_r[0], read_c[0], read_r[1] - read_r[0], read_c[1] - read_c[0])
            origins = (_within(row_grid, read_r, tiling), _within(col_grid, read_c, tiling))
            blocks.append(Block(len(blocks), core, read, origins))
    return blocks


def segment_block(
    rows: Rows,
    block: Block,
    run: RunFn,
    *,
    num_classes: int,
    tiling: Tiling,
    probabilities: bool = False,
    ignore_index: int = 255,
) -> Prediction:
    """The core of ``block`` from its read window's pixels ``rows`` (``block.read`` of the
    scene, as :meth:`shared.raster.GdalRaster.read_window` gives them).

    Raises:
        ValueError: ``rows`` are not the size of ``block.read``.
    """
    read, core = block.read, block.core
    if rows.rgb.shape[:2] != (read.height, read.width):
        raise ValueError(
            f"block {block.index} reads {read.height}x{read.width} pixels, "
            f"got {rows.rgb.shape[0]}x{rows.rgb.shape[1]}"
        )
    whole = predict(
        ArrayRaster(rows.rgb, rows.valid),
        run,
        num_classes=num_classes,
        tiling=tiling,
        probabilities=probabilities,
        ignore_index=ignore_index,
        origins=block.origins,
    )
    r, c = core.row - read.row, core.col - read.col
    mask = np.ascontiguousarray(whole.mask[r : r + core.height, c : c + core.width])
    probs = None
    if whole.probabilities is not None:
        probs = np.ascontiguousarray(
            whole.probabilities[:, r : r + core.height, c : c + core.width]
        )
    return Prediction(mask, probs)


def _grid(length: int, tiling: Tiling) -> list[int]:
    """The scene's tile starts along an axis (one tile, mirror-padded, when it is short)."""
    return tile_origins(max(length, tiling.tile), tiling.tile, tiling.overlap)


def _within(grid: list[int], span: tuple[int, int], tiling: Tiling) -> tuple[int, ...]:
    """The starts of ``grid``'s tiles inside ``[start, stop)``, relative to ``start``."""
    start, stop = span
    return tuple(
        o - start for o in grid if o >= start and o + tiling.tile <= max(stop, tiling.tile)
    )


def _axis(
    length: int, tiling: Tiling, block_size: int
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """``(core, read)`` spans along one axis of ``length`` pixels."""
    tile, overlap = tiling.tile, tiling.overlap
    if length <= tile:
        return [((0, length), (0, length))]  # one tile (mirror-padded by the pipeline)
    origins = tile_origins(length, tile, overlap)
    count = len(origins)
    per_block = max(MIN_TILES, block_size // (tile - overlap))
    starts = list(range(0, count, per_block))
    if count - starts[-1] < MIN_TILES and len(starts) > 1:
        starts.pop()  # a last block of one tile joins the one before
    spans = []
    for i, first_tile in enumerate(starts):
        last_tile = (starts[i + 1] if i + 1 < len(starts) else count) - 1
        core_start = 0 if first_tile == 0 else origins[first_tile]
        core_stop = length if last_tile == count - 1 else origins[last_tile + 1]
        # Earlier tiles that still reach into the core are read too (the halo before it);
        # the tile after the core starts at its end and adds nothing to it.
        reach = next(t for t in range(count) if origins[t] + tile > core_start)
        spans.append(((core_start, core_stop), (origins[reach], origins[last_tile] + tile)))
    return spans
