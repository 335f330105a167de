"""Sliding-window segmentation of images of any size, with blended overlaps.

Small images are padded (never resized) and run in one piece. Large ones are cut into square
tiles that overlap by ``overlap`` pixels; each tile's logits are weighted by
:func:`blend_window` (low at the tile edges, where the model sees the least context) and summed
into one ``(C, H, W)`` accumulator, and the argmax of that sum is the mask. Memory is bounded by
``batch_size`` tiles plus the accumulator, whatever the image size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# DeepLabV3 backbones downsample by up to 32; inputs that are multiples of it keep feature-map
# pixels aligned with image pixels.
ALIGN = 32


def tile_origins(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles covering ``[0, length)`` with at least ``overlap`` shared pixels.

    Steps are ``tile - overlap``; the last tile is placed flush with the end, so no tile runs
    past the edge (when ``length <= tile`` there is one tile at 0, which the caller pads).

    >>> tile_origins(1030, 512, 64)
    [0, 448, 518]
    """
    _check_overlap(tile, overlap)
    if length < 1:
        raise ValueError(f"length must be positive, got {length}")
    if length <= tile:
        return [0]
    stride = tile - overlap
    origins = list(range(0, length - tile, stride))
    origins.append(length - tile)
    return origins


def blend_window(tile: int, overlap: int) -> torch.Tensor:
    """``(tile, tile)`` float32 blending weights: 1 in the middle, ramping down over the outer
    ``overlap`` pixels of each side, and strictly positive everywhere.

    Along one axis the ramp is ``(i + 0.5) / overlap``, so where two tiles overlap by exactly
    ``overlap`` pixels their weights sum to 1 (a linear cross-fade). ``overlap == 0`` gives
    all ones.
    """
    _check_overlap(tile, overlap)
    i = torch.arange(tile, dtype=torch.float32)
    if overlap == 0:
        ramp = torch.ones(tile)
    else:
        distance = torch.minimum(i, tile - 1 - i)  # pixels to the nearest edge
        ramp = ((distance + 0.5) / overlap).clamp(max=1.0)
    return ramp[:, None] * ramp[None, :]


def segment_tiled(
    image: torch.Tensor,
    run: Callable[[torch.Tensor], torch.Tensor],
    *,
    num_classes: int,
    tile: int = 512,
    overlap: int = 64,
    batch_size: int = 4,
) -> torch.Tensor:
    """Segment an image of any size with a model that sees at most ``batch_size`` tiles at once.

    Args:
        image: ``(3, H, W)`` uint8, on any device.
        run: maps ``(N, 3, h, w)`` uint8 (N <= batch_size) to ``(N, C, h, w)`` float logits on
            the image's device. Tiles are ``tile x tile``; an image no larger than one tile is
            run once at its size padded up to a multiple of 32.
        num_classes: C.
        tile: tile side, a positive multiple of 32.
        overlap: pixels shared by neighbouring tiles, ``0 <= overlap < tile``.
        batch_size: tiles per ``run`` call.

    Returns:
        ``(H, W)`` uint8 class ids on the image's device.
    """
    _check_tile(tile, overlap)
    if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        raise ValueError(
            f"image must be a (3, H, W) uint8 tensor, got {tuple(image.shape)} {image.dtype}"
        )
    if not 1 <= num_classes <= 256:
        raise ValueError(f"num_classes must be in 1..256 for a uint8 mask, got {num_classes}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    _, height, width = image.shape
    if height == 0 or width == 0:
        raise ValueError(f"image is empty ({height}x{width})")

    if height <= tile and width <= tile:
        padded = pad_reflect(image, _round_up(height), _round_up(width))
        logits = _checked(run, padded[None], num_classes)
        return logits[0, :, :height, :width].argmax(dim=0).to(torch.uint8)

    # Pad a side shorter than a tile (e.g. a 100x3000 strip) so every tile is tile x tile.
    image = pad_reflect(image, max(height, tile), max(width, tile))
    ys = tile_origins(image.shape[1], tile, overlap)
    xs = tile_origins(image.shape[2], tile, overlap)
    origins = [(y, x) for y in ys for x in xs]
    window = blend_window(tile, overlap).to(image.device)
    # The argmax of a weighted sum does not change when each pixel is divided by its total
    # weight, so no weight accumulator is needed.
    acc = torch.zeros(
        (num_classes, image.shape[1], image.shape[2]), dtype=torch.float32, device=image.device
    )
    for start in range(0, len(origins), batch_size):
        chunk = origins[start : start + batch_size]
        batch = torch.stack([image[:, y : y + tile, x : x + tile] for y, x in chunk])
        logits = _checked(run, batch, num_classes)
        for (y, x), tile_logits in zip(chunk, logits, strict=True):
            acc[:, y : y + tile, x : x + tile].addcmul_(tile_logits.float(), window)
    # Argmax a band of rows at a time: a whole-image int64 result would rival the accumulator.
    mask = torch.empty((height, width), dtype=torch.uint8, device=image.device)
    for top in range(0, height, tile):
        mask[top : top + tile] = acc[:, top : min(top + tile, height), :width].argmax(dim=0)
    return mask


def pad_reflect(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pad ``(..., h, w)`` at the bottom and right to ``(..., height, width)`` by mirroring.

    Works for any dtype and device, and for pads larger than the image (the mirror repeats), so a
    1x1 image becomes a constant block. Returns ``image`` itself when no padding is needed.
    """
    h, w = image.shape[-2:]
    if height < h or width < w:
        raise ValueError(f"cannot pad {h}x{w} down to {height}x{width}")
    if (height, width) == (h, w):
        return image
    rows = _reflect_index(h, height, image.device)
    cols = _reflect_index(w, width, image.device)
    return image.index_select(-2, rows).index_select(-1, cols)


def _reflect_index(size: int, target: int, device: torch.device) -> torch.Tensor:
    # Mirror without repeating the edge pixel: 0 1 2 3 2 1 0 1 2 ... (period 2 * (size - 1)).
    i = torch.arange(target, device=device)
    if size == 1:
        return torch.zeros_like(i)
    period = 2 * (size - 1)
    i = i % period
    return torch.where(i < size, i, period - i)


def _checked(
    run: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, num_classes: int
) -> torch.Tensor:
    logits = run(batch)
    expected = (batch.shape[0], num_classes, batch.shape[2], batch.shape[3])
    if tuple(logits.shape) != expected:
        raise ValueError(f"run returned logits of shape {tuple(logits.shape)}, expected {expected}")
    return logits


def _round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _check_tile(tile: int, overlap: int) -> None:
    if tile < ALIGN or tile % ALIGN:
        raise ValueError(f"tile must be a positive multiple of {ALIGN}, got {tile}")
    _check_overlap(tile, overlap)


def _check_overlap(tile: int, overlap: int) -> None:
    if tile < 1:
        raise ValueError(f"tile must be positive, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got {overlap} for tile {tile}")
