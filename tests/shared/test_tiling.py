from __future__ import annotations

import pytest
import torch

from shared.tiling import blend_window, check_tile_overlap, pad_reflect, tile_origins

# -- tile_origins --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "tile", "overlap", "expected"),
    [
        (1, 4, 1, [0]),
        (4, 4, 1, [0]),
        (5, 4, 1, [0, 1]),
        (10, 4, 1, [0, 3, 6]),
        (11, 4, 1, [0, 2, 5, 7]),
        (8, 4, 0, [0, 4]),
        # The step (448) is a multiple of 32: all origins but the flush last one are too.
        (1030, 512, 64, [0, 256, 518]),
        (5400, 512, 64, [0, 448, 896, 1344, 1792, 2208, 2656, 3104, 3552, 4000, 4448, 4888]),
        # 10 full steps of 448 reach 4480; a tile snapped to 4488 would overlap it by 504 rows.
        (5000, 512, 64, [0, 416, 832, 1216, 1632, 2048, 2464, 2848, 3264, 3680, 4096, 4488]),
    ],
)
def test_tile_origins(length: int, tile: int, overlap: int, expected: list[int]) -> None:
    assert tile_origins(length, tile, overlap) == expected


@pytest.mark.parametrize("length", [1, 31, 32, 33, 100, 513, 1030, 2700])
def test_tile_origins_cover_with_overlap_and_stay_inside(length: int) -> None:
    tile, overlap = 64, 16
    origins = tile_origins(length, tile, overlap)
    covered = torch.zeros(max(length, tile), dtype=torch.int32)
    for o in origins:
        covered[o : o + tile] += 1
    assert (covered[:length] >= 1).all()
    assert origins[0] == 0
    if length >= tile:
        assert origins[-1] == length - tile  # flush with the edge, never past it
    # Neighbours share at least `overlap` pixels; steps are even (within rounding), and no
    # tile could be dropped.
    steps = [b - a for a, b in zip(origins, origins[1:], strict=False)]
    assert all(step <= tile - overlap for step in steps)
    if steps:
        assert max(steps) - min(steps) <= 1
        assert (len(origins) - 2) * (tile - overlap) + tile < length


@pytest.mark.parametrize("length", [513, 1030, 2700, 4982, 5000, 5400, 20000, 40000])
def test_aligned_tile_origins_sit_on_the_32_pixel_grid(length: int) -> None:
    tile, overlap = 512, 64
    origins = tile_origins(length, tile, overlap)
    assert origins[0] == 0 and origins[-1] == length - tile
    assert all(o % 32 == 0 for o in origins[:-1])
    steps = [b - a for a, b in zip(origins, origins[1:], strict=False)]
    assert all(step <= tile - overlap for step in steps)
    # Never a step so short that nearly a whole tile of rows stays open (at most 32 short of
    # an even share, and at most one tile more than the fewest).
    fewest = -(-(length - tile) // (tile - overlap))
    assert len(steps) <= fewest + 1
    assert min(steps) >= (length - tile) / len(steps) - 32


@pytest.mark.parametrize(("tile", "overlap"), [(0, 0), (4, 4), (4, -1)])
def test_tile_origins_rejects_bad_overlap(tile: int, overlap: int) -> None:
    with pytest.raises(ValueError):
        tile_origins(10, tile, overlap)


@pytest.mark.parametrize(
    ("tile", "overlap", "aligned", "named"),
    [
        (0, 0, False, "tile must be positive"),
        (100, 0, True, "tile must be a positive multiple of 32"),
        (64, 64, True, r"overlap must be in \[0, tile\), got 64 for tile 64"),
        (64, -1, False, "overlap"),
    ],
)
def test_check_tile_overlap_names_what_is_wrong(
    tile: int, overlap: int, aligned: bool, named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        check_tile_overlap(tile, overlap, aligned=aligned)


def test_check_tile_overlap_takes_the_edges_of_its_ranges() -> None:
    check_tile_overlap(1, 0)
    check_tile_overlap(100, 99)  # any side unless aligned
    check_tile_overlap(32, 31, aligned=True)


# -- blend_window --------------------------------------------------------------------------------


def test_blend_window_by_eye() -> None:
    w = blend_window(6, 2)
    ramp = torch.tensor([0.25, 0.75, 1.0, 1.0, 0.75, 0.25])
    assert torch.allclose(w, ramp[:, None] * ramp[None, :])


def test_blend_window_properties() -> None:
    w = blend_window(64, 16)
    assert w.shape == (64, 64) and w.dtype == torch.float32
    assert (w > 0).all()
    assert w[32, 32] == 1.0 and w[0, 0] < w[8, 8] < w[16, 16]
    assert torch.equal(w, w.flip(0)) and torch.equal(w, w.T)
    # Two tiles overlapping by exactly `overlap` cross-fade: their weights sum to 1.
    row = w[32]
    assert torch.allclose(row[-16:] + row[:16], torch.ones(16))


def test_blend_window_without_overlap_is_flat() -> None:
    assert torch.equal(blend_window(32, 0), torch.ones(32, 32))


# -- pad_reflect ---------------------------------------------------------------------------------


def test_pad_reflect_mirrors_without_repeating_the_edge() -> None:
    x = torch.tensor([[1, 2, 3]], dtype=torch.uint8)
    assert pad_reflect(x, 1, 8).tolist() == [[1, 2, 3, 2, 1, 2, 3, 2]]
    assert pad_reflect(torch.tensor([[7]]), 2, 3).tolist() == [[7, 7, 7], [7, 7, 7]]
    same = torch.zeros(2, 4, 4)
    assert pad_reflect(same, 4, 4) is same
