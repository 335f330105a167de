"""GET /metrics: the Prometheus text format, counting exactly the requests that were made."""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.service.helpers import (
    encode,
    running_app,
    scene,
    service_env,
    service_url,
    settings_for,
    start_service,
    wait_ready,
)

KEY = "metrics-test-key"
IMAGE = encode(scene(40, 40, seed=3))


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, keyed by name and sorted labels (parsed by prometheus_client)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(scrape: dict, name: str, **labels: str) -> float:
    return scrape.get((name, tuple(sorted(labels.items()))), 0.0)


class HeldForward:
    """Holds the first forward pass until ``release()``, so a request stays admitted."""

    def __init__(self, real) -> None:
        self.real = real
        self.entered = threading.Event()
        self.released = threading.Event()

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if not self.entered.is_set():
            self.entered.set()
            assert self.released.wait(60)
        return self.real(batch)

    def release(self) -> None:
        self.released.set()


def test_counters_show_exactly_the_requests_made(
    varied_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for(varied_checkpoint, api_keys=[KEY], max_queue=1, max_body_bytes=50_000)
    headers = {"X-API-Key": KEY}
    with running_app(settings) as client:
        engine = client.app.state.engine
        held = HeldForward(engine.predictor.run_batch)
        monkeypatch.setattr(engine.predictor, "run_batch", held)

        def post(**kw):
            return client.post("/segment", files={"image": ("x.png", IMAGE)}, **kw)

        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(post, headers=headers)
            assert held.entered.wait(30)  # the only queue slot is taken
            saturated = post(headers=headers)
            held.release()
            assert first.result(60).status_code == 200
        assert saturated.status_code == 503
        assert saturated.json()["error"]["code"] == "overloaded"
        assert post(headers=headers).status_code == 200
        too_big = client.post(
            "/segment", files={"image": ("x.png", b"\0" * 60_000)}, headers=headers
        )
        assert too_big.status_code == 413
        assert post().status_code == 401  # no key

        response = client.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    scrape = samples(response.text)
    segment = {"route": "/segment"}
    assert value(scrape, "satseg_requests_total", status="200", **segment) == 2
    assert value(scrape, "satseg_requests_total", status="503", **segment) == 1
    assert value(scrape, "satseg_requests_total", status="413", **segment) == 1
    assert value(scrape, "satseg_requests_total", status="401", **segment) == 1
    assert value(scrape, "satseg_request_duration_seconds_count", **segment) == 5
    refused = {
        labels[0][1]: v
        for (name, labels), v in scrape.items()
        if name == "satseg_requests_refused_total"
    }
    assert refused["overload"] == 1
    assert refused["body_size"] == 1
    assert refused["auth"] == 1
    assert refused["pixels"] == refused["deadline"] == refused["memory"] == 0
    # Two images went through the model; 40x40 is one tile, so every pass held one tile.
    assert value(scrape, "satseg_inference_seconds_count") == 2
    assert value(scrape, "satseg_batch_tiles_count") == 2
    assert value(scrape, "satseg_batch_tiles_sum") == 2
    assert value(scrape, "satseg_requests_admitted") == 0
    assert value(scrape, "satseg_queue_depth") == 0
    assert value(scrape, "satseg_model_load_seconds") > 0
    sha = hashlib.sha256(varied_checkpoint.read_bytes()).hexdigest()
    info = [
        labels for (name, labels), v in scrape.items() if name == "satseg_model_info" and v == 1
    ]
    assert info == [
        tuple(
            sorted(
                {
                    "sha256": sha,
                    "arch": "deeplabv3",
                    "backbone": "mobilenet_v3_large",
                    "precision": "fp32",
                    "device": "cpu",
                }.items()
            )
        )
    ]


def test_metrics_need_no_api_key_and_can_be_turned_off(varied_checkpoint: Path) -> None:
    with running_app(settings_for(varied_checkpoint, api_keys=[KEY]), wait=False) as client:
        assert client.get("/metrics").status_code == 200
    with running_app(settings_for(varied_checkpoint, metrics=False), wait=False) as client:
        assert client.get("/metrics").status_code == 404


def test_unknown_paths_share_one_series(client) -> None:
    for path in ("/a", "/b", "/wp-login.php"):
        assert client.get(path).status_code == 404

    scrape = samples(client.get("/metrics").text)

    routes = {dict(labels)["route"] for (name, labels) in scrape if name == "satseg_requests_total"}
    assert "other" in routes
    assert not routes & {"/a", "/b", "/wp-login.php"}


def test_each_app_counts_only_its_own_requests(varied_checkpoint: Path) -> None:
    """The registry belongs to the app (one process, one model, one registry), not to
    prometheus-client's global one: two apps in one process never mix their counts."""
    settings = settings_for(varied_checkpoint)
    with running_app(settings) as first, running_app(settings) as second:
        assert first.post("/segment", files={"image": ("x.png", IMAGE)}).status_code == 200
        counted = samples(first.get("/metrics").text), samples(second.get("/metrics").text)

    ok = {"route": "/segment", "status": "200"}
    assert [value(scrape, "satseg_requests_total", **ok) for scrape in counted] == [1, 0]


def test_one_service_process_counts_every_request(varied_checkpoint: Path, tmp_path: Path) -> None:
    """The supported shape: ``python -m service`` is one process whose /metrics counts every
    request it answered."""
    log = tmp_path / "log"
    proc = start_service(service_env(varied_checkpoint, tile=64, overlap=16), log)
    try:
        base = service_url(log, proc)
        wait_ready(base, proc)
        for _ in range(5):
            answer = httpx.post(f"{base}/segment", files={"image": ("x.png", IMAGE)}, timeout=60)
            assert answer.status_code == 200
        scrape = samples(httpx.get(f"{base}/metrics", timeout=10).text)
    finally:
        proc.terminate()
        proc.wait(60)

    assert value(scrape, "satseg_requests_total", route="/segment", status="200") == 5
    assert value(scrape, "satseg_inference_seconds_count") == 5
