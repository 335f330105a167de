"""POST /segment: PNG and RLE answers, sizes, formats, tiling and consistency with shared."""

from __future__ import annotations

import io
import resource
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pycocotools import mask as coco_mask

from shared.inference import InferenceOptions, Predictor
from shared.labels import LabelMap
from tests.service.helpers import TEST_OVERLAP, TEST_TILE, encode, peak_rss_bytes, png_mask, scene


def _segment(client: TestClient, data: bytes, fmt: str | None = None, name: str = "x.png"):
    params = {"format": fmt} if fmt else None
    return client.post("/segment", params=params, files={"image": (name, data)})


@pytest.mark.parametrize("size", [(1, 1), (17, 33), (64, 64), (100, 150), (150, 70)])
def test_png_is_a_palette_mask_of_the_input_size(
    client: TestClient, label_map: LabelMap, size: tuple[int, int]
) -> None:
    height, width = size
    response = _segment(client, encode(scene(height, width)))

    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(response.content)) as im:
        assert im.mode == "P"
        assert im.size == (width, height)
        palette = im.getpalette()
        mask = np.array(im)
    assert palette[: 3 * label_map.num_classes] == label_map.palette()[: 3 * label_map.num_classes]
    assert set(np.unique(mask)) <= {c.id for c in label_map.classes}


def test_png_equals_the_shared_predictor(client: TestClient, varied_checkpoint: Path) -> None:
    # 100x150 with 64 px tiles takes the tiled path; the batched engine must give exactly what
    # the single-image path of shared.inference gives.
    image = scene(100, 150, seed=3)
    predictor = Predictor.from_checkpoint(
        varied_checkpoint,
        InferenceOptions(device="cpu", precision="fp32", tile=TEST_TILE, overlap=TEST_OVERLAP),
    )
    expected = predictor.segment(image)

    got = png_mask(_segment(client, encode(image)).content)

    assert len(np.unique(expected)) > 1  # a one-class answer would prove little
    np.testing.assert_array_equal(got, expected)


def test_rle_decodes_with_pycocotools_to_the_png_mask(
    client: TestClient, label_map: LabelMap
) -> None:
    data = encode(scene(90, 130, seed=1))
    png = png_mask(_segment(client, data).content)

    response = _segment(client, data, "rle")

    assert response.status_code == 200
    body = response.json()
    assert (body["height"], body["width"]) == (90, 130)
    assert [c["id"] for c in body["classes"]] == [c.id for c in label_map.classes]
    assert [c["name"] for c in body["classes"]] == label_map.names
    for entry in body["classes"]:
        rle = {"size": entry["rle"]["size"], "counts": entry["rle"]["counts"].encode()}
        decoded = coco_mask.decode(rle)
        np.testing.assert_array_equal(decoded, png == entry["id"])
        assert entry["area"] == int((png == entry["id"]).sum())
        assert entry["fraction"] == pytest.approx(entry["area"] / png.size)
    assert sum(c["area"] for c in body["classes"]) == 90 * 130
    assert sum(c["area"] > 0 for c in body["classes"]) > 1
    assert set(body["timing_ms"]) == {"decode", "inference", "encode", "total"}


@pytest.mark.parametrize(
    ("fmt", "save"),
    [("JPEG", {"quality": 95}), ("TIFF", {}), ("WEBP", {"lossless": True}), ("BMP", {})],
)
def test_other_image_formats_are_accepted(client: TestClient, fmt: str, save: dict) -> None:
    image = scene(40, 50, seed=2)
    response = _segment(client, encode(image, fmt, **save), name=f"x.{fmt.lower()}")

    assert response.status_code == 200
    assert png_mask(response.content).shape == (40, 50)


def test_png_is_the_default_format_and_timing_is_in_a_header(client: TestClient) -> None:
    response = _segment(client, encode(scene(20, 20)))

    assert response.headers["content-type"] == "image/png"
    assert "inference;dur=" in response.headers["server-timing"]


@pytest.mark.slow
def test_a_5400x2700_scene_segments_with_default_tiles(app_factory, capsys) -> None:
    image = scene(2700, 5400, seed=4)
    data = encode(image, "JPEG", quality=90)
    del image
    with app_factory(tile=512, overlap=64, request_timeout_s=600) as client:
        before = peak_rss_bytes()
        start = time.perf_counter()
        response = _segment(client, data, name="scene.jpg")
        elapsed = time.perf_counter() - start
        after = peak_rss_bytes()

    assert response.status_code == 200
    assert png_mask(response.content).shape == (2700, 5400)
    with capsys.disabled():
        print(
            f"\n5400x2700 JPEG ({len(data) / 1e6:.1f} MB): {elapsed:.1f} s on CPU; peak RSS "
            f"{before / 2**20:.0f} MiB before, {after / 2**20:.0f} MiB after "
            f"(ru_maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)"
        )
