"""SIGTERM on a real ``python -m service``: drain (not ready), in-flight requests complete,
and the process exits 0 within the grace period."""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from service.__main__ import GracefulServer
from tests.service.helpers import (
    encode,
    free_port,
    png_mask,
    scene,
    service_env,
    start_service,
    wait_ready,
)

GRACE_S = 30.0
DRAIN_S = 1.5


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_drains_finishes_in_flight_requests_and_exits(
    varied_checkpoint: Path, tmp_path: Path
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = service_env(
        varied_checkpoint,
        port,
        tile=64,
        overlap=16,
        batch_max_tiles=2,
        shutdown_drain_s=DRAIN_S,
        shutdown_grace_s=GRACE_S,
    )
    log = tmp_path / "service.log"
    proc = start_service(env, log)
    try:
        wait_ready(base, proc)
        # Hundreds of 64 px tiles: long enough to still be running when SIGTERM arrives.
        image = encode(scene(1200, 1200, seed=11))
        result: dict = {}

        def slow_request() -> None:
            try:
                result["response"] = httpx.post(
                    f"{base}/segment", files={"image": ("big.png", image)}, timeout=120
                )
                result["done"] = time.monotonic()
            except Exception as exc:  # reported by the assertions below
                result["error"] = exc

        request = threading.Thread(target=slow_request)
        request.start()
        end = time.monotonic() + 60
        while httpx.get(f"{base}/readyz", timeout=5).json()["queue"]["in_flight"] < 1:
            assert time.monotonic() < end, "the request never started"
            time.sleep(0.02)

        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        during_drain = httpx.get(f"{base}/readyz", timeout=5)
        assert time.monotonic() - signalled < DRAIN_S, "the probe came too late to judge"
        assert during_drain.status_code == 503
        assert during_drain.json()["error"]["code"] == "shutting_down"
        assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200

        request.join(120)
        returncode = proc.wait(timeout=GRACE_S + 10)
        exited_after = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    output = log.read_text()
    assert "error" not in result, f"{result.get('error')!r}\n{output}"
    response = result["response"]
    assert response.status_code == 200, output
    assert png_mask(response.content).shape == (1200, 1200)
    assert returncode == 0, output
    assert exited_after < GRACE_S
    assert exited_after >= DRAIN_S  # the drain period was honoured
    # The answer came after the drain, when uvicorn had stopped accepting connections: the
    # in-flight request was carried through the shutdown, not merely finished before it.
    assert result["done"] - signalled > DRAIN_S, result["done"] - signalled
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{base}/healthz", timeout=2)


def _server(drain_s: float) -> tuple[GracefulServer, list[int]]:
    drained: list[int] = []
    config = uvicorn.Config(lambda scope, receive, send: None, timeout_graceful_shutdown=30)
    server = GracefulServer(config, on_drain=lambda: drained.append(1), drain_s=drain_s, grace_s=30)
    return server, drained


def test_sigterm_first_drains_then_stops() -> None:
    server, drained = _server(drain_s=60)

    server.handle_exit(signal.SIGTERM, None)
    assert drained == [1] and not server.should_exit
    assert asyncio.run(server.on_tick(1)) is False  # still draining

    server.handle_exit(signal.SIGTERM, None)  # a second signal ends the drain
    assert server.should_exit and drained == [1]
    assert server.config.timeout_graceful_shutdown <= 30


def test_ctrl_c_and_a_zero_drain_stop_at_once() -> None:
    server, drained = _server(drain_s=60)
    server.handle_exit(signal.SIGINT, None)
    assert drained == [1] and server.should_exit

    server, drained = _server(drain_s=0)
    server.handle_exit(signal.SIGTERM, None)
    assert drained == [1] and server.should_exit
