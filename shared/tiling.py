"""The geometry of sliding-window inference: where tiles go, how they are weighted, how edges
are padded.

Large images are cut into square tiles that overlap by ``overlap`` pixels (:func:`tile_origins`);
each tile's logits are weighted by :func:`blend_window` (low at the tile edges, where the model
sees the least context) and summed; :mod:`shared.pipeline` does that a band of rows at a time.
Images are padded by mirroring (:func:`pad_reflect`), never resized.
"""

from __future__ import annotations

import torch

# DeepLabV3 backbones downsample by up to 32; inputs that are multiples of it keep feature-map
# pixels aligned with image pixels.
ALIGN = 32


def tile_origins(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles covering ``[0, length)`` with at least ``overlap`` shared pixels.

    The fewest tiles whose steps are at most ``tile - overlap``, spread evenly from 0 to flush
    with the end, so no tile runs past the edge (when ``length <= tile`` there is one tile at
    0, which the caller pads). Where the full step is a multiple of :data:`ALIGN`, every origin
    but the last is rounded to a multiple of it, so the tiles' feature maps sit on the grid of
    a whole-image pass (an unaligned tile sees shifted stride-32 cells and answers
    differently). Even steps rather than full steps and a last tile snapped to the end: a
    snapped tile a few pixels past its neighbour would make the rows still being summed
    (``shared.pipeline``) nearly a whole tile tall, for no extra coverage.

    >>> tile_origins(1030, 512, 64)
    [0, 256, 518]
    """
    check_tile_overlap(tile, overlap)
    if length < 1:
        raise ValueError(f"length must be positive, got {length}")
    if length <= tile:
        return [0]
    span, stride = length - tile, tile - overlap
    unit = ALIGN if stride % ALIGN == 0 else 1
    steps = -(-span // stride)  # ceil: the fewest steps that fit
    while True:
        # i * span / steps rounded half up to a multiple of unit, in integers.
        origins = [(2 * i * span + steps * unit) // (2 * steps * unit) * unit for i in range(steps)]
        origins.append(span)
        if all(b - a <= stride for a, b in zip(origins, origins[1:], strict=False)):
            return origins
        steps += 1  # rounding stretched a step past the full one: one more tile


def blend_window(tile: int, overlap: int) -> torch.Tensor:
    """``(tile, tile)`` float32 blending weights: 1 in the middle, ramping down over the outer
    ``overlap`` pixels of each side, and strictly positive everywhere.

    Along one axis the ramp is ``(i + 0.5) / overlap``, so where two tiles overlap by exactly
    ``overlap`` pixels their weights sum to 1 (a linear cross-fade). ``overlap == 0`` gives
    all ones.
    """
    check_tile_overlap(tile, overlap)
    i = torch.arange(tile, dtype=torch.float32)
    if overlap == 0:
        ramp = torch.ones(tile)
    else:
        distance = torch.minimum(i, tile - 1 - i)  # pixels to the nearest edge
        ramp = ((distance + 0.5) / overlap).clamp(max=1.0)
    return ramp[:, None] * ramp[None, :]


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


def round_up(n: int) -> int:
    """``n`` rounded up to a multiple of :data:`ALIGN`."""
    return -(-n // ALIGN) * ALIGN


def check_tile_overlap(tile: int, overlap: int, *, aligned: bool = False) -> None:
    """Refuse a tile side below 1 (or, when ``aligned``, not a multiple of :data:`ALIGN`, as the
    model's inputs need) and an overlap outside ``[0, tile)``, with a ValueError naming which."""
    if tile < 1 or (aligned and tile % ALIGN):
        kind = f"a positive multiple of {ALIGN}" if aligned else "positive"
        raise ValueError(f"tile must be {kind}, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got {overlap} for tile {tile}")
