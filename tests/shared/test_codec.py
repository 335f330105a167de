"""Encoders: COG (validated by rio-cogeo, read back by rasterio), probabilities, GeoJSON
(rasterised back by rasterio.features), palette PNG and RLE."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.control import GroundControlPoint
from rasterio.crs import CRS
from rasterio.features import rasterize
from rasterio.io import MemoryFile
from rasterio.transform import Affine
from rio_cogeo.cogeo import cog_validate
from shapely.geometry import shape

from shared import rle
from shared.codec import (
    CogWriter,
    PolygonWriter,
    mask_to_geojson,
    mask_to_png,
    mask_to_rle,
    probabilities_to_cog,
)
from shared.pipeline import Band
from shared.raster import Georef

SCENES = {
    # The Blue Marble grid (15 px a degree) at 10 E, 45 N.
    "wgs84": Georef(CRS.from_epsg(4326), Affine(1 / 15, 0, 10.0, 0, -1 / 15, 45.0)),
    # 10 m pixels in UTM zone 33 N.
    "utm": Georef(CRS.from_epsg(32633), Affine(10.0, 0, 500_000.0, 0, -10.0, 5_000_000.0)),
}


def blob_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Three classes in smooth blobs, like a land/sea/lake map."""
    coarse = rng.normal(size=(height // 40 + 2, width // 40 + 2))
    image = Image.fromarray(coarse.astype(np.float32)).resize((width, height), Image.BICUBIC)
    field = np.asarray(image)
    return np.digitize(field, [-0.3, 0.5]).astype(np.uint8)


def bands_of(mask: np.ndarray, rows: int, probabilities: np.ndarray | None = None):
    for top in range(0, mask.shape[0], rows):
        probs = None if probabilities is None else probabilities[:, top : top + rows]
        yield Band(top, mask[top : top + rows], probs, np.empty((0, 0, 3), np.uint8))


@pytest.mark.parametrize("scene", sorted(SCENES))
def test_cog_streamed_validates_and_keeps_georeferencing(scene, tmp_path, rng, label_map):
    georef = SCENES[scene]
    mask = blob_mask(rng, 1100, 1300)
    mask[:30, :40] = label_map.ignore_index
    path = tmp_path / "mask.tif"
    writer = CogWriter(path, mask.shape, georef, label_map, nodata=label_map.ignore_index)
    for band in bands_of(mask, 448):
        writer.write(band)
    writer.close()
    assert [p.name for p in tmp_path.iterdir()] == ["mask.tif"]  # no intermediate left
    valid, errors, _warnings = cog_validate(str(path))
    assert valid, errors
    with rasterio.open(path) as src:
        assert src.crs == georef.crs
        assert src.transform.almost_equals(georef.transform)
        assert src.nodata == label_map.ignore_index
        assert src.count == 1 and src.dtypes == ("uint8",)
        assert src.overviews(1), "a COG of this size has overviews"
        assert src.block_shapes[0] == (512, 512)
        np.testing.assert_array_equal(src.read(1), mask)
        colormap = src.colormap(1)
        for cls in label_map.classes:
            assert colormap[cls.id][:3] == tuple(cls.color)
        assert src.tags(1)["CLASS_1"] == label_map.classes[1].name


def test_cog_of_a_raster_placed_by_gcps_carries_them(tmp_path, label_map):
    gcps = (
        GroundControlPoint(row=0, col=0, x=10.0, y=45.0, id="1"),
        GroundControlPoint(row=0, col=64, x=10.4, y=45.0, id="2"),
        GroundControlPoint(row=32, col=0, x=10.0, y=44.8, id="3"),
    )
    georef = Georef(gcps=gcps, gcps_crs=CRS.from_epsg(4326))
    mask = np.zeros((32, 64), np.uint8)
    path = tmp_path / "mask.tif"
    writer = CogWriter(path, mask.shape, georef, label_map)
    writer.write(next(bands_of(mask, 32)))
    writer.close()
    with rasterio.open(path) as src:
        points, crs = src.gcps
    assert crs == CRS.from_epsg(4326)
    assert [(p.row, p.col, p.x, p.y) for p in points] == [(p.row, p.col, p.x, p.y) for p in gcps]


def test_probabilities_cog_has_one_band_per_class(tmp_path, rng, label_map):
    mask = blob_mask(rng, 600, 700)
    probs = np.zeros((3, *mask.shape), dtype=np.uint8)
    for c in range(3):
        probs[c] = np.where(mask == c, 200, 27 + c)
    probs[0] += 255 - probs.sum(axis=0, dtype=np.uint16).astype(np.uint8)
    data = probabilities_to_cog(probs, SCENES["utm"], label_map, mask)
    with MemoryFile(data) as memfile, memfile.open() as src:
        assert src.count == 3 and src.crs == SCENES["utm"].crs
        np.testing.assert_array_equal(src.read(), probs)
        assert src.descriptions[1].startswith(label_map.classes[1].name)
    path = tmp_path / "p.tif"
    path.write_bytes(data)
    assert cog_validate(str(path))[0]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def burn(collection: dict, shape_: tuple[int, int], transform: Affine, class_id: int):
    geoms = [
        f["geometry"] for f in collection["features"] if f["properties"]["class_id"] == class_id
    ]
    if not geoms:
        return np.zeros(shape_, dtype=bool)
    return rasterize(geoms, out_shape=shape_, transform=transform, fill=0, default_value=1) > 0


@pytest.mark.parametrize("scene", [*sorted(SCENES), "pixels"])
def test_geojson_rasterised_back_reproduces_the_mask(scene, rng, label_map):
    georef = SCENES.get(scene, Georef())
    mask = blob_mask(rng, 300, 420)
    writer = PolygonWriter(georef, label_map)
    for band in bands_of(mask, 70):  # polygons cut by band boundaries must merge
        writer.write(band)
    collection = json.loads(json.dumps(writer.close()))
    for cls in label_map.classes:
        burnt = burn(collection, mask.shape, georef.transform, cls.id)
        assert iou(burnt, mask == cls.id) >= 0.99, cls.name
        assert (mask == cls.id).any()
    whole = mask_to_geojson(mask, georef, label_map)
    assert len(collection["features"]) == len(whole["features"])
    names = {f["properties"]["class_name"] for f in collection["features"]}
    assert names == {c.name for c in label_map.classes}
    if scene == "utm":
        assert collection["crs"]["properties"]["name"] == "EPSG:32633"
    else:
        assert "crs" not in collection


def test_geojson_pixel_coordinates_are_columns_and_rows(label_map):
    mask = np.zeros((10, 20), dtype=np.uint8)
    mask[2:5, 12:18] = 2  # rows 2-4, columns 12-17
    collection = mask_to_geojson(mask, Georef(), label_map)
    (lake,) = [f for f in collection["features"] if f["properties"]["class_id"] == 2]
    assert shape(lake["geometry"]).bounds == (12.0, 2.0, 18.0, 5.0)
    assert lake["properties"]["class_name"] == label_map.classes[2].name


def test_geojson_in_wgs84_from_a_utm_scene(rng, label_map):
    mask = np.zeros((100, 100), dtype=np.uint8)
    mask[10:20, 10:20] = 1
    collection = mask_to_geojson(mask, SCENES["utm"], label_map, crs="EPSG:4326")
    (land,) = [f for f in collection["features"] if f["properties"]["class_id"] == 1]
    lon, lat = shape(land["geometry"]).centroid.coords[0]
    # 500 km east in zone 33 N is its central meridian, 15 E; 5000 km north is about 45 N.
    assert 14.99 < lon < 15.01 and 45.0 < lat < 45.2
    assert "crs" not in collection


def test_geojson_min_area_and_simplify(label_map):
    mask = np.zeros((60, 60), dtype=np.uint8)
    mask[5:7, 5:7] = 1  # 4 px
    yy, xx = np.mgrid[:60, :60]
    mask[(yy - 35) ** 2 + (xx - 35) ** 2 < 15**2] = 2  # a pixelated disc
    full = mask_to_geojson(mask, Georef(), label_map)
    kept = mask_to_geojson(mask, Georef(), label_map, min_area=5)
    assert {f["properties"]["class_id"] for f in full["features"]} == {0, 1, 2}
    assert {f["properties"]["class_id"] for f in kept["features"]} == {0, 2}
    simple = mask_to_geojson(mask, Georef(), label_map, simplify=1.0)

    def vertices(c, class_id):
        (f,) = [f for f in c["features"] if f["properties"]["class_id"] == class_id]
        return len(f["geometry"]["coordinates"][0])

    assert vertices(simple, 2) < vertices(full, 2) / 2


def test_geojson_bad_parameters(label_map):
    with pytest.raises(ValueError, match="crs"):
        PolygonWriter(Georef(), label_map, crs="EPSG:3857")
    with pytest.raises(ValueError, match="needs a georeferenced"):
        PolygonWriter(Georef(), label_map, crs="EPSG:4326")
    with pytest.raises(ValueError, match="min_area"):
        PolygonWriter(Georef(), label_map, min_area=-1)


def test_png_and_rle_round_trip(rng, label_map):
    mask = blob_mask(rng, 50, 70)
    with Image.open(io.BytesIO(mask_to_png(mask, label_map))) as im:
        assert im.mode == "P"
        np.testing.assert_array_equal(np.asarray(im), mask)
        assert tuple(im.getpalette()[3:6]) == tuple(label_map.classes[1].color)
    body = mask_to_rle(mask, label_map)
    for entry in body["classes"]:
        np.testing.assert_array_equal(rle.decode(entry["rle"]), mask == entry["id"])
