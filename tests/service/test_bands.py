"""A multi-band model through the service: a 6-band uint16 Sentinel-2-like scene with an
untagged, rotated zero collar in; 255 on the collar in every format out; uploads without the
model's bands refused with 422 naming the bands expected and received; the scale warning.

The oracle is computed outside the service: the checkpoint's normalisation applied by hand to
the scene, the model called directly, and the footprint the test scene was built from.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from rasterio.io import MemoryFile

from shared.bands import Band, BandSpec
from shared.checkpoint import build_checkpoint, save_checkpoint
from shared.labels import LabelMap
from shared.model import build_model
from shared.preprocess import BandStatistics
from tests.geodata import S2_BAND_NAMES, TILE_H, TILE_W, geotiff_bytes, sentinel2_like_scene
from tests.service.helpers import encode, png_mask, running_app, settings_for

IGNORE = 255
# The test tile is 1/15 degree a pixel at 44.6 N: about 6.3 km.
TILE_GSD_M = 6300.0


def six_band_checkpoint(path: Path, *, gsd_m: float | None = None) -> Path:
    """A 6-band model whose prediction varies over the scene (random head, zero bias), with the
    band spec and the scene's own per-band statistics (collar excluded)."""
    scene, footprint = sentinel2_like_scene()
    torch.manual_seed(0)
    model = build_model("mobilenet_v3_large", num_classes=3, weights="none", in_channels=6)
    head = model.classifier[4]
    with torch.no_grad():
        head.weight.copy_(
            torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(0))
        )
        head.bias.zero_()
    spec = BandSpec(tuple(Band(n, i) for i, n in enumerate(S2_BAND_NAMES, start=1)), "uint16")
    stats = BandStatistics()
    stats.update(scene, ~footprint)
    payload = build_checkpoint(
        model,
        backbone="mobilenet_v3_large",
        aux_loss=False,
        label_map=LabelMap.load(),
        normalization=stats.normalization(spec.names),
        config={},
        bands=spec,
        gsd_m=gsd_m,
    )
    save_checkpoint(payload, path)
    return path


def expected_mask(checkpoint: Path, scene: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """The model on the whole scene, normalised by hand, nodata at the mean; 255 off the
    footprint."""
    from shared.checkpoint import load_checkpoint, model_from_checkpoint

    model, _, norm = model_from_checkpoint(load_checkpoint(checkpoint))
    x = torch.from_numpy(scene.astype(np.float32))[None]
    mean = torch.tensor(norm.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(norm.std, dtype=torch.float32).view(1, -1, 1, 1)
    x = (x - mean * norm.scale) / (std * norm.scale)
    x[:, :, ~torch.from_numpy(footprint)] = 0.0
    with torch.no_grad():
        mask = model(x)["out"][0].argmax(0).numpy().astype(np.uint8)
    mask[~footprint] = IGNORE
    return mask


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return six_band_checkpoint(tmp_path_factory.mktemp("six") / "six.pt", gsd_m=TILE_GSD_M)


@pytest.fixture(scope="module")
def client(checkpoint: Path) -> Iterator[TestClient]:
    # One tile covers the 96 x 64 scene: the service's answer is one forward pass, as the
    # oracle's.
    with running_app(settings_for(checkpoint, tile=128, overlap=16)) as c:
        assert c.get("/readyz").status_code == 200
        yield c


@pytest.fixture(scope="module")
def scene() -> tuple[np.ndarray, np.ndarray]:
    return sentinel2_like_scene()


def post(client: TestClient, data: bytes, name: str = "s2.tif", **params: str):
    return client.post("/segment", params=params, files={"image": (name, data)})


def read_tiff(data: bytes) -> tuple[np.ndarray, float | None]:
    with MemoryFile(data) as memfile, memfile.open() as src:
        return src.read(), src.nodata


def test_six_band_scene_answers_255_on_the_collar_in_every_format(client, checkpoint, scene):
    bands, footprint = scene
    collar = ~footprint
    assert collar.sum() > 500 and footprint.sum() > 3000
    expected = expected_mask(checkpoint, bands, footprint)
    assert len(np.unique(expected[footprint])) >= 2  # the model's answer varies
    data = geotiff_bytes(bands)

    png = post(client, data)
    assert png.status_code == 200, png.text
    mask = png_mask(png.content)
    np.testing.assert_array_equal(mask, expected)

    rle = post(client, data, format="rle")
    assert rle.status_code == 200, rle.text
    body = rle.json()
    from pycocotools import mask as coco_mask

    covered = np.zeros((TILE_H, TILE_W), dtype=bool)
    for cls in body["classes"]:
        rle_obj = {"size": cls["rle"]["size"], "counts": cls["rle"]["counts"].encode()}
        pixels = coco_mask.decode(rle_obj).astype(bool)
        np.testing.assert_array_equal(pixels, expected == cls["id"])
        covered |= pixels
    np.testing.assert_array_equal(covered, footprint)  # the collar is in no class

    geotiff = post(client, data, format="geotiff")
    assert geotiff.status_code == 200, geotiff.text
    values, nodata = read_tiff(geotiff.content)
    assert nodata == IGNORE
    np.testing.assert_array_equal(values[0], expected)

    probs = post(client, data, format="probabilities")
    assert probs.status_code == 200, probs.text
    values, _ = read_tiff(probs.content)
    assert (values[:, collar] == 0).all()  # every class band 0 on nodata
    assert (values[:, footprint].astype(int).sum(axis=0) == 255).all()
    np.testing.assert_array_equal(values.argmax(0)[footprint], expected[footprint])

    geojson = post(client, data, format="geojson")
    assert geojson.status_code == 200, geojson.text
    from rasterio.features import rasterize
    from shapely.geometry import shape

    features = geojson.json()["features"]
    drawn = rasterize(
        [(shape(f["geometry"]), 1) for f in features],
        out_shape=(TILE_H, TILE_W),
        transform=read_transform(data),
    ).astype(bool)
    np.testing.assert_array_equal(drawn, footprint)  # polygons cover the footprint only


def read_transform(data: bytes):
    with MemoryFile(data) as memfile, memfile.open() as src:
        return src.transform


def test_bands_parameter_reorders_the_file_bands(client, scene):
    bands, _ = scene
    straight = post(client, geotiff_bytes(bands))
    reversed_file = geotiff_bytes(bands[::-1].copy())
    reordered = post(client, reversed_file, bands="6,5,4,3,2,1")
    assert reordered.status_code == 200, reordered.text
    np.testing.assert_array_equal(png_mask(reordered.content), png_mask(straight.content))
    unordered = png_mask(post(client, reversed_file).content)
    assert (unordered != png_mask(straight.content)).any()  # the order matters


def test_three_band_geotiff_is_refused_naming_the_bands(client, scene):
    bands, _ = scene
    response = post(client, geotiff_bytes(bands[:3].copy()))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "band_mismatch"
    message = error["message"]
    assert "6 bands" in message and "3 bands" in message
    assert "B08 nir" in message  # the expected bands are named


def test_wrong_number_of_chosen_bands_is_refused(client, scene):
    bands, _ = scene
    response = post(client, geotiff_bytes(bands), bands="1,2,3")
    assert response.status_code == 422, response.text
    assert "6 bands" in response.text and "lists 3" in response.text


def test_png_is_refused_naming_the_bands(client):
    picture = encode(np.zeros((32, 32, 3), dtype=np.uint8))
    response = post(client, picture, name="tile.png")
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "band_mismatch"
    assert "PNG" in response.text and "3 band" in response.text and "6 bands" in response.text


def test_nodata_none_and_value_override_auto(client, scene):
    bands, footprint = scene
    data = geotiff_bytes(bands)
    none = png_mask(post(client, data, nodata="none").content)
    assert (none != IGNORE).all()  # the collar is predicted like any pixel
    # A value: the collar is 0 in every band; 7 is held by no pixel.
    zero = png_mask(post(client, data, nodata="0").content)
    np.testing.assert_array_equal(zero == IGNORE, ~footprint)
    seven = png_mask(post(client, data, nodata="7").content)
    assert (seven != IGNORE).all()
    bad = post(client, data, nodata="sometimes")
    assert bad.status_code == 422 and "nodata" in bad.text


def test_evaluate_leaves_nodata_out_of_the_confusion_matrix(client, checkpoint, scene):
    bands, footprint = scene
    truth = np.where(footprint, 1, 0).astype(np.uint8)  # the collar labelled, to be ignored
    response = client.post(
        "/evaluate",
        files=[("image", ("s2.tif", geotiff_bytes(bands))), ("mask", ("t.png", encode(truth)))],
    )
    assert response.status_code == 200, response.text
    matrix = np.array(response.json()["aggregate"]["confusion_matrix"])
    assert matrix.sum() == footprint.sum()
    expected = expected_mask(checkpoint, bands, footprint)
    # Truth is class 1 on every valid pixel: column sums are the predicted classes there.
    predicted = np.bincount(expected[footprint], minlength=3)
    np.testing.assert_array_equal(matrix.sum(axis=0), predicted)


def test_model_lists_bands_dtype_and_normalisation(client):
    info = client.get("/model").json()
    assert [b["name"] for b in info["bands"]["bands"]] == list(S2_BAND_NAMES)
    assert info["bands"]["dtype"] == "uint16"
    assert len(info["normalization"]["mean"]) == 6 and info["normalization"]["scale"] == 1.0
    assert info["gsd_m"] == TILE_GSD_M


def test_input_at_another_scale_is_answered_with_a_warning(tmp_path, scene):
    bands, _ = scene
    data = geotiff_bytes(bands)
    # Trained on 30 m pixels: the ~6 km test tile is 200x coarser.
    fine = six_band_checkpoint(tmp_path / "fine.pt", gsd_m=30.0)
    with running_app(settings_for(fine, tile=128, overlap=16)) as c:
        png = post(c, data)
        assert png.status_code == 200
        assert "trained on 30 m pixels" in png.headers["X-SatSeg-Warning"]
        rle = post(c, data, format="rle")
        assert rle.status_code == 200 and "30 m" in rle.json()["warnings"][0]
        geojson = post(c, data, format="geojson")
        assert "30 m" in geojson.json()["warnings"][0]
        assert "X-SatSeg-Warning" in geojson.headers


def test_input_at_the_training_scale_has_no_warning(client, scene):
    bands, _ = scene
    response = post(client, geotiff_bytes(bands), format="rle")
    assert response.status_code == 200
    assert "X-SatSeg-Warning" not in response.headers and response.json()["warnings"] == []


def named_geotiff(bands: np.ndarray, names: tuple[str, ...]) -> bytes:
    """``bands`` as a GeoTIFF whose band descriptions are ``names``."""
    from tests.geodata import TILE_TRANSFORM

    with MemoryFile() as memfile:
        count, height, width = bands.shape
        profile = {"driver": "GTiff", "count": count, "height": height, "width": width}
        with memfile.open(
            **profile, dtype=bands.dtype.name, crs="EPSG:4326", transform=TILE_TRANSFORM
        ) as dst:
            dst.write(bands)
            for i, name in enumerate(names, start=1):
                dst.set_band_description(i, name)
        return memfile.read()


def test_preview_shows_the_bands_named_red_green_blue(client, scene):
    import base64
    import io

    from PIL import Image

    bands, footprint = scene
    data = named_geotiff(bands, S2_BAND_NAMES)
    response = post(client, data, format="rle", preview="true", scale="0,10000")
    assert response.status_code == 200, response.text
    url = response.json()["preview"]
    assert url.startswith("data:image/png;base64,")
    preview = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    # Bands 3, 2, 1 are B04 red, B03 green, B02 blue; 0..10000 maps linearly to 0..255.
    expected = np.rint(bands[[2, 1, 0]].transpose(1, 2, 0) * (255 / 10000)).astype(np.uint8)
    expected[~footprint] = 0
    np.testing.assert_array_equal(preview, expected)
    assert post(client, data, format="rle").json()["preview"] is None
