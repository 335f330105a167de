"""/segment's probability raster and polygons, checked against its own class-id answers with
independent tools (rasterio.features.rasterize, rio-cogeo's validator)."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from rasterio.features import rasterize
from rasterio.io import MemoryFile
from rio_cogeo.cogeo import cog_validate

from shared.labels import LabelMap
from tests.geodata import TILE_TRANSFORM, bluemarble_tile, geotiff_bytes
from tests.service.helpers import encode, png_mask, scene


def segment(client: TestClient, data: bytes, name: str, **params: str):
    return client.post("/segment", params=params, files={"image": (name, data)})


@pytest.fixture(scope="module")
def geotiff() -> bytes:
    return geotiff_bytes(bluemarble_tile().transpose(2, 0, 1).copy())


def test_probabilities_sum_to_255_and_argmax_is_the_mask(client):
    image = encode(scene(150, 170, seed=3))  # larger than the test tile: blended
    answer = segment(client, image, "a.png", format="probabilities")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "image/tiff"
    mask = png_mask(segment(client, image, "a.png").content)
    with MemoryFile(answer.content) as memfile, memfile.open() as src:
        probs = src.read()
        assert src.count == len(LabelMap.load().classes)
    assert len(np.unique(mask)) > 1
    np.testing.assert_array_equal(probs.sum(axis=0, dtype=np.int32), 255)
    np.testing.assert_array_equal(probs.argmax(axis=0), mask)


def test_geotiff_answer_is_a_valid_cog(client, geotiff, tmp_path):
    answer = segment(client, geotiff, "scene.tif", format="geotiff")
    assert answer.status_code == 200, answer.text
    path = tmp_path / "mask.tif"
    path.write_bytes(answer.content)
    valid, errors, _ = cog_validate(str(path))
    assert valid, errors


@pytest.mark.parametrize("crs", ["raster", "EPSG:4326"])
def test_geojson_rasterised_back_reproduces_the_mask(client, geotiff, crs):
    answer = segment(client, geotiff, "scene.tif", format="geojson", crs=crs)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/geo+json"
    collection = answer.json()
    answer_mask = segment(client, geotiff, "scene.tif", format="geotiff").content
    with MemoryFile(answer_mask) as memfile, memfile.open() as src:
        mask = src.read(1)
    for cls in LabelMap.load().classes:
        truth = mask == cls.id
        geoms = [
            f["geometry"] for f in collection["features"] if f["properties"]["class_id"] == cls.id
        ]
        if not truth.any():
            assert not geoms
            continue
        burnt = rasterize(geoms, out_shape=mask.shape, transform=TILE_TRANSFORM) > 0
        assert (burnt & truth).sum() / (burnt | truth).sum() >= 0.99, cls.name
        assert {f["properties"]["class_name"] for f in collection["features"]} >= {cls.name}


def test_geojson_of_a_picture_is_in_pixels_and_refuses_wgs84(client):
    image = encode(scene(40, 50, seed=4))
    answer = segment(client, image, "a.png", format="geojson")
    assert answer.status_code == 200, answer.text
    coords = [xy for f in answer.json()["features"] for xy in f["geometry"]["coordinates"][0]]
    assert min(x for x, _ in coords) == 0 and max(x for x, _ in coords) == 50
    assert min(y for _, y in coords) == 0 and max(y for _, y in coords) == 40
    refused = segment(client, image, "a.png", format="geojson", crs="EPSG:4326")
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "not_georeferenced"


@pytest.mark.parametrize("params", [{"min_area": "-1"}, {"simplify": "nan"}, {"crs": "EPSG:3857"}])
def test_bad_geojson_parameters_are_422(client, params):
    answer = segment(client, encode(scene(20, 20)), "a.png", format="geojson", **params)
    assert answer.status_code == 422
    assert "error" in answer.json()
