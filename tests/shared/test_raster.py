"""The windowed reader's nodata: the one rule of ``shared.bands``, with the scene's collar in
every window (traced once per scene), a value only where every band holds it."""

from __future__ import annotations

import numpy as np
import pytest

import shared.bands
from shared.bands import Band, BandSpec
from shared.raster import BandMismatchError, GdalRaster, open_for_model
from tests.geodata import S2_BAND_NAMES, geotiff_bytes, sentinel2_like_scene

SPEC = BandSpec(tuple(Band(n, i) for i, n in enumerate(S2_BAND_NAMES, start=1)), "uint16")


def with_lake(scene: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The scene with a 6 x 8 all-zero 'lake' in the middle of its footprint (valid data)."""
    scene = scene.copy()
    lake = np.zeros(scene.shape[1:], dtype=bool)
    lake[28:34, 44:52] = True
    scene[:, lake] = 0
    return scene, lake


def valid_of(raster: GdalRaster, row: int, col: int, h: int, w: int) -> np.ndarray:
    rows = raster.read_window(row, col, h, w)
    return np.ones(rows.rgb.shape[:2], bool) if rows.valid is None else rows.valid


@pytest.mark.parametrize(
    "window", [(0, 0, 64, 96), (28, 44, 10, 12), (0, 0, 20, 30), (30, 60, 34, 36)]
)
def test_every_window_gets_the_scene_collar_and_keeps_inner_zeros(window):
    bands, footprint = sentinel2_like_scene()
    bands, lake = with_lake(bands)
    row, col, h, w = window
    with open_for_model(geotiff_bytes(bands), SPEC) as raster:
        valid = valid_of(raster, row, col, h, w)
    # Within the (28, 44, 10, 12) window the lake touches the window's edge: traced per window
    # it would be taken for collar; the scene's collar leaves it valid.
    np.testing.assert_array_equal(valid, footprint[row : row + h, col : col + w])
    assert valid[lake[row : row + h, col : col + w]].all()


def test_the_collar_traced_on_an_overview_is_exact_away_from_its_edge(monkeypatch):
    # 64 x 96 over a 1000-pixel budget: the collar is traced on a 3x-decimated overview.
    monkeypatch.setattr(shared.bands, "COLLAR_MAX_PIXELS", 1000)
    bands, footprint = sentinel2_like_scene()
    bands, lake = with_lake(bands)
    with open_for_model(geotiff_bytes(bands), SPEC) as raster:
        assert raster._collar is not None and raster._collar.cells.shape == (22, 32)
        valid = valid_of(raster, 0, 0, 64, 96)
    assert valid[lake].all()  # more than a cell from the collar: still valid
    np.testing.assert_array_equal(valid, footprint)  # every all-zero collar pixel is found


def test_a_value_is_nodata_only_where_every_band_holds_it():
    bands = np.full((3, 4, 4), 50, dtype=np.uint8)
    bands[:, 1, 1] = 0  # every band 0: nodata
    bands[0, 2, 2] = 0  # pure-ish cyan: one band 0, valid
    with GdalRaster(geotiff_bytes(bands, nodata=0)) as raster:
        valid = valid_of(raster, 0, 0, 4, 4)
    expected = np.ones((4, 4), bool)
    expected[1, 1] = False
    np.testing.assert_array_equal(valid, expected)


def test_nodata_none_keeps_the_collar_and_a_value_replaces_the_tag():
    bands, footprint = sentinel2_like_scene()
    data = geotiff_bytes(bands)
    with open_for_model(data, SPEC, nodata="none") as raster:
        assert raster.read_window(0, 0, 64, 96).valid is None and not raster.has_nodata
    with open_for_model(data, SPEC, nodata=0) as raster:
        np.testing.assert_array_equal(valid_of(raster, 0, 0, 64, 96), footprint)


def test_model_bands_are_read_as_values_with_nodata_at_the_fill():
    bands, footprint = sentinel2_like_scene()
    fill = [float(v) for v in range(100, 106)]
    with open_for_model(geotiff_bytes(bands), SPEC, fill=fill, bands=[6, 5, 4, 3, 2, 1]) as r:
        pixels = r.read_window(0, 0, 64, 96).pixels
    assert pixels is not None and pixels.dtype == np.float32 and pixels.shape == (64, 96, 6)
    np.testing.assert_array_equal(pixels[footprint], bands[::-1].transpose(1, 2, 0)[footprint])
    np.testing.assert_array_equal(
        pixels[~footprint], np.broadcast_to(fill, pixels[~footprint].shape)
    )


def test_a_raster_without_the_model_bands_names_them():
    bands, _ = sentinel2_like_scene()
    with pytest.raises(BandMismatchError, match=r"6 bands \(B02 blue.*the image has 4 bands"):
        open_for_model(geotiff_bytes(bands[:4].copy()), SPEC)


def test_ground_sample_distance_in_metres_for_projected_and_geographic_rasters():
    from rasterio.crs import CRS
    from rasterio.transform import Affine

    from shared.raster import Georef, ground_sample_distance

    utm = Georef(CRS.from_epsg(32633), Affine(30, 0, 5e5, 0, -30, 5e6))
    assert ground_sample_distance(utm, 100, 100) == pytest.approx(30.0)
    # 1/15 degree at the equator: 111.32 km / 15 = 7.42 km (the Blue Marble mosaic's pixels).
    equator = Georef(CRS.from_epsg(4326), Affine(1 / 15, 0, 0, 0, -1 / 15, 1 / 30))
    assert ground_sample_distance(equator, 1, 1) == pytest.approx(7421, rel=1e-3)
    assert ground_sample_distance(Georef(), 10, 10) is None


def test_scale_warning_past_four_times_either_way():
    from shared.raster import scale_warning

    assert scale_warning(30.0, 30.0 * 3.9) is None and scale_warning(30.0, 30.0 / 3.9) is None
    assert "121 m" in scale_warning(30.0, 121.0) and scale_warning(30.0, 7.4) is not None
    assert scale_warning(None, 30.0) is None and scale_warning(30.0, None) is None
