"""SIGTERM on a real ``python -m service``: drain (not ready), in-flight requests complete,
and the process exits 0 within the grace period."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.service.helpers import encode, free_port, png_mask, scene

ROOT = Path(__file__).resolve().parents[2]
GRACE_S = 30.0
DRAIN_S = 1.5


def _wait_ready(base: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, "the service exited during start-up"
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("the service did not become ready")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_drains_finishes_in_flight_requests_and_exits(
    varied_checkpoint: Path, tmp_path: Path
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "SATSEG_CHECKPOINT": str(varied_checkpoint),
        "SATSEG_HOST": "127.0.0.1",
        "SATSEG_PORT": str(port),
        "SATSEG_DEVICE": "cpu",
        "SATSEG_PRECISION": "fp32",
        "SATSEG_TILE": "64",
        "SATSEG_OVERLAP": "16",
        "SATSEG_BATCH_MAX_TILES": "2",
        "SATSEG_SHUTDOWN_DRAIN_S": str(DRAIN_S),
        "SATSEG_SHUTDOWN_GRACE_S": str(GRACE_S),
        "SATSEG_API_KEYS": "",
    }
    log = (tmp_path / "service.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=log, stderr=log
    )
    try:
        _wait_ready(base, proc)
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
        log.close()

    output = (tmp_path / "service.log").read_text()
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
