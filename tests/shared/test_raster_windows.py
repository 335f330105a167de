"""Windowed reading: bands of rows of a GeoTIFF equal the whole raster read at once, with one
stretch for every window, nodata carried, and the right reader for each kind of file."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from shared.geotiff import read_geotiff
from shared.imaging import ImageTooLargeError
from shared.raster import ArrayRaster, GdalRaster, open_file
from tests.geodata import TILE_TRANSFORM, geotiff_bytes


def uint16_scene(rng: np.random.Generator, height: int = 90, width: int = 70) -> np.ndarray:
    bands = rng.integers(100, 4000, (4, height, width), dtype=np.uint16)
    bands[:, 10:14, 20:30] = 0  # nodata
    return bands


def rows_of(source, step: int) -> tuple[np.ndarray, np.ndarray]:
    rgb, valid = [], []
    for top in range(0, source.height, step):
        rows = source.read_rows(top, step)
        rgb.append(rows.rgb)
        valid.append(np.ones(rows.rgb.shape[:2], bool) if rows.valid is None else rows.valid)
    return np.concatenate(rgb), np.concatenate(valid)


@pytest.mark.parametrize("scale", ["auto", "minmax", "0,3000"])
def test_bands_of_rows_equal_the_whole_read(tmp_path, rng, scale):
    data = geotiff_bytes(uint16_scene(rng), nodata=0, compress="lzw")
    path = tmp_path / "s2.tif"
    path.write_bytes(data)
    whole = read_geotiff(data, bands="4,3,2", scale=scale)
    with GdalRaster(path, bands="4,3,2", scale=scale) as raster:
        assert (raster.height, raster.width) == (90, 70)
        assert raster.georef.transform == TILE_TRANSFORM and raster.has_nodata
        rgb, valid = rows_of(raster, 16)  # windows that do not divide the height
        assert raster.stretch == whole.stretch
    np.testing.assert_array_equal(rgb, whole.rgb)
    assert whole.valid is not None
    np.testing.assert_array_equal(valid, whole.valid)
    assert not valid[10:14, 20:30].any() and valid.sum() == 90 * 70 - 40


def test_stretch_comes_from_the_whole_raster_not_each_window(tmp_path):
    # The top half is dark and the bottom bright: a per-window stretch would make both full range.
    bands = np.zeros((3, 64, 32), dtype=np.uint16)
    bands[:, :32] = 1000
    bands[:, 32:] = 3000
    path = tmp_path / "halves.tif"
    path.write_bytes(geotiff_bytes(bands))
    with GdalRaster(path, scale="minmax") as raster:
        top = raster.read_rows(0, 32).rgb
        bottom = raster.read_rows(32, 32).rgb
    assert (top == 0).all() and (bottom == 255).all()


def test_open_file_picks_the_reader(tmp_path, rng):
    picture = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(picture).save(tmp_path / "a.png")
    source = open_file(tmp_path / "a.png")
    assert isinstance(source, ArrayRaster)
    np.testing.assert_array_equal(source.read_rows(0, 20).rgb, picture)

    (tmp_path / "geo.tif").write_bytes(geotiff_bytes(picture.transpose(2, 0, 1).copy()))
    source = open_file(tmp_path / "geo.tif")
    assert isinstance(source, GdalRaster) and source.georef.georeferenced
    np.testing.assert_array_equal(source.read_rows(5, 10).rgb, picture[5:15])
    source.close()

    plain = geotiff_bytes(picture.transpose(2, 0, 1).copy(), crs=None, transform=None)
    (tmp_path / "plain.tif").write_bytes(plain)
    assert isinstance(open_file(tmp_path / "plain.tif"), ArrayRaster)


def test_pictures_keep_the_pixel_cap_but_rasters_are_streamed(tmp_path, rng):
    picture = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(picture).save(tmp_path / "a.png")
    with pytest.raises(ImageTooLargeError):
        open_file(tmp_path / "a.png", max_pixels=100)
    (tmp_path / "geo.tif").write_bytes(geotiff_bytes(picture.transpose(2, 0, 1).copy()))
    with open_file(tmp_path / "geo.tif", max_pixels=100) as raster:  # type: ignore[attr-defined]
        assert raster.height == 40


def test_a_raster_opened_in_one_thread_is_read_and_closed_in_another(tmp_path, rng):
    from concurrent.futures import ThreadPoolExecutor

    bands = rng.integers(0, 256, (3, 30, 20), dtype=np.uint8)
    path = tmp_path / "geo.tif"
    path.write_bytes(geotiff_bytes(bands))
    with ThreadPoolExecutor(1) as pool:
        raster = pool.submit(GdalRaster, path).result()
    np.testing.assert_array_equal(raster.read_rows(0, 30).rgb, bands.transpose(1, 2, 0))
    raster.close()


@pytest.mark.parametrize("kind", ["rgb", "model"])
def test_a_wide_window_is_read_in_column_chunks_that_join_to_one_read(
    tmp_path, rng, monkeypatch, kind
):
    # Memory for a read grows with the chunk, not the scene's width; the joined rows (RGB,
    # validity with the scene's collar and an inner hole, a model's band values) are those of
    # one read of the whole window.
    from rasterio.io import DatasetReader

    from shared import raster as raster_module
    from shared.raster import open_for_model
    from tests.shared.test_raster import SPEC

    count = 3 if kind == "rgb" else SPEC.count
    bands = rng.integers(1, 4000, (count, 40, 1300), dtype=np.uint16)
    bands[:, :, :30] = 0  # the fill collar on the left edge
    bands[:, 5:9, 600:700] = 0  # an inner hole across a chunk boundary: valid (not the collar)
    bands[:, 20:25, 1000:1100] = 0
    path = tmp_path / "wide.tif"
    path.write_bytes(geotiff_bytes(bands, compress="lzw"))

    def read(chunk_pixels: int, widths: list[int]):
        monkeypatch.setattr(raster_module, "READ_CHUNK_PIXELS", chunk_pixels)
        real = DatasetReader.read

        def spy(self, *args, **kwargs):
            if kwargs.get("window") is not None:
                widths.append(int(kwargs["window"].width))
            return real(self, *args, **kwargs)

        monkeypatch.setattr(DatasetReader, "read", spy)
        opened = GdalRaster(path) if kind == "rgb" else open_for_model(path, SPEC)
        with opened as source:
            rows = source.read_rows(3, 30)
        monkeypatch.setattr(DatasetReader, "read", real)
        return rows

    whole_widths: list[int] = []
    whole = read(10**9, whole_widths)
    assert whole_widths and max(whole_widths) == 1300
    chunk_widths: list[int] = []
    chunked = read(30 * 512, chunk_widths)  # 30 rows: 512 columns per read
    assert chunk_widths and max(chunk_widths) <= 512 and sum(chunk_widths) >= 1300
    np.testing.assert_array_equal(chunked.rgb, whole.rgb)
    assert whole.valid is not None and chunked.valid is not None
    np.testing.assert_array_equal(chunked.valid, whole.valid)
    assert not chunked.valid[:, :30].any() and chunked.valid[2:6, 600:700].all()
    if kind == "model":
        assert whole.pixels is not None and chunked.pixels is not None
        np.testing.assert_array_equal(chunked.pixels, whole.pixels)
