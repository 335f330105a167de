from __future__ import annotations

import pytest
import torch

from shared.tiling import blend_window, pad_reflect, segment_tiled, tile_origins

NUM_CLASSES = 5


def pixel_class(batch: torch.Tensor) -> torch.Tensor:
    """The "true" class of each pixel, from its own values: (N,3,h,w) uint8 -> (N,h,w)."""
    return (batch[:, 0].long() + 2 * batch[:, 1].long() + 3 * batch[:, 2].long()) % NUM_CLASSES


class PixelwiseModel:
    """A stand-in model whose logits are the one-hot of :func:`pixel_class`, so the right mask
    is known exactly; it records what it was given."""

    def __init__(self) -> None:
        self.calls: list[torch.Tensor] = []

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        assert batch.dtype == torch.uint8
        self.calls.append(batch.clone())
        one_hot = torch.nn.functional.one_hot(pixel_class(batch), NUM_CLASSES)
        return one_hot.permute(0, 3, 1, 2).float()


def random_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g)


# -- tile_origins --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "tile", "overlap", "expected"),
    [
        (1, 4, 1, [0]),
        (4, 4, 1, [0]),
        (5, 4, 1, [0, 1]),
        (10, 4, 1, [0, 3, 6]),
        (11, 4, 1, [0, 3, 6, 7]),
        (8, 4, 0, [0, 4]),
        (1030, 512, 64, [0, 448, 518]),
        (5400, 512, 64, [0, 448, 896, 1344, 1792, 2240, 2688, 3136, 3584, 4032, 4480, 4888]),
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
    # Neighbours share at least `overlap` pixels.
    assert all(b - a <= tile - overlap for a, b in zip(origins, origins[1:], strict=False))


@pytest.mark.parametrize(("tile", "overlap"), [(0, 0), (4, 4), (4, -1)])
def test_tile_origins_rejects_bad_overlap(tile: int, overlap: int) -> None:
    with pytest.raises(ValueError):
        tile_origins(10, tile, overlap)


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


# -- segment_tiled -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("height", "width"),
    [(1, 1), (7, 13), (32, 32), (50, 64), (64, 64), (65, 64), (64, 200), (200, 9), (513, 1030)],
)
def test_tiled_equals_untiled_for_pixelwise_model(height: int, width: int) -> None:
    image = random_image(height, width)
    model = PixelwiseModel()

    mask = segment_tiled(image, model, num_classes=NUM_CLASSES, tile=64, overlap=16, batch_size=3)

    assert mask.shape == (height, width) and mask.dtype == torch.uint8
    assert torch.equal(mask, pixel_class(image[None])[0].to(torch.uint8))
    assert all(len(batch) <= 3 for batch in model.calls)


@pytest.mark.parametrize(
    ("height", "width", "padded"),
    [(1, 1, (32, 32)), (7, 13, (32, 32)), (33, 64, (64, 64)), (64, 40, (64, 64))],
)
def test_small_images_are_padded_not_resized(height: int, width: int, padded: tuple) -> None:
    image = random_image(height, width, seed=1)
    model = PixelwiseModel()

    segment_tiled(image, model, num_classes=NUM_CLASSES, tile=64, overlap=16)

    assert len(model.calls) == 1
    (seen,) = model.calls
    assert seen.shape == (1, 3, *padded)
    # The original pixels reach the model untouched, at their own positions.
    assert torch.equal(seen[0, :, :height, :width], image)


def test_large_images_go_in_bounded_batches_of_full_tiles() -> None:
    image = random_image(300, 170, seed=2)
    model = PixelwiseModel()

    segment_tiled(image, model, num_classes=NUM_CLASSES, tile=64, overlap=16, batch_size=4)

    ys, xs = tile_origins(300, 64, 16), tile_origins(170, 64, 16)
    assert [len(b) for b in model.calls] == [4] * (len(ys) * len(xs) // 4) + (
        [len(ys) * len(xs) % 4] if len(ys) * len(xs) % 4 else []
    )
    assert all(b.shape[1:] == (3, 64, 64) for b in model.calls)
    # Tiles are exact crops of the image, in row-major order.
    tiles = torch.cat(model.calls)
    expected = [image[:, y : y + 64, x : x + 64] for y in ys for x in xs]
    assert all(torch.equal(t, e) for t, e in zip(tiles, expected, strict=True))


def test_thin_strip_is_padded_to_full_tiles() -> None:
    image = random_image(10, 150, seed=3)
    model = PixelwiseModel()
    mask = segment_tiled(image, model, num_classes=NUM_CLASSES, tile=64, overlap=16)
    assert all(b.shape[2:] == (64, 64) for b in model.calls)
    assert torch.equal(mask, pixel_class(image[None])[0].to(torch.uint8))


def test_overlap_is_blended_towards_the_nearer_tile_centre() -> None:
    # Two tiles across a 32x48 image: columns 0..31 and 16..47. The model votes class 0 over
    # all of the left tile and class 1 over all of the right one; in the shared columns the
    # tile whose centre is nearer wins, so the boundary falls in the middle, at column 24.
    image = torch.zeros(3, 32, 48, dtype=torch.uint8)
    image[0] = torch.arange(48, dtype=torch.uint8)  # red = column, tells the tiles apart

    def votes(batch: torch.Tensor) -> torch.Tensor:
        left = (batch[:, 0, 0, 0] == 0).float()[:, None, None, None]
        ones = torch.ones(batch.shape[0], 1, 32, 32)
        return torch.cat([ones * left, ones * (1 - left)], dim=1)

    mask = segment_tiled(image, votes, num_classes=2, tile=32, overlap=16)
    expected = torch.zeros(32, 48, dtype=torch.uint8)
    expected[:, 24:] = 1
    assert torch.equal(mask, expected)


def test_logits_of_the_wrong_shape_are_reported() -> None:
    with pytest.raises(ValueError, match=r"run returned logits of shape \(1, 2, 32, 32\)"):
        segment_tiled(
            random_image(8, 8),
            lambda b: torch.zeros(1, 2, 32, 32),
            num_classes=3,
            tile=64,
            overlap=16,
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tile": 50}, "multiple of 32"),
        ({"overlap": 64}, "overlap"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_classes": 300}, "num_classes"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    args = {"num_classes": 3, "tile": 64, "overlap": 16} | kwargs
    with pytest.raises(ValueError, match=message):
        segment_tiled(random_image(8, 8), PixelwiseModel(), **args)


@pytest.mark.parametrize(
    "image",
    [
        torch.zeros(8, 8, 3, dtype=torch.uint8),
        torch.zeros(3, 8, 8),
        torch.zeros(3, 0, 8, dtype=torch.uint8),
    ],
)
def test_bad_images(image: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="image"):
        segment_tiled(image, PixelwiseModel(), num_classes=NUM_CLASSES)
