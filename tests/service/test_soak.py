"""Soak: 500 requests mixing valid and hostile input; valid ones are answered correctly, no
5xx, and resident memory stays flat."""

from __future__ import annotations

import gc
import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.service.helpers import encode, png_mask, rss_bytes, scene

HOSTILE = Path(__file__).resolve().parents[1] / "data" / "hostile"
TOTAL = 500
WARMUP = 50


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("P", (8, 8)).save(buf, format="GIF")
    return buf.getvalue()


def test_soak_of_mixed_requests(client: TestClient, capsys: pytest.CaptureFixture) -> None:
    images = [
        encode(scene(h, w, seed=s)) for s, (h, w) in enumerate([(32, 48), (70, 90), (130, 20)])
    ]
    expected = [png_mask(client.post("/segment", files={"image": ("x.png", d)}).content)
                for d in images]  # fmt: skip
    bomb = (HOSTILE / "bomb.png").read_bytes()
    truncated = images[1][: len(images[1]) // 2]
    zeros = encode(np.zeros((32, 48), np.uint8))
    unknown = encode(np.full((32, 48), 7, np.uint8))

    def segment(data: bytes, **params: str):
        return client.post("/segment", params=params, files={"image": ("x.png", data)})

    def evaluate(image: bytes, mask: bytes):
        return client.post(
            "/evaluate", files=[("image", ("i.png", image)), ("mask", ("m.png", mask))]
        )

    def check_png(i: int):
        def run() -> tuple[int, bool]:
            r = segment(images[i])
            return r.status_code, np.array_equal(png_mask(r.content), expected[i])

        return run

    def check_rle(i: int):
        def run() -> tuple[int, bool]:
            r = segment(images[i], format="rle")
            areas = [c["area"] for c in r.json()["classes"]]
            return r.status_code, areas == np.bincount(expected[i].ravel(), minlength=3).tolist()

        return run

    def check_evaluate() -> tuple[int, bool]:
        r = evaluate(images[0], zeros)
        accuracy = float(np.mean(expected[0] == 0))
        return r.status_code, abs(r.json()["aggregate"]["pixel_accuracy"] - accuracy) < 1e-9

    def hostile(call, status: int):
        def run() -> tuple[int, bool]:
            r = call()
            return r.status_code, r.status_code == status and "error" in r.json()

        return run

    mix = [
        check_png(0), check_png(1), check_png(2), check_rle(1), check_evaluate,
        hostile(lambda: segment(b""), 400),
        hostile(lambda: segment(bytes(range(256)) * 8), 400),
        hostile(lambda: segment(truncated), 400),
        hostile(lambda: segment(b"plain text, not an image"), 400),
        hostile(lambda: segment(_gif()), 415),
        hostile(lambda: segment(bomb), 413),
        hostile(lambda: segment(images[0], format="gif"), 422),
        hostile(lambda: evaluate(images[0], encode(np.zeros((5, 5), np.uint8))), 422),
        hostile(lambda: evaluate(images[0], unknown), 422),
        hostile(lambda: client.post("/segment", files={"other": ("x", b"1")}), 422),
    ]  # fmt: skip

    statuses: Counter[int] = Counter()
    wrong: list[int] = []
    baseline = 0
    for n in range(TOTAL):
        if n == WARMUP:
            gc.collect()
            baseline = rss_bytes()
        status, ok = mix[n % len(mix)]()
        statuses[status] += 1
        if not ok:
            wrong.append(n)
    gc.collect()
    growth = rss_bytes() / baseline - 1

    assert sum(statuses.values()) == TOTAL
    assert not [s for s in statuses if s >= 500], statuses
    assert wrong == [], f"wrong answers at requests {wrong[:10]}"
    with capsys.disabled():
        print(
            f"\nsoak: {dict(sorted(statuses.items()))}; RSS {baseline / 2**20:.0f} MiB after "
            f"{WARMUP} requests, {growth:+.1%} after {TOTAL}"
        )
    assert growth < 0.10, f"RSS grew {growth:.1%} (from {baseline / 2**20:.0f} MiB)"
