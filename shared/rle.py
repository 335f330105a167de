"""COCO run-length encoding (compressed form) in numpy, identical to ``pycocotools.mask``.

A binary ``(H, W)`` mask is read in column-major order and stored as alternating run lengths,
starting with a run of 0s (possibly empty). Counts from the third on are stored as the
difference to the count two places before, then each value is written as little-endian 5-bit
groups in ASCII (``chr(48 + group)``; bit 0x20 = more groups follow; the last group's bit 0x10
is the sign). Both directions are vectorised; no Python loop runs per pixel or per run.
"""

from __future__ import annotations

import numpy as np

# A signed int64 needs at most ceil(64 / 5) = 13 groups.
_MAX_GROUPS = 13


class RLEError(ValueError):
    """An RLE dict that is malformed or does not describe a mask of its stated size."""


def encode(mask: np.ndarray) -> dict:
    """``(H, W)`` bool or 0/1 mask -> ``{"size": [h, w], "counts": str}``.

    Byte-for-byte equal to
    ``pycocotools.mask.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()``.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    if mask.dtype != np.bool_:
        if mask.size and not np.isin(mask, (0, 1)).all():
            raise ValueError("mask must be boolean or hold only 0 and 1")
        mask = mask.astype(bool)
    h, w = mask.shape
    return {"size": [int(h), int(w)], "counts": _counts_to_string(_run_lengths(mask))}


def decode(rle: dict) -> np.ndarray:
    """``{"size": [h, w], "counts": str | bytes | list[int]}`` -> ``(H, W)`` uint8 of 0/1.

    ``counts`` may be the compressed string (as ``str`` or ``bytes``) or the uncompressed list of
    run lengths.

    Raises:
        RLEError: malformed dict or string, negative runs, or runs that do not sum to ``h * w``.
    """
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise RLEError("RLE must be a dict with 'size' and 'counts'")
    size = rle["size"]
    if (
        not isinstance(size, list | tuple)
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in size)
    ):
        raise RLEError(f"RLE size must be [h, w] non-negative ints, got {size!r}")
    h, w = int(size[0]), int(size[1])
    counts = rle["counts"]
    if isinstance(counts, str):
        runs = _string_to_counts(counts.encode("ascii", errors="replace"))
    elif isinstance(counts, bytes | bytearray):
        runs = _string_to_counts(bytes(counts))
    elif isinstance(counts, list | tuple):
        try:
            runs = np.asarray(counts, dtype=np.int64).reshape(-1)
        except (TypeError, ValueError, OverflowError):
            raise RLEError("uncompressed RLE counts must be a list of ints") from None
    else:
        raise RLEError(f"RLE counts must be str, bytes or a list, got {type(counts).__name__}")
    if (runs < 0).any():
        raise RLEError("RLE has negative run lengths")
    if int(runs.sum()) != h * w:
        raise RLEError(f"RLE runs cover {int(runs.sum())} pixels, but size {h}x{w} has {h * w}")
    # Runs alternate 0, 1, 0, ... starting with 0s.
    values = np.arange(runs.size, dtype=np.uint8) & 1
    flat = np.repeat(values, runs)
    return flat.reshape(w, h).T.copy()  # column-major -> (H, W), C-contiguous


def _run_lengths(mask: np.ndarray) -> np.ndarray:
    """Alternating run lengths of the column-major pixels, first run = 0s (may be empty)."""
    flat = mask.ravel(order="F")
    n = flat.size
    if n == 0:
        return np.zeros(1, dtype=np.int64)  # pycocotools writes a single empty run
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [n]))
    runs = np.diff(bounds).astype(np.int64)
    if flat[0]:
        runs = np.concatenate(([0], runs))
    return runs


def _counts_to_string(counts: np.ndarray) -> str:
    x = counts.astype(np.int64).copy()
    if x.size > 3:
        x[3:] -= counts[1:-2]  # counts[i] - counts[i - 2] for i > 2
    # Number of 5-bit groups: the smallest n with x in the signed 5n-bit range.
    n_groups = np.ones(x.shape, dtype=np.int8)
    for n in range(1, _MAX_GROUPS):
        limit = 1 << (5 * n - 1)
        over = (x < -limit) | (x >= limit)
        if not over.any():
            break
        n_groups += over
    # One column per group, only as many columns as the longest value needs.
    k = np.arange(int(n_groups.max(initial=1)), dtype=np.int64)
    groups = ((x[:, None] >> (5 * k)[None, :]) & 0x1F).astype(np.uint8)
    groups[k[None, :] < (n_groups[:, None] - 1)] |= 0x20
    groups += 48
    return groups[k[None, :] < n_groups[:, None]].tobytes().decode("ascii")


def _string_to_counts(data: bytes) -> np.ndarray:
    if not data:
        return np.zeros(0, dtype=np.int64)
    c = np.frombuffer(data, dtype=np.uint8).astype(np.int64) - 48
    if (c < 0).any() or (c > 0x3F).any():
        raise RLEError("RLE counts string has characters outside '0'..'o'")
    last = (c & 0x20) == 0  # a group without the continuation bit ends a value
    if not last[-1]:
        raise RLEError("RLE counts string ends in the middle of a value")
    ends = np.flatnonzero(last)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if (lengths > _MAX_GROUPS - 1).any():  # 12 groups = 60 bits, far beyond any mask
        raise RLEError("RLE counts string holds a value too large for 64 bits")
    position = np.arange(c.size) - np.repeat(starts, lengths)
    parts = (c & 0x1F) << (5 * position)
    x = np.add.reduceat(parts, starts)
    negative = (c[ends] & 0x10) != 0
    x[negative] -= np.left_shift(1, 5 * lengths[negative])
    # Undo the delta coding: counts[i] = x[i] + counts[i - 2] for i > 2, i.e. running sums
    # along the odd positions from 1 and the even positions from 2.
    counts = x.copy()
    counts[1::2] = np.cumsum(x[1::2])
    counts[2::2] = np.cumsum(x[2::2])
    return counts
