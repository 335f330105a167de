"""The streamed image -> mask path against a whole-scene computation written here with numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.pipeline import Tiling, predict, predict_batch, quantize_probabilities, stream
from shared.raster import ArrayRaster, Rows
from shared.tiling import tile_origins

NUM_CLASSES = 3


class TileModel:
    """Logits that depend on the pixel values and on the position inside the tile, the same for
    a tile whatever batch it comes in (elementwise only), so seams and sums show."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(1)
        self.weights = torch.randn((NUM_CLASSES, 3), generator=gen)
        self.calls: list[int] = []

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.calls.append(batch.shape[0])
        x = batch.float() / 255.0
        logits = torch.einsum("kc,nchw->nkhw", self.weights, x)
        h, w = batch.shape[-2:]
        ramp = torch.linspace(-0.3, 0.3, h)[:, None] * torch.linspace(0.2, -0.2, w)[None, :]
        logits[:, 1] += ramp
        return logits


def numpy_window(tile: int, overlap: int) -> np.ndarray:
    i = np.arange(tile, dtype=np.float32)
    if overlap == 0:
        ramp = np.ones(tile, dtype=np.float32)
    else:
        ramp = np.minimum((np.minimum(i, tile - 1 - i) + np.float32(0.5)) / np.float32(overlap), 1)
        ramp = ramp.astype(np.float32)
    return (ramp[:, None] * ramp[None, :]).astype(np.float32)


def numpy_origins(length: int, tile: int, overlap: int) -> list[int]:
    """The fewest tiles with steps of at most ``tile - overlap``, spread evenly to the end,
    all but the last on multiples of 32 when the full step is one."""
    if length <= tile:
        return [0]
    span, stride = length - tile, tile - overlap
    unit = 32 if stride % 32 == 0 else 1
    steps = int(np.ceil(span / stride))
    while True:
        even = np.arange(steps) * span / steps
        origins = [*(int(v) * unit for v in np.floor(even / unit + 0.5)), span]
        if max(np.diff(origins)) <= stride:
            return origins
        steps += 1


def reflect(image: np.ndarray, height: int, width: int) -> np.ndarray:
    h, w = image.shape[:2]
    return np.pad(image, ((0, height - h), (0, width - w), (0, 0)), mode="reflect")


def whole_scene(image: np.ndarray, model: TileModel, tile: int, overlap: int) -> np.ndarray:
    """One (C, H, W) float32 accumulator for the whole scene; tiles in row-major order."""
    height, width = image.shape[:2]
    padded = reflect(image, max(height, tile), max(width, tile))
    acc = np.zeros((NUM_CLASSES, *padded.shape[:2]), dtype=np.float32)
    window = numpy_window(tile, overlap)
    for y in numpy_origins(padded.shape[0], tile, overlap):
        for x in numpy_origins(padded.shape[1], tile, overlap):
            crop = torch.from_numpy(padded[y : y + tile, x : x + tile].copy()).permute(2, 0, 1)
            logits = model(crop[None])[0].numpy()
            acc[:, y : y + tile, x : x + tile] += logits * window
    return acc[:, :height, :width]


class RecordingRaster(ArrayRaster):
    """Records every read, to prove the scene is read a band at a time."""

    def __init__(self, rgb: np.ndarray, valid: np.ndarray | None = None) -> None:
        super().__init__(rgb, valid)
        self.reads: list[tuple[int, int]] = []

    def read_rows(self, row: int, count: int) -> Rows:
        self.reads.append((row, count))
        return super().read_rows(row, count)


@pytest.mark.parametrize(
    ("height", "width", "tile", "overlap", "batch"),
    [
        (300, 420, 96, 32, 3),  # several bands, a last band and column flush with the edge
        (250, 97, 64, 16, 2),  # one column short of two tiles: the last tile overlaps a lot
        (40, 300, 64, 16, 4),  # a strip shorter than a tile: mirror-padded
        (500, 64, 64, 0, 1),  # no overlap
    ],
)
def test_stream_equals_whole_scene_bit_for_bit(height, width, tile, overlap, batch, rng):
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    model = TileModel()
    expected = whole_scene(image, model, tile, overlap).argmax(axis=0)
    got = predict(image, model, num_classes=NUM_CLASSES, tiling=Tiling(tile, overlap, batch)).mask
    assert got.dtype == np.uint8
    assert np.unique(expected).size > 1  # not a constant mask
    np.testing.assert_array_equal(got, expected)
    assert max(model.calls) <= batch


def test_scene_is_read_one_band_of_rows_at_a_time(rng):
    image = rng.integers(0, 256, (700, 200, 3), dtype=np.uint8)
    source = RecordingRaster(image)
    # Two tiles a band, two a batch: the model never runs ahead of the band being blended.
    bands = stream(source, TileModel(), num_classes=NUM_CLASSES, tiling=Tiling(128, 32, 2))
    first = next(bands)
    # The first band is out before the reader went past the first tile's rows.
    assert source.reads == [(0, 128)]
    # Rows up to the next band's top: 572 rows in 6 even steps, the second tile on row 96.
    assert first.row == 0 and first.mask.shape == (96, 200)
    rest = list(bands)
    assert all(count == 128 for _, count in source.reads)
    rows = [first.row] + [b.row for b in rest]
    heights = [first.mask.shape[0]] + [b.mask.shape[0] for b in rest]
    assert rows == [r for r, _ in source.reads]
    assert sum(heights) == 700 and rows == sorted(rows)


class FileLikeRaster:
    """A scene read from storage (not an in-memory ArrayRaster): records reads, and when each
    band of output was handed on."""

    def __init__(self, rgb: np.ndarray) -> None:
        self.inner = ArrayRaster(rgb)
        self.height, self.width = self.inner.height, self.inner.width
        self.georef, self.has_nodata = self.inner.georef, self.inner.has_nodata
        self.events: list[str] = []

    def read_rows(self, row: int, count: int) -> Rows:
        self.events.append(f"read {row}")
        return self.inner.read_rows(row, count)


def test_a_file_is_read_a_band_after_the_last_band_was_handed_on(rng):
    image = rng.integers(0, 256, (300, 250, 3), dtype=np.uint8)
    source, model = FileLikeRaster(image), TileModel()
    tiling = Tiling(64, 16, 4)
    for band in stream(source, model, num_classes=NUM_CLASSES, tiling=tiling):
        source.events.append(f"band {band.row}")
    # Read, hand on, read the next: never two bands of rows at once.
    assert source.events[0::2] == [f"read {y}" for y in tile_origins(300, 64, 16)]
    assert source.events[1::2] == [f"band {y}" for y in tile_origins(300, 64, 16)]
    # So no batch holds tiles of two bands: 5 tiles a band, batches of 4 and 1.
    assert len(tile_origins(250, 64, 16)) == 5 and model.calls == [4, 1] * 6
    expected = whole_scene(image, TileModel(), 64, 16).argmax(axis=0)
    got = predict(source, TileModel(), num_classes=NUM_CLASSES, tiling=tiling).mask
    np.testing.assert_array_equal(got, expected)


def test_small_image_is_one_padded_pass(rng):
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    model = TileModel()
    mask = predict(image, model, num_classes=NUM_CLASSES, tiling=Tiling(64, 16, 4)).mask
    padded = torch.from_numpy(reflect(image, 64, 64)).permute(2, 0, 1)[None]
    expected = model(padded)[0, :, :40, :50].argmax(dim=0).numpy()
    np.testing.assert_array_equal(mask, expected)
    assert model.calls[0] == 1


def test_batch_of_small_images_matches_each_alone(rng):
    images = rng.integers(0, 256, (3, 40, 50, 3), dtype=np.uint8)
    model = TileModel()
    result = predict_batch(
        torch.from_numpy(images).permute(0, 3, 1, 2),
        model,
        num_classes=NUM_CLASSES,
        tiling=Tiling(64, 16, 4),
    )
    assert result.logits is not None and result.logits.shape == (3, NUM_CLASSES, 40, 50)
    for image, mask in zip(images, result.masks, strict=True):
        alone = predict(image, model, num_classes=NUM_CLASSES, tiling=Tiling(64, 16)).mask
        np.testing.assert_array_equal(mask, alone)


def test_batch_of_large_images_is_streamed(rng):
    images = rng.integers(0, 256, (2, 100, 90, 3), dtype=np.uint8)
    model = TileModel()
    tiling = Tiling(64, 16, 4)
    result = predict_batch(
        torch.from_numpy(images).permute(0, 3, 1, 2), model, num_classes=3, tiling=tiling
    )
    assert result.logits is None
    for image, mask in zip(images, result.masks, strict=True):
        np.testing.assert_array_equal(mask, whole_scene(image, model, 64, 16).argmax(axis=0))


@pytest.mark.parametrize("shape", [(40, 50), (300, 420)])
def test_probabilities_sum_to_255_and_argmax_is_the_mask(shape, rng):
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    model = TileModel()
    result = predict(
        image, model, num_classes=NUM_CLASSES, tiling=Tiling(96, 32, 3), probabilities=True
    )
    probs = result.probabilities
    assert probs is not None and probs.dtype == np.uint8 and probs.shape == (3, *shape)
    np.testing.assert_array_equal(probs.astype(int).sum(axis=0), 255)
    np.testing.assert_array_equal(probs.argmax(axis=0), result.mask)
    if shape[0] > 96:
        # Against the weighted mean of the tile logits, computed on the whole scene.
        acc = whole_scene(image, model, 96, 32)
        weight = whole_scene_weight(shape, 96, 32)
        mean = torch.from_numpy(acc / weight)
        expected = torch.softmax(mean, dim=0).numpy() * 255
        assert np.abs(probs - expected).max() <= NUM_CLASSES


def whole_scene_weight(shape: tuple[int, int], tile: int, overlap: int) -> np.ndarray:
    weight = np.zeros(shape, dtype=np.float32)
    window = numpy_window(tile, overlap)
    for y in numpy_origins(shape[0], tile, overlap):
        for x in numpy_origins(shape[1], tile, overlap):
            weight[y : y + tile, x : x + tile] += window
    return weight


def test_quantized_probabilities_keep_the_argmax_on_near_ties():
    probs = torch.tensor([[0.5, 0.2, 1 / 3], [0.5, 0.3, 1 / 3], [0.0, 0.5, 1 / 3]])
    # An exact tie in the logits is won by the first class, as argmax decides.
    mask = torch.tensor([1, 2, 0])
    q = quantize_probabilities(probs, mask)
    assert q.sum(dim=0).tolist() == [255, 255, 255]
    assert q.argmax(dim=0).tolist() == [1, 2, 0]
    assert q[:, 0].tolist() == [127, 128, 0]


def test_quantized_probabilities_of_a_near_uniform_pixel_keep_the_argmax():
    # float32 thirds times 255 round to exactly 85 each: the floors already sum to 255.
    probs = torch.full((3, 4), 1 / 3, dtype=torch.float32)
    for winner in range(3):
        mask = torch.full((4,), winner)
        q = quantize_probabilities(probs, mask)
        assert q.sum(dim=0).tolist() == [255] * 4
        assert q.argmax(dim=0).tolist() == [winner] * 4, q[:, 0].tolist()


def test_nodata_rows_become_ignore_index(rng):
    image = rng.integers(0, 256, (200, 150, 3), dtype=np.uint8)
    valid = np.ones((200, 150), dtype=bool)
    valid[50:120, 10:40] = False
    result = predict(
        ArrayRaster(image, valid),
        TileModel(),
        num_classes=NUM_CLASSES,
        tiling=Tiling(64, 16),
        probabilities=True,
        ignore_index=255,
    )
    assert (result.mask[~valid] == 255).all() and (result.mask[valid] < 3).all()
    assert result.probabilities is not None
    assert (result.probabilities[:, ~valid] == 0).all()


def test_wrong_logits_shape_is_an_error(rng):
    image = rng.integers(0, 256, (100, 100, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="logits of shape"):
        predict(image, lambda b: torch.zeros((b.shape[0], 2, 8, 8)), num_classes=3)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"tile": 50}, "multiple of 32"),
        ({"tile": 64, "overlap": 64}, "overlap"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_tiling_is_refused(args, message):
    with pytest.raises(ValueError, match=message):
        Tiling(**args)


PIXEL_CLASSES = 5


def pixel_class(batch: torch.Tensor) -> torch.Tensor:
    """The "true" class of each pixel, from its own values: (N,3,h,w) uint8 -> (N,h,w)."""
    return (batch[:, 0].long() + 2 * batch[:, 1].long() + 3 * batch[:, 2].long()) % PIXEL_CLASSES


class PixelwiseModel:
    """A stand-in model whose logits are the one-hot of :func:`pixel_class`, so the right mask
    is known exactly; it records what it was given."""

    def __init__(self) -> None:
        self.calls: list[torch.Tensor] = []

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        assert batch.dtype == torch.uint8
        self.calls.append(batch.clone())
        one_hot = torch.nn.functional.one_hot(pixel_class(batch), PIXEL_CLASSES)
        return one_hot.permute(0, 3, 1, 2).float()


def random_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g)


def segment_tiled(
    image: torch.Tensor,
    run,
    *,
    num_classes: int,
    tile: int = 512,
    overlap: int = 64,
    batch_size: int = 4,
) -> torch.Tensor:
    """``(3, H, W)`` uint8 through :func:`shared.pipeline.predict` -> ``(H, W)`` uint8."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
    rgb = image.permute(1, 2, 0).numpy()
    tiling = Tiling(tile, overlap, batch_size)
    return torch.from_numpy(predict(rgb, run, num_classes=num_classes, tiling=tiling).mask)


# -- tiles seen by the model, through a pixelwise stand-in --------------------------------------


@pytest.mark.parametrize(
    ("height", "width"),
    [(1, 1), (7, 13), (32, 32), (50, 64), (64, 64), (65, 64), (64, 200), (200, 9), (513, 1030)],
)
def test_tiled_equals_untiled_for_pixelwise_model(height: int, width: int) -> None:
    image = random_image(height, width)
    model = PixelwiseModel()

    mask = segment_tiled(image, model, num_classes=PIXEL_CLASSES, tile=64, overlap=16, batch_size=3)

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

    segment_tiled(image, model, num_classes=PIXEL_CLASSES, tile=64, overlap=16)

    assert len(model.calls) == 1
    (seen,) = model.calls
    assert seen.shape == (1, 3, *padded)
    # The original pixels reach the model untouched, at their own positions.
    assert torch.equal(seen[0, :, :height, :width], image)


def test_large_images_go_in_bounded_batches_of_full_tiles() -> None:
    image = random_image(300, 170, seed=2)
    model = PixelwiseModel()

    segment_tiled(image, model, num_classes=PIXEL_CLASSES, tile=64, overlap=16, batch_size=4)

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
    mask = segment_tiled(image, model, num_classes=PIXEL_CLASSES, tile=64, overlap=16)
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
def test_bad_tiling_arguments(kwargs: dict, message: str) -> None:
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
        segment_tiled(image, PixelwiseModel(), num_classes=PIXEL_CLASSES)
