"""Helpers for the service tests: settings around the tiny checkpoint, a started app, images.

Tiles are 64 px with 16 px overlap so that images of a few hundred pixels already take the
tiled path, and every model call stays cheap on a CPU.
"""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.settings import Settings

TEST_TILE = 64
TEST_OVERLAP = 16


def settings_for(checkpoint: Path | str, **overrides: Any) -> Settings:
    """Settings for tests: CPU, fp32 (bit-stable results), small tiles, no drain delay."""
    values: dict[str, Any] = {
        "checkpoint": Path(checkpoint),
        "device": "cpu",
        "precision": "fp32",
        # The eager model, so answers compare exactly with Predictor's default path; the
        # optimised forward has tests of its own (tests/shared/test_acceleration.py).
        "optimize": False,
        "tile": TEST_TILE,
        "overlap": TEST_OVERLAP,
        "batch_max_tiles": 4,
        "batch_timeout_ms": 2.0,
        "shutdown_drain_s": 0.0,
        "api_keys": [],
    }
    values.update(overrides)
    return _ExplicitSettings(**values)


class _ExplicitSettings(Settings):
    """Settings from the values given and the defaults only: neither ``SATSEG_*`` variables in
    a developer's shell nor a ``.env`` file change what the tests see."""

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, **other_sources):  # type: ignore[override]
        return (init_settings,)


@contextmanager
def running_app(settings: Settings, *, wait: bool = True, **client_kw: Any) -> Iterator[TestClient]:
    """A started app (lifespan entered) and its client; waits for the model unless ``wait``."""
    app = create_app(settings)
    with TestClient(app, **client_kw) as client:
        if wait:
            assert app.state.engine.wait_loaded(timeout=120), "model did not load"
        yield client


def encode(array: np.ndarray, fmt: str = "PNG", **save: Any) -> bytes:
    """An array saved as an image file, in memory."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **save)
    return buf.getvalue()


def scene(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A ``(H, W, 3)`` uint8 test image with structure (a gradient and a disc) plus noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    disc = (y - height / 2) ** 2 + (x - width / 3) ** 2 < (min(height, width) / 3) ** 2
    image = np.stack(
        [x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), disc * 200], axis=-1
    ).astype(np.int16)
    image += rng.integers(-20, 20, size=image.shape, dtype=np.int16)
    return image.clip(0, 255).astype(np.uint8)


def png_mask(response_content: bytes) -> np.ndarray:
    """The class ids of a /segment PNG answer."""
    with Image.open(io.BytesIO(response_content)) as im:
        assert im.mode == "P"
        return np.array(im)


def listening_socket() -> socket.socket:
    """A loopback TCP socket on a port the system chose, for ``uvicorn.Server.run(sockets=...)``:
    the port stays bound from choosing it to serving on it, so no other process can take it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def rss_bytes() -> int:
    """Current resident set size of this process (Linux)."""
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux: VmHWM)."""
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM missing from /proc/self/status")


ROOT = Path(__file__).resolve().parents[2]


def service_env(checkpoint: Path, port: int = 0, **settings: object) -> dict[str, str]:
    """Environment for ``python -m service``: the test checkpoint on CPU, ``SATSEG_*`` overrides
    given as keyword arguments (``tile=64`` -> ``SATSEG_TILE=64``); port 0 lets the server choose
    (see :func:`service_url`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SATSEG_")}
    env.update(
        {
            "SATSEG_CHECKPOINT": str(checkpoint),
            "SATSEG_HOST": "127.0.0.1",
            "SATSEG_PORT": str(port),
            "SATSEG_DEVICE": "cpu",
            "SATSEG_PRECISION": "fp32",
        }
    )
    env.update({f"SATSEG_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def start_service(env: dict[str, str], log: Path) -> subprocess.Popen:
    """``python -m service`` from the repository root, output to ``log``."""
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=out, stderr=out
        )


def service_url(log: Path, proc: subprocess.Popen, timeout: float = 180) -> str:
    """The address a ``python -m service`` started with ``SATSEG_PORT=0`` listens on, read from
    uvicorn's start-up line (the server binds the port it reports: no race for a free one)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", log.read_text())
        if found:
            return found.group(1)
        assert proc.poll() is None, f"the service exited during start-up:\n{log.read_text()}"
        time.sleep(0.1)
    raise AssertionError(f"the service did not start listening:\n{log.read_text()}")


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Poll ``/readyz`` until 200; fail if the process exits first."""
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


def process_memory(pid: int) -> dict[str, int]:
    """``{"rss": bytes, "peak": bytes}`` of a live process (Linux VmRSS / VmHWM)."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values["rss" if key == "VmRSS" else "peak"] = int(rest.split()[0]) * 1024
    return values
