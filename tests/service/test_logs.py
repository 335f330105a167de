"""Structured logs of a real ``python -m service``: one JSON object per line with
SATSEG_LOG_FORMAT=json, never a configured key, and plain text by default."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import pytest

from tests.service.helpers import (
    encode,
    scene,
    service_env,
    service_url,
    start_service,
    wait_ready,
)

API_KEY = "api-key-d41d8cd98f00b204"
ADMIN_KEY = "admin-key-e9800998ecf8427e"
IMAGE = encode(scene(40, 40, seed=11))


def _serve_and_log(checkpoint: Path, tmp_path: Path, **settings: object) -> str:
    """Run the service, make requests that succeed and fail (with right and wrong keys), stop it
    with SIGTERM, and return everything it logged."""
    log = tmp_path / "service.log"
    env = service_env(
        checkpoint,
        tile=64,
        overlap=16,
        api_keys=API_KEY,
        admin_keys=ADMIN_KEY,
        shutdown_drain_s=0,
        **settings,
    )
    proc = start_service(env, log)
    try:
        base = service_url(log, proc)
        wait_ready(base, proc)
        image = {"image": ("x.png", IMAGE)}
        ok = httpx.post(
            f"{base}/segment",
            files=image,
            headers={"X-API-Key": API_KEY, "X-Request-ID": "req-ok"},
            timeout=60,
        )
        assert ok.status_code == 200
        wrong = httpx.post(
            f"{base}/segment", files=image, headers={"Authorization": f"Bearer {API_KEY}x"}
        )
        assert wrong.status_code == 401
        bearer = httpx.get(f"{base}/model", headers={"Authorization": f"Bearer {API_KEY}"})
        assert bearer.status_code == 200
        refused = httpx.post(
            f"{base}/admin/reload",
            json={"checkpoint": "x.pt"},
            headers={"X-API-Key": ADMIN_KEY},
            timeout=60,
        )
        assert refused.status_code == 422  # no SATSEG_CHECKPOINT_DIR
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    return log.read_text()


def test_json_logs_parse_line_by_line_and_never_hold_a_key(
    varied_checkpoint: Path, tmp_path: Path
) -> None:
    text = _serve_and_log(varied_checkpoint, tmp_path, log_format="json")

    lines = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line parses
    assert API_KEY not in text
    assert ADMIN_KEY not in text
    assert "\\u0089PNG" not in text and "PNG\\r\\n" not in text  # no image bytes either
    for line in lines:
        assert {"time", "level", "logger", "message", "request_id"} <= set(line)
    access = {line["request_id"]: line for line in lines if line["logger"] == "service.access"}
    ok = access["req-ok"]
    assert (ok["method"], ok["route"], ok["status"]) == ("POST", "/segment", 200)
    assert ok["duration_ms"] > 0
    assert ok["bytes_in"] > len(IMAGE) and ok["bytes_out"] > 0
    assert len(ok["model_version"]) == 64
    statuses = sorted(line["status"] for line in access.values() if line["route"] != "/readyz")
    assert statuses == [200, 200, 401, 422]
    assert any(line["message"].startswith("model ready") for line in lines)


def test_logs_are_plain_text_by_default(varied_checkpoint: Path, tmp_path: Path) -> None:
    text = _serve_and_log(varied_checkpoint, tmp_path)

    assert API_KEY not in text and ADMIN_KEY not in text
    request_lines = [line for line in text.splitlines() if "[req-ok]" in line]
    assert any("POST /segment 200" in line for line in request_lines)
    with pytest.raises(json.JSONDecodeError):
        json.loads(request_lines[0])
