"""A memory budget the service cannot be talked out of: decoded bytes checked from the header
before decoding, admission by estimated working memory, and band-count and sample-type limits."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import rasterio
import torch
from fastapi.testclient import TestClient
from rasterio.windows import Window

from service.memory import MemoryBudget, default_memory_budget, memory_limit
from shared.imaging import image_size
from tests.geodata import geotiff_bytes
from tests.service.helpers import (
    encode,
    process_memory,
    running_app,
    scene,
    service_env,
    service_url,
    settings_for,
    start_service,
)

MIB = 1024 * 1024
IMAGE = encode(scene(40, 40, seed=4))


def sparse_geotiff(path: Path, width: int, height: int, bands: int, dtype: str) -> bytes:
    """A deflate GeoTIFF whose header claims ``width x height x bands`` samples of ``dtype``:
    one 256x256 block is written, the others are left empty (GDAL's SPARSE_OK), so the file is
    small however large it decodes."""
    profile = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": bands,
        "dtype": dtype,
        "crs": "EPSG:4326",
        "transform": rasterio.transform.from_origin(10.0, 45.0, 1e-4, 1e-4),
        "compress": "deflate",
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "sparse_ok": True,
    }
    block = np.random.default_rng(0).random((bands, 256, 256)).astype(dtype)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(block, window=Window(0, 0, 256, 256))
    return path.read_bytes()


@pytest.fixture(scope="module")
def float64_scene(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """7900 x 7900 pixels x 4 float64 bands: 62.4 MP, under the 64 MP cap, 2.0 GB decoded."""
    path = tmp_path_factory.mktemp("scene") / "float64.tif"
    data = sparse_geotiff(path, 7900, 7900, 4, "float64")
    assert len(data) < 8 * MIB
    return data


def _post(client: TestClient, data: bytes, name: str = "x.tif", query: str = ""):
    return client.post(f"/segment{query}", files={"image": (name, data)})


# ----- the decoded-bytes budget -----------------------------------------------------------------


def test_byte_budget_refuses_a_float64_scene_before_decoding(
    client: TestClient, float64_scene: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded = []
    monkeypatch.setattr("service.routes.decode_raster", lambda *a, **k: decoded.append(1))

    answer = _post(client, float64_scene)

    assert answer.status_code == 413
    error = answer.json()["error"]
    assert error["code"] == "decoded_too_large"
    for number in ("7900x7900", "4 bands", "8 bytes (float64)", "1,997,120,000", "268,435,456"):
        assert number in error["message"]
    assert "SATSEG_MAX_DECODED_BYTES" in error["message"]
    assert decoded == []  # refused from the header: no pixel was decoded


def test_byte_budget_counts_bands_and_sample_bytes_not_pixels(varied_checkpoint: Path) -> None:
    """The same 100 x 100 pixels: 3 bands of uint8 fit a 40 kB budget, 4 of uint16 do not."""
    rgb = geotiff_bytes(np.zeros((3, 100, 100), dtype=np.uint8))
    wide = geotiff_bytes(np.zeros((4, 100, 100), dtype=np.uint16))
    with running_app(settings_for(varied_checkpoint, max_decoded_bytes=40_000)) as client:
        assert _post(client, rgb).status_code == 200
        refused = _post(client, wide)
        assert refused.status_code == 413
        assert "100x100 pixels x 4 bands x 2 bytes (uint16) = 80,000 bytes" in refused.text
        png = encode(scene(120, 120))  # 43,200 bytes of RGB: PNG uploads are counted too
        assert _post(client, png, "x.png").json()["error"]["code"] == "decoded_too_large"


# ----- bands and sample types --------------------------------------------------------------------


def test_thousands_of_bands_are_a_413_naming_the_count(client: TestClient) -> None:
    data = geotiff_bytes(np.zeros((3000, 2, 2), dtype=np.uint8))

    answer = _post(client, data)

    assert answer.status_code == 413
    assert answer.json()["error"]["code"] == "too_many_bands"
    assert "3,000 bands" in answer.text and "SATSEG_MAX_BANDS" in answer.text


@pytest.mark.parametrize(
    ("dtype", "named"),
    [("complex64", "complex"), ("int64", "64-bit integer"), ("uint64", "64-bit integer")],
)
def test_complex_and_64_bit_integer_rasters_are_a_422(
    client: TestClient, dtype: str, named: str
) -> None:
    data = geotiff_bytes(np.zeros((3, 8, 8), dtype=dtype))

    answer = _post(client, data)

    assert answer.status_code == 422
    assert answer.json()["error"]["code"] == "unsupported_dtype"
    assert named in answer.json()["error"]["message"]


def test_a_plain_tiff_with_format_geotiff_is_called_a_tiff_without_georeferencing(
    client: TestClient,
) -> None:
    plain = encode(scene(16, 16), "TIFF")

    answer = _post(client, plain, query="?format=geotiff")

    assert answer.status_code == 422
    message = answer.json()["error"]["message"]
    assert "a TIFF without a CRS, geotransform or GCPs" in message
    assert "not a TIFF" not in message
    png = _post(client, encode(scene(16, 16)), "x.png", query="?format=geotiff")
    assert "is not a TIFF" in png.json()["error"]["message"]


# ----- admission by memory ------------------------------------------------------------------------


def test_the_default_budget_is_half_the_cgroup_limit(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("4294967296\n")
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("2147483648\n")
    unlimited = tmp_path / "unlimited"
    unlimited.mkdir()
    (unlimited / "memory.max").write_text("max\n")

    assert memory_limit(v2) == (4 * 1024 * MIB, f"cgroup {v2 / 'memory.max'}")
    assert default_memory_budget(v2) == 2 * 1024 * MIB
    assert default_memory_budget(tmp_path / "v1") == 1024 * MIB
    physical, source = memory_limit(unlimited)
    assert source == "physical memory" and physical > 0
    assert default_memory_budget(unlimited) == physical // 2


class HeldRequest:
    """Holds the first request after its memory is reserved, before its tiles are computed."""

    def __init__(self, engine) -> None:
        self.real = engine._submit
        self.entered = threading.Event()
        self.released = threading.Event()

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        if not self.entered.is_set():
            self.entered.set()
            assert self.released.wait(60)
        return self.real(*args, **kwargs)


def _one_image_budget(client: TestClient) -> int:
    """Room for one IMAGE request's estimated working memory, not for two."""
    engine = client.app.state.engine
    with engine.admit() as ticket:
        need = engine.working_memory(image_size(IMAGE), len(IMAGE), ticket)
    engine.memory = MemoryBudget(need * 3 // 2)
    return need


def test_memory_admission_refuses_a_request_that_would_go_over_the_budget(
    varied_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with running_app(settings_for(varied_checkpoint, memory_wait_s=0)) as client:
        need = _one_image_budget(client)
        engine = client.app.state.engine
        held = HeldRequest(engine)
        monkeypatch.setattr(engine, "_submit", held)
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(_post, client, IMAGE, "x.png")
            assert held.entered.wait(30)
            assert engine.memory.reserved == need
            refused = _post(client, IMAGE, "x.png")
            held.released.set()
            assert first.result(60).status_code == 200
        after = _post(client, IMAGE, "x.png")
        metrics = client.get("/metrics").text

    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "over_memory_budget"
    assert refused.headers["retry-after"] == "1"
    assert after.status_code == 200
    assert engine.memory.reserved == 0  # every reservation was given back
    assert 'satseg_requests_refused_total{reason="memory"} 1.0' in metrics


def test_memory_admission_lets_a_request_wait_for_memory_to_free(
    varied_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with running_app(settings_for(varied_checkpoint, memory_wait_s=60)) as client:
        _one_image_budget(client)
        engine = client.app.state.engine
        held = HeldRequest(engine)
        monkeypatch.setattr(engine, "_submit", held)
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(_post, client, IMAGE, "x.png")
            assert held.entered.wait(30)
            second = pool.submit(_post, client, IMAGE, "x.png")
            end = time.monotonic() + 30
            while engine.in_flight < 2:  # the second is admitted and waiting for memory
                assert time.monotonic() < end
                time.sleep(0.01)
            assert not second.done()
            held.released.set()
            answers = [first.result(60), second.result(60)]

    assert [a.status_code for a in answers] == [200, 200]


def test_a_request_larger_than_the_whole_budget_is_a_413(varied_checkpoint: Path) -> None:
    with running_app(settings_for(varied_checkpoint, memory_budget_bytes=100_000)) as client:
        answer = _post(client, IMAGE, "x.png")

    assert answer.status_code == 413
    assert answer.json()["error"]["code"] == "exceeds_memory_budget"
    assert "SATSEG_MEMORY_BUDGET_BYTES" in answer.text


def test_eight_float64_uploads_at_once_leave_the_service_up_and_its_memory_bounded(
    varied_checkpoint: Path, float64_scene: bytes, tmp_path: Path
) -> None:
    budget = 512 * MIB
    log = tmp_path / "service.log"
    env = service_env(varied_checkpoint, memory_budget_bytes=budget, max_queue=16)
    proc = start_service(env, log)
    try:
        base = service_url(log, proc)
        deadline = time.monotonic() + 180
        while httpx.get(f"{base}/readyz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        ready = process_memory(proc.pid)
        stop = threading.Event()
        health: list[int] = []

        def probe() -> None:
            while not stop.is_set():
                health.append(httpx.get(f"{base}/healthz", timeout=30).status_code)
                time.sleep(0.05)

        def upload(_: int) -> httpx.Response:
            return httpx.post(
                f"{base}/segment", files={"image": ("s.tif", float64_scene)}, timeout=120
            )

        prober = threading.Thread(target=probe)
        prober.start()
        try:
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(upload, range(8)))
        finally:
            stop.set()
            prober.join(60)
        peak = process_memory(proc.pid)["peak"]
        assert proc.poll() is None
        assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)

    assert health and set(health) == {200}
    for answer in answers:
        assert answer.status_code in (200, 413, 503), answer.text
        if answer.status_code == 503:
            assert "retry-after" in answer.headers
    assert peak <= max(ready["peak"], ready["rss"] + budget)
