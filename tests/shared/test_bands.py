from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch
from rasterio.io import MemoryFile

from shared.bands import (
    Band,
    BandError,
    BandSpec,
    band_names,
    edge_connected,
    nodata_mask,
    parse_nodata,
    raster_nodata_inputs,
    resolve_bands,
)
from tests.geodata import (
    S2_BAND_NAMES,
    TILE_TRANSFORM,
    bluemarble_tile,
    geotiff_bytes,
    sentinel2_like_scene,
)

S2_DESCRIPTIONS = S2_BAND_NAMES


# --------------------------------------------------------------------------- BandSpec


def test_spec_round_trips_through_a_weights_only_checkpoint(tmp_path):
    spec = resolve_bands([4, "b04 red", 2], S2_DESCRIPTIONS, dtype="uint16", nodata="0")
    path = tmp_path / "spec.pt"
    torch.save({"bands": spec.to_dict()}, path)
    loaded = BandSpec.from_dict(torch.load(path, weights_only=True)["bands"])
    assert loaded == spec
    assert loaded.indexes == (4, 3, 2)
    assert loaded.names == ("B08 nir", "B04 red", "B03 green")
    assert loaded.nodata == 0.0 and loaded.dtype == "uint16" and loaded.count == 3


def test_rgb_default_is_imagenet_case():
    assert BandSpec.rgb().is_rgb8()
    assert BandSpec.rgb().indexes == (1, 2, 3)
    assert not BandSpec((Band("red", 1), Band("green", 2), Band("blue", 3)), "uint16").is_rgb8()
    assert not BandSpec((Band("blue", 3), Band("green", 2), Band("red", 1))).is_rgb8()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"bands": []}, "at least one band"),
        ({"bands": [{"name": "a", "index": 0}]}, "counted from 1"),
        ({"bands": [{"name": "a", "index": 1}, {"name": "b", "index": 1}]}, "selected twice"),
        ({"bands": [{"name": "a", "index": 1}], "dtype": "int64"}, "int64"),
        ({"bands": [{"name": "a", "index": 1}], "nodata": "sometimes"}, "sometimes"),
        ({"bands": [{"index": 1}]}, r"bands\[0\]"),
        ({"dtype": "uint8"}, "'bands' list"),
    ],
)
def test_spec_from_dict_names_the_problem(data, message):
    with pytest.raises(BandError, match=message):
        BandSpec.from_dict(data)


@pytest.mark.parametrize(
    ("text", "rule"),
    [("auto", "auto"), (" NONE ", "none"), ("0", 0.0), ("-9999", -9999.0), (65535, 65535.0)],
)
def test_parse_nodata(text, rule):
    assert parse_nodata(text) == rule


@pytest.mark.parametrize("bad", ["zero", "", True, None, [0]])
def test_parse_nodata_refuses(bad):
    with pytest.raises(BandError, match="nodata must be"):
        parse_nodata(bad)


# --------------------------------------------------------------------------- data.bands


def test_band_names_fall_back_to_colour_then_number():
    names = band_names([None, "", "elevation", None], ["red", "green", "blue", "alpha"])
    assert names == ("red", "green", "elevation", "alpha")
    assert band_names([None, None], None) == ("band_1", "band_2")
    assert band_names([None], ["gray"]) == ("band_1",)


def test_selection_by_index_and_description_keeps_the_order_given():
    spec = resolve_bands(["B04 RED", "b03 green", 1], S2_DESCRIPTIONS, dtype="uint16")
    assert spec.indexes == (3, 2, 1)
    assert spec.names == ("B04 red", "B03 green", "B02 blue")


def test_no_selection_takes_every_band_but_alpha():
    spec = resolve_bands(
        None, [None] * 4, dtype="uint8", colorinterp=["red", "green", "blue", "alpha"]
    )
    assert spec.names == ("red", "green", "blue") and spec.indexes == (1, 2, 3)
    assert spec.is_rgb8()


@pytest.mark.parametrize(
    ("selection", "message"),
    [
        ([7], r"band 7 does not exist: the raster has 6 band\(s\) \(1=B02 blue"),
        ([0], "band 0 does not exist"),
        (["nir"], r"no band is named 'nir'; the raster has bands 1=B02 blue, 2=B03 green"),
        ([2, "B03 green"], "band B03 green is selected more than once"),
        ([], "bands is empty"),
        ("1,2,3", "must be a list"),
        ([1.5], "neither a band number nor a band name"),
    ],
)
def test_bad_selection_names_the_band(selection, message):
    with pytest.raises(BandError, match=message):
        resolve_bands(selection, S2_DESCRIPTIONS, dtype="uint16")


def test_ambiguous_name_asks_for_a_number():
    with pytest.raises(BandError, match=r"ambiguous: bands \[1, 2\]"):
        resolve_bands(["dup"], ["dup", "dup"], dtype="uint8")


def test_unsupported_dtype_is_named():
    with pytest.raises(BandError, match="int32"):
        resolve_bands(None, [None], dtype="int32")


def test_resolves_against_a_real_geotiff():
    tile = bluemarble_tile().transpose(2, 0, 1)
    data = np.concatenate([tile, tile[:1]]).astype(np.uint16)
    # Write descriptions the way a user's tool would, then read them back through rasterio.
    with MemoryFile() as memfile:
        with memfile.open(
            driver="GTiff",
            width=96,
            height=64,
            count=4,
            dtype="uint16",
            crs="EPSG:4326",
            transform=TILE_TRANSFORM,
        ) as dst:
            dst.write(data)
            dst.descriptions = ("red", "green", "blue", "relief")
        with memfile.open() as src:
            spec = resolve_bands(
                ["relief", 1], src.descriptions, dtype=src.dtypes[0], nodata=src.nodata or "auto"
            )
    assert spec.names == ("relief", "red") and spec.indexes == (4, 1)


# --------------------------------------------------------------------------- nodata


def _scene_with_collar() -> np.ndarray:
    """(3, 8, 10) uint16: a rotated-looking footprint with a zero collar and an inner zero lake."""
    rows, cols = np.mgrid[0:8, 0:10]
    inside = (rows + cols >= 3) & (rows + cols <= 13) & (cols - rows <= 7) & (rows - cols <= 4)
    data = np.where(inside, 1000, 0).astype(np.uint16)[None].repeat(3, axis=0)
    data[:, 4, 5] = 0  # a dark pixel inside the scene, not connected to the edge
    data[1, 0, 9] = 7  # one band non-zero in the collar: not "zero in every band"
    return data


def test_auto_marks_the_edge_collar_but_not_inner_zeros():
    data = _scene_with_collar()
    mask = nodata_mask(data, "auto")
    zero = ~data.any(axis=0)
    assert not mask[4, 5], "an interior zero pixel is data"
    assert not mask[0, 9], "a pixel non-zero in one band is data"
    assert mask[0, 0] and mask[7, 0] and mask[0, 8]
    # Oracle: every all-zero pixel except the interior one is collar.
    expected = zero.copy()
    expected[4, 5] = False
    np.testing.assert_array_equal(mask, expected)


def test_none_and_value_override_auto():
    data = _scene_with_collar()
    assert not nodata_mask(data, "none", nodata_value=0).any()
    by_value = nodata_mask(data, 1000.0)
    np.testing.assert_array_equal(by_value, (data == 1000).all(axis=0))
    assert not by_value[0, 0], "VALUE replaces the auto collar"


def test_tag_alpha_and_internal_mask_mark_nodata():
    data = np.full((2, 4, 4), 5, dtype=np.int16)
    data[:, 1, 1] = -9999
    data[0, 2, 2] = -9999  # only one band at the tag value: valid
    alpha = np.full((4, 4), 255, dtype=np.uint8)
    alpha[3, 3] = 0
    internal = np.ones((4, 4), dtype=np.uint8)
    internal[0, 3] = 0
    mask = nodata_mask(data, "auto", nodata_value=-9999, alpha=alpha, internal_mask=internal)
    assert sorted(zip(*np.nonzero(mask), strict=True)) == [(0, 3), (1, 1), (3, 3)]
    # "none" ignores all three; a VALUE replaces the tag but keeps alpha and the mask.
    assert not nodata_mask(data, "none", nodata_value=-9999, alpha=alpha).any()
    by_value = nodata_mask(data, 5.0, nodata_value=-9999, alpha=alpha, internal_mask=internal)
    assert not by_value[1, 1] and by_value[3, 3] and by_value[0, 3] and by_value[0, 0]


def test_non_finite_floats_are_nodata_under_every_rule():
    data = np.ones((2, 3, 3), dtype=np.float32)
    data[1, 1, 1] = np.nan
    data[0, 2, 0] = np.inf
    for rule in ("auto", "none", 3.0):
        mask = nodata_mask(data, rule, nodata_value=float("nan"))
        assert sorted(zip(*np.nonzero(mask), strict=True)) == [(1, 1), (2, 0)]


def test_window_sides_inside_the_scene_are_not_edges():
    zero = np.zeros((3, 3), dtype=bool)
    zero[:, 2] = True  # a zero column along the right side of a window
    assert edge_connected(zero).sum() == 3
    # Top and bottom touch the column too; only when no side touching it is an edge is it data.
    assert edge_connected(zero, (True, False, False, False)).sum() == 3
    assert not edge_connected(zero, (False, False, True, False)).any()


def test_mask_from_a_geotiff_with_a_nodata_tag():
    data = _scene_with_collar()
    data[:, 3, 3] = 65535
    with MemoryFile(geotiff_bytes(data, nodata=65535)) as memfile, memfile.open() as src:
        read = src.read()
        mask = nodata_mask(read, "auto", nodata_value=src.nodata)
    assert mask[3, 3] and mask[0, 0] and not mask[4, 5]


def _read_inputs(raw: bytes) -> tuple[np.ndarray, dict]:
    with MemoryFile(raw) as memfile, memfile.open() as src:
        return src.read([1, 2]), raster_nodata_inputs(src)


def test_raster_inputs_from_an_alpha_band():
    data = np.full((4, 4, 5), 50, dtype=np.uint8)
    data[3, :, 0] = 0  # the alpha band: a transparent first column
    with MemoryFile() as memfile:
        with memfile.open(
            driver="GTiff",
            width=5,
            height=4,
            count=4,
            dtype="uint8",
            crs="EPSG:4326",
            transform=TILE_TRANSFORM,
            photometric="RGB",
            alpha="YES",
        ) as dst:
            dst.write(data)
        raw = memfile.read()
    bands, inputs = _read_inputs(raw)
    assert inputs["alpha"] is not None and inputs["internal_mask"] is None
    assert not nodata_mask(bands, "none", **inputs).any()
    mask = nodata_mask(bands, 1.0, **inputs)
    np.testing.assert_array_equal(mask[:, 0], True)
    assert mask[:, 1:].sum() == 0


def test_raster_inputs_from_an_internal_mask():
    data = np.full((2, 4, 5), 9, dtype=np.uint16)
    valid = np.full((4, 5), 255, dtype=np.uint8)
    valid[1:3, 1:3] = 0
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), MemoryFile() as memfile:
        with memfile.open(
            driver="GTiff",
            width=5,
            height=4,
            count=2,
            dtype="uint16",
            crs="EPSG:4326",
            transform=TILE_TRANSFORM,
        ) as dst:
            dst.write(data)
            dst.write_mask(valid)
        raw = memfile.read()
    bands, inputs = _read_inputs(raw)
    assert inputs["alpha"] is None and inputs["nodata_value"] is None
    np.testing.assert_array_equal(nodata_mask(bands, "auto", **inputs), valid == 0)


def test_auto_finds_the_rotated_collar_of_a_sentinel2_like_scene():
    scene, footprint = sentinel2_like_scene()
    assert scene.shape == (6, 64, 96) and scene.dtype == np.uint16
    assert (~footprint).any() and footprint.mean() > 0.5
    # Written without a nodata tag, as the untagged products are, and read back.
    with MemoryFile(geotiff_bytes(scene)) as memfile, memfile.open() as src:
        data = src.read()
        mask = nodata_mask(data, "auto", **raster_nodata_inputs(src))
    np.testing.assert_array_equal(mask, ~footprint)
    spec = resolve_bands([4, "B04 red"], S2_DESCRIPTIONS, dtype="uint16")
    assert spec.names == ("B08 nir", "B04 red")


# -- which bands of an input feed a model ------------------------------------------------------

SIX = BandSpec(
    tuple(Band(n, i) for i, n in enumerate(("b", "g", "r", "nir", "s1", "s2"), start=1)),
    "uint16",
)


def test_band_list_takes_any_count_and_refuses_zero_and_words():
    from shared.bands import parse_band_list

    assert parse_band_list("6,5,4,3,2,1") == (6, 5, 4, 3, 2, 1)
    assert parse_band_list(None) is None and parse_band_list(" ") is None
    with pytest.raises(BandError, match="counted from 1"):
        parse_band_list("0,1")
    with pytest.raises(BandError, match="red"):
        parse_band_list("red,green")


def test_model_band_indexes_follow_the_file_then_the_spec_then_refuse():
    from shared.bands import model_band_indexes

    assert model_band_indexes(SIX, 6) == (1, 2, 3, 4, 5, 6)
    selected = BandSpec((Band("nir", 8), Band("red", 4)), "uint16")
    assert model_band_indexes(selected, 13) == (8, 4)  # a full product: the spec's indices
    assert model_band_indexes(selected, 2) == (1, 2)  # exactly the model's bands, in order
    assert model_band_indexes(SIX, 7, [7, 6, 5, 4, 3, 2]) == (7, 6, 5, 4, 3, 2)
    with pytest.raises(BandError, match=r"reads 6 bands \(b, g, r, nir, s1, s2, uint16\).*has 3"):
        model_band_indexes(SIX, 3)
    with pytest.raises(BandError, match="lists 3"):
        model_band_indexes(SIX, 6, [1, 2, 3])
    with pytest.raises(BandError, match="band 9 asked for"):
        model_band_indexes(SIX, 6, [1, 2, 3, 4, 5, 9])


def test_only_three_8_bit_bands_read_pictures():
    assert BandSpec.rgb().reads_pictures()
    assert not SIX.reads_pictures()
    assert not BandSpec(SIX.bands[:3], "uint16").reads_pictures()


def test_collar_window_maps_pixels_to_overview_cells():
    from shared.bands import Collar

    cells = np.zeros((2, 3), dtype=bool)
    cells[0, 2] = True  # the top-right cell of a 4 x 6 scene: rows 0-1, columns 4-5
    collar = Collar(cells, height=4, width=6)
    expected = np.zeros((4, 6), dtype=bool)
    expected[0:2, 4:6] = True
    np.testing.assert_array_equal(collar.window(0, 0, 4, 6), expected)
    np.testing.assert_array_equal(collar.window(1, 3, 2, 3), expected[1:3, 3:6])
