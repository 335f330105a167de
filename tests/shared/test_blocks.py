"""Blocks of a scene: cores tile the scene, and each core equals the whole scene's result."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch

from shared.blocks import plan_blocks, segment_block
from shared.pipeline import Tiling, predict
from shared.raster import ArrayRaster, GdalRaster


def fake_run(batch: torch.Tensor) -> torch.Tensor:
    """3-class logits that depend on every pixel of a tile (its mean), on the pixel and on
    the place within the tile, so that a block reading the wrong tiles gets other numbers."""
    x = batch.float() / 255.0
    n, _, h, w = x.shape
    mean = x.mean(dim=(1, 2, 3)).view(n, 1, 1, 1)
    ramp = torch.linspace(-1.0, 1.0, w).view(1, 1, 1, w) * torch.linspace(1.0, 0.5, h).view(
        1, 1, h, 1
    )
    return torch.cat([x[:, :1] + mean, x[:, 1:2] * 1.3 - ramp, x[:, 2:] * 0.7 + mean * ramp], 1)


@pytest.mark.parametrize(
    ("tiling", "block_size"),
    [
        (Tiling(128, 32, 3), 200),
        (Tiling(64, 40, 2), 100),  # overlap over half a tile: the halo is more than one tile
        (Tiling(96, 0, 4), 150),
    ],
)
def test_block_cores_equal_the_whole_scene_bit_for_bit(rng, tiling, block_size):
    height, width = 333, 517
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    valid = rng.random((height, width)) > 0.05
    scene = ArrayRaster(rgb, valid)
    whole = predict(scene, fake_run, num_classes=3, tiling=tiling, probabilities=True)

    blocks = plan_blocks(height, width, tiling, block_size)
    assert len(blocks) > 4
    covered = np.zeros((height, width), dtype=np.int32)
    for block in blocks:
        core, read = block.core, block.read
        rows = scene.read_window(read.row, read.col, read.height, read.width)
        part = segment_block(
            rows, block, fake_run, num_classes=3, tiling=tiling, probabilities=True
        )
        window = np.s_[core.row : core.row + core.height, core.col : core.col + core.width]
        np.testing.assert_array_equal(part.mask, whole.mask[window])
        assert part.probabilities is not None and whole.probabilities is not None
        np.testing.assert_array_equal(
            part.probabilities, whole.probabilities[(slice(None), *window)]
        )
        covered[window] += 1
        # The halo stays within one tile grid of the core, never the whole scene.
        assert read.pixels < height * width
    np.testing.assert_array_equal(covered, 1)


def test_a_block_without_its_halo_would_differ(rng):
    """The oracle above can tell: cutting a core out of a read window that lacks the tiles
    before it gives other pixels."""
    tiling = Tiling(128, 32, 3)
    rgb = rng.integers(0, 256, (300, 600, 3), dtype=np.uint8)
    whole = predict(rgb, fake_run, num_classes=3, tiling=tiling).mask
    block = plan_blocks(300, 600, tiling, 200)[1]
    assert block.read.col < block.core.col
    core = block.core
    alone = predict(
        rgb[:, core.col : core.col + core.width + 64], fake_run, num_classes=3, tiling=tiling
    ).mask
    assert (
        alone[: core.height, : core.width] != whole[: core.height, core.col :][:, : core.width]
    ).any()


def test_small_scene_is_one_block_and_thin_scene_is_cut_one_way():
    tiling = Tiling(128, 32, 1)
    assert [b.read for b in plan_blocks(100, 120, tiling, 4096)] == [
        plan_blocks(100, 120, tiling, 4096)[0].core
    ]
    thin = plan_blocks(100, 2000, tiling, 300)
    assert all(b.read.row == 0 and b.read.height == 100 for b in thin)
    assert len(thin) > 2


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="empty"):
        plan_blocks(0, 10, Tiling(), 100)
    with pytest.raises(ValueError, match="block size"):
        plan_blocks(10, 10, Tiling(), 0)
    block = plan_blocks(1000, 1000, Tiling(128, 32, 1), 200)[0]
    rows = ArrayRaster(np.zeros((10, 10, 3), np.uint8)).read_rows(0, 10)
    with pytest.raises(ValueError, match="reads"):
        segment_block(rows, block, fake_run, num_classes=3, tiling=Tiling(128, 32, 1))


def test_gdal_window_equals_the_same_pixels_of_whole_rows(tmp_path, rng):
    """A window of a uint16 scene with nodata is scaled with the scene's stretch (not its own)
    and carries its nodata, as the full-width rows do."""
    values = rng.integers(100, 4000, (3, 90, 140), dtype=np.uint16)
    values[:, 10:20, 30:50] = 0
    path = tmp_path / "scene.tif"
    profile = dict(driver="GTiff", width=140, height=90, count=3, dtype="uint16", nodata=0)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(values)
    with GdalRaster(path) as raster:
        rows = raster.read_rows(5, 40)
        window = raster.read_window(5, 25, 40, 60)
        clipped = raster.read_window(80, 120, 50, 50)
    np.testing.assert_array_equal(window.rgb, rows.rgb[:, 25:85])
    assert window.valid is not None and rows.valid is not None
    np.testing.assert_array_equal(window.valid, rows.valid[:, 25:85])
    assert not window.valid.all()
    assert clipped.rgb.shape == (10, 20, 3)
