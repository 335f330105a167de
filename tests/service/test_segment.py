"""POST /segment: PNG and RLE answers, sizes, formats, tiling and consistency with shared."""

from __future__ import annotations

import io
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pycocotools import mask as coco_mask

from shared.inference import InferenceOptions, Predictor
from shared.labels import LabelMap
from tests.service.helpers import (
    TEST_OVERLAP,
    TEST_TILE,
    encode,
    png_mask,
    process_memory,
    scene,
    service_env,
    service_url,
    start_service,
    wait_ready,
)


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


PEAK_GROWTH_LIMIT = 1280 * 2**20  # over twice the measured growth, for allocator noise


@pytest.mark.slow
def test_a_5400x2700_scene_segments_with_default_tiles(
    varied_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # A real `python -m service` with the default 512 px tiles, so the memory figure is the
    # server process's own. The scene is drawn small and enlarged to keep this test's memory low.
    small = Image.fromarray(scene(675, 1350, seed=4))
    data = io.BytesIO()
    small.resize((5400, 2700), Image.Resampling.BILINEAR).save(data, "JPEG", quality=90)
    data = data.getvalue()
    log = tmp_path / "service.log"
    proc = start_service(service_env(varied_checkpoint), log)
    try:
        base = service_url(log, proc)
        wait_ready(base, proc)
        idle = process_memory(proc.pid)
        start = time.perf_counter()
        response = httpx.post(f"{base}/segment", files={"image": ("scene.jpg", data)}, timeout=600)
        elapsed = time.perf_counter() - start
        after = process_memory(proc.pid)
    finally:
        proc.terminate()
        proc.wait(60)

    assert response.status_code == 200, log.read_text()
    mask = png_mask(response.content)
    assert mask.shape == (2700, 5400)
    assert len(np.unique(mask)) > 1
    # The server's own peak (VmHWM of the service process) may grow by one tile batch's working
    # set plus a few copies of the scene (decoded RGB, the uint8 tensor, the float32 blend
    # accumulator, the mask: about 30 bytes a pixel, 0.4 GiB here); 526 MiB was measured. A
    # forward pass over the whole scene, or per-tile logits kept for the whole scene, would
    # take several GiB.
    growth = after["peak"] - idle["peak"]
    assert growth < PEAK_GROWTH_LIMIT, f"server peak grew by {growth / 2**20:.0f} MiB"
    with capsys.disabled():
        print(
            f"\n5400x2700 JPEG ({len(data) / 1e6:.1f} MB) via python -m service, CPU, fp32, "
            f"tile 512/overlap 64: {elapsed:.1f} s; server RSS {idle['rss'] / 2**20:.0f} MiB "
            f"ready, peak {after['peak'] / 2**20:.0f} MiB after the request "
            f"(peak growth {growth / 2**20:.0f} MiB)"
        )
