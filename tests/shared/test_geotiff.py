"""GeoTIFF reading (bands, scaling, limits, errors) and mask writing, georeferencing kept."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from PIL import Image
from rasterio.control import GroundControlPoint
from rasterio.crs import CRS
from rasterio.io import MemoryFile
from rasterio.transform import Affine

from shared.geotiff import (
    GeoImage,
    RasterOptionError,
    Scale,
    decode_raster,
    is_geotiff,
    is_tiff,
    mask_invalid,
    parse_bands,
    parse_scale,
    read_geotiff,
)
from shared.imaging import (
    CorruptImageError,
    EmptyImageError,
    ImageTooLargeError,
    UnsupportedFormatError,
)
from tests.geodata import (
    PIXELS_PER_DEGREE,
    TILE_COL,
    TILE_ROW,
    TILE_TRANSFORM,
    bluemarble_tile,
    geotiff_bytes,
)


@pytest.fixture(scope="module", name="bluemarble_tile")
def bluemarble_tile_fixture() -> np.ndarray:
    return bluemarble_tile()


# -- reading -----------------------------------------------------------------------------------


def test_bundled_tile_round_trip_keeps_pixels_and_georeferencing(bluemarble_tile):
    # The transform follows from the tile's place in the mosaic: 1/15 degree pixels from 10E 45N.
    assert TILE_COL / PIXELS_PER_DEGREE - 180 == 10.0
    assert 90 - TILE_ROW / PIXELS_PER_DEGREE == 45.0
    data = geotiff_bytes(bluemarble_tile.transpose(2, 0, 1).copy(), compress="deflate")

    assert is_tiff(data) and is_geotiff(data)
    image = read_geotiff(data)

    np.testing.assert_array_equal(image.rgb, bluemarble_tile)
    assert image.rgb.dtype == np.uint8 and image.rgb.shape == (64, 96, 3)
    assert image.crs == CRS.from_epsg(4326)
    assert image.transform == TILE_TRANSFORM
    assert (image.width, image.height) == (96, 64)
    assert image.georeferenced and image.valid is None
    assert image.bands == (1, 2, 3) and image.dtype == "uint8"
    # Bottom-right corner of the tile: 96/15 = 6.4 degrees east, 64/15 degrees south.
    east, south = image.transform @ (96, 64)
    assert east == pytest.approx(16.4) and south == pytest.approx(45 - 64 / 15)


def test_uint16_four_bands_chosen_and_scaled_by_a_fixed_range():
    h, w = 2, 4
    bands = np.zeros((4, h, w), dtype=np.uint16)
    bands[3] = [[0, 500, 1000, 2000], [250, 750, 1000, 0]]  # band 4 -> R
    bands[2] = 1000  # band 3 -> G
    bands[1] = 0  # band 2 -> B
    bands[0] = 60000  # band 1 is not used
    image = read_geotiff(geotiff_bytes(bands), bands="4,3,2", scale="0,1000")

    assert image.bands == (4, 3, 2) and image.dtype == "uint16"
    # round(255 * v / 1000), clipped: 500 -> 127.5 -> 128 (round half to even), 2000 -> 255.
    np.testing.assert_array_equal(image.rgb[:, :, 0], [[0, 128, 255, 255], [64, 191, 255, 0]])
    assert (image.rgb[:, :, 1] == 255).all() and (image.rgb[:, :, 2] == 0).all()
    assert image.stretch == ((0.0, 1000.0),) * 3


def test_uint16_auto_is_a_per_band_2_98_percentile_stretch():
    ramp = np.arange(100, dtype=np.uint16).reshape(10, 10) * 10  # 0, 10, ..., 990
    bands = np.stack([ramp, ramp + 5000, np.full_like(ramp, 7)])
    image = read_geotiff(geotiff_bytes(bands))

    # numpy's linear percentiles of 0..990 step 10: p2 = 19.8, p98 = 970.2.
    low, high = image.stretch[0]
    assert (low, high) == pytest.approx((19.8, 970.2))
    assert image.stretch[1] == pytest.approx((5019.8, 5970.2))  # each band its own range
    red = image.rgb[:, :, 0]
    assert red[0, 0] == 0 and red[0, 1] == 0  # 0 and 10 lie below p2
    assert red[9, 9] == 255 and red[9, 8] == 255  # 990 and 980 lie above p98
    assert red[5, 0] == round(255 * (500 - 19.8) / (970.2 - 19.8))  # 129
    np.testing.assert_array_equal(image.rgb[:, :, 1], red)  # same shape of values
    assert (image.rgb[:, :, 2] == 0).all()  # a constant band has nothing to stretch


def test_uint8_passes_through_unless_a_scale_is_asked_for():
    values = np.array([[[10, 20, 30]]], dtype=np.uint8).repeat(3, axis=0)
    assert read_geotiff(geotiff_bytes(values)).rgb[0].tolist() == [
        [10, 10, 10],
        [20, 20, 20],
        [30] * 3,
    ]
    stretched = read_geotiff(geotiff_bytes(values), scale="minmax")
    assert stretched.rgb[0, :, 0].tolist() == [0, 128, 255]  # 10..30 -> 0..255


def test_one_band_is_grey_and_a_chosen_single_band_too():
    grey = np.array([[[0, 100, 255]]], dtype=np.uint8)
    image = read_geotiff(geotiff_bytes(grey))
    assert image.rgb[0].tolist() == [[0, 0, 0], [100, 100, 100], [255, 255, 255]]
    assert image.bands == (1, 1, 1)

    four = np.stack([np.full((1, 2), v, dtype=np.uint8) for v in (1, 2, 3, 4)])
    assert read_geotiff(geotiff_bytes(four), bands=(4,)).rgb[0, 0].tolist() == [4, 4, 4]
    assert read_geotiff(geotiff_bytes(four)).rgb[0, 0].tolist() == [1, 2, 3]


def test_nodata_is_reported_left_out_of_statistics_and_zero():
    band = np.array([[0, 0, 1000, 2000]], dtype=np.uint16)
    image = read_geotiff(geotiff_bytes(np.stack([band] * 3), nodata=0), scale="minmax")
    assert image.valid is not None
    assert image.valid.tolist() == [[False, False, True, True]]
    assert image.stretch[0] == (1000.0, 2000.0)  # not 0..2000
    assert image.rgb[0, :, 0].tolist() == [0, 0, 0, 255]


def test_float_nan_pixels_are_invalid_without_warnings():
    band = np.array([[np.nan, 0.0, 0.5, 1.0]], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # nodata=none: NaN is nodata under every rule; the edge zero stays valid.
        image = read_geotiff(geotiff_bytes(np.stack([band] * 3)), scale="0,1", nodata="none")
    assert image.valid.tolist() == [[False, True, True, True]]
    assert image.rgb[0, :, 0].tolist() == [0, 0, 128, 255]


def test_plain_tiff_reads_but_is_not_georeferenced():
    buffer = io.BytesIO()
    Image.fromarray(np.full((3, 5, 3), 9, dtype=np.uint8)).save(buffer, format="TIFF")
    data = buffer.getvalue()
    assert is_tiff(data) and not is_geotiff(data)
    image = read_geotiff(data)
    assert image.rgb.shape == (3, 5, 3) and (image.rgb == 9).all()
    assert not image.georeferenced and image.crs is None


def _tiff_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF")
    return buffer.getvalue()


def test_plain_palette_and_one_bit_tiffs_decode_to_their_colours():
    palette = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), mode="P")
    palette.putpalette([200, 10, 20, 5, 250, 30] + [0] * 762)
    rgb, geo = decode_raster(_tiff_bytes(palette))
    assert geo is None
    assert rgb[0, 0].tolist() == [200, 10, 20] and rgb[0, 1].tolist() == [5, 250, 30]

    one_bit = Image.fromarray(np.array([[True, False]])).convert("1")
    rgb, _ = decode_raster(_tiff_bytes(one_bit))
    assert rgb[0, 0].tolist() == [255, 255, 255] and rgb[0, 1].tolist() == [0, 0, 0]


def test_plain_tiff_with_many_bands_goes_through_rasterio():
    with MemoryFile() as memory:
        with memory.open(driver="GTiff", width=4, height=2, count=5, dtype="uint8") as dst:
            dst.write(np.arange(5, dtype=np.uint8)[:, None, None].repeat(2, 1).repeat(4, 2) * 50)
        data = memory.read()
    rgb, geo = decode_raster(data, bands="5,4,3")
    assert geo is not None and rgb[0, 0].tolist() == [200, 150, 100]


def test_is_geotiff_is_false_for_anything_else():
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    for data in (b"", b"II", buffer.getvalue(), b"II*\x00" + b"\xff" * 64, b"hello world"):
        assert not is_geotiff(data)


# -- limits and errors -------------------------------------------------------------------------


def test_header_claiming_two_gigapixels_is_refused_before_reading():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with MemoryFile() as memfile:
            # sparse_ok: no pixel data is written, so the file is a few hundred bytes.
            with memfile.open(
                driver="GTiff",
                width=50_000,
                height=40_000,
                count=1,
                dtype="uint8",
                sparse_ok=True,
                blockysize=40_000,  # one strip: a single offset in the header
                crs="EPSG:4326",
                transform=TILE_TRANSFORM,
            ):
                pass
            data = memfile.read()
    assert len(data) < 10_000
    with pytest.raises(ImageTooLargeError, match="50000x40000") as info:
        read_geotiff(data)
    assert info.value.status == 413


def test_pixel_cap_counts_width_times_height():
    data = geotiff_bytes(np.zeros((3, 10, 10), dtype=np.uint8))
    assert read_geotiff(data, max_pixels=100).rgb.shape == (10, 10, 3)
    with pytest.raises(ImageTooLargeError, match="the limit is 99"):
        read_geotiff(data, max_pixels=99)


def test_broken_input_raises_typed_errors():
    data = geotiff_bytes(np.ones((3, 64, 64), dtype=np.uint16))
    with pytest.raises(EmptyImageError):
        read_geotiff(b"")
    with pytest.raises(CorruptImageError, match="cannot read the TIFF") as info:
        read_geotiff(data[: len(data) // 2])  # pixel data cut off
    assert "vsimem" not in str(info.value)
    with pytest.raises(CorruptImageError):
        read_geotiff(data[:100])  # header cut off
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    with pytest.raises(UnsupportedFormatError) as info:
        read_geotiff(buffer.getvalue())
    assert info.value.status == 415


def test_bands_the_file_lacks_are_a_422():
    data = geotiff_bytes(np.zeros((3, 2, 2), dtype=np.uint8))
    with pytest.raises(
        RasterOptionError, match="band 4 asked for but the file has 3 bands"
    ) as info:
        read_geotiff(data, bands="4,3,2")
    assert info.value.status == 422 and info.value.code == "invalid_raster_option"


@pytest.mark.parametrize(
    ("text", "expected"),
    [(None, None), ("", None), ("4,3,2", (4, 3, 2)), (" 2 ", (2,)), ([3, 2, 1], (3, 2, 1))],
)
def test_parse_bands(text, expected):
    assert parse_bands(text) == expected


@pytest.mark.parametrize("text", ["1,2", "0,1,2", "-1", "a,b,c", "1,2,3,4", "1;2;3"])
def test_parse_bands_rejects(text):
    with pytest.raises(RasterOptionError):
        parse_bands(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, Scale("auto")),
        ("auto", Scale("auto")),
        ("MinMax", Scale("minmax")),
        ("percentile", Scale("percentile", 2.0, 98.0)),
        ("percentile:1,99", Scale("percentile", 1.0, 99.0)),
        ("0,3000", Scale("range", 0.0, 3000.0)),
        ("-1.5,2e3", Scale("range", -1.5, 2000.0)),
    ],
)
def test_parse_scale(text, expected):
    assert parse_scale(text) == expected


@pytest.mark.parametrize(
    "text",
    ["stretch", "3000", "10,5", "5,5", "percentile:-1,50", "percentile:2,101", "0,inf", "nan,1"],
)
def test_parse_scale_rejects(text):
    with pytest.raises(RasterOptionError):
        parse_scale(text)


def test_ground_control_points_are_read():
    gcps = [
        GroundControlPoint(row=0, col=0, x=10.0, y=45.0, id="1"),
        GroundControlPoint(row=0, col=4, x=10.4, y=45.0, id="2"),
        GroundControlPoint(row=2, col=0, x=10.0, y=44.8, id="3"),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with MemoryFile() as memfile:
            with memfile.open(driver="GTiff", width=4, height=2, count=3, dtype="uint8") as dst:
                dst.gcps = (gcps, CRS.from_epsg(4326))
                dst.write(np.zeros((3, 2, 4), dtype=np.uint8))
            data = memfile.read()
    image = read_geotiff(data)
    assert image.georeferenced and image.gcps_crs == CRS.from_epsg(4326)
    placed = [(p.row, p.col, p.x, p.y) for p in gcps]
    assert [(p.row, p.col, p.x, p.y) for p in image.gcps] == placed


# -- dispatch and nodata -----------------------------------------------------------------------


def test_decode_raster_sends_tiffs_to_rasterio_and_the_rest_to_pil(bluemarble_tile):
    buffer = io.BytesIO()
    Image.fromarray(bluemarble_tile).save(buffer, format="PNG")
    rgb, geo = decode_raster(buffer.getvalue(), bands="3,2,1")  # bands only apply to TIFFs
    assert geo is None
    np.testing.assert_array_equal(rgb, bluemarble_tile)

    tiff = geotiff_bytes(bluemarble_tile.transpose(2, 0, 1).copy())
    rgb, geo = decode_raster(tiff, bands="3,2,1")
    assert geo is not None and geo.crs == CRS.from_epsg(4326)
    np.testing.assert_array_equal(rgb, bluemarble_tile[:, :, ::-1])

    with pytest.raises(RasterOptionError):  # checked whatever the format
        decode_raster(buffer.getvalue(), scale="loud")


def test_mask_invalid_fills_only_nodata_pixels():
    mask = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    everywhere = GeoImage(rgb=rgb, crs=None, transform=Affine.identity())
    assert mask_invalid(mask, None, 255) is mask
    assert mask_invalid(mask, everywhere, 255) is mask
    holes = GeoImage(
        rgb=rgb,
        crs=None,
        transform=Affine.identity(),
        valid=np.array([[True, False], [True, True]]),
    )
    assert mask_invalid(mask, holes, 255).tolist() == [[0, 255], [2, 1]]
    assert mask.tolist() == [[0, 1], [2, 1]]  # the input is left alone
