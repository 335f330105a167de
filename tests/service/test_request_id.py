"""X-Request-ID: taken from the client when it is safe to echo, generated otherwise, returned on
every answer (errors too) and stamped on every log line about the request."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from service.logs import JsonFormatter, RequestIdFilter
from tests.service.helpers import encode, running_app, scene, settings_for

IMAGE = encode(scene(40, 40, seed=5))
GENERATED = re.compile(r"[0-9a-f]{32}")


@pytest.fixture
def keyed(varied_checkpoint: Path) -> Iterator[TestClient]:
    settings = settings_for(varied_checkpoint, api_keys=["k"], max_body_bytes=50_000)
    with running_app(settings, raise_server_exceptions=False) as client:
        yield client


def _segment(client: TestClient, **kw):
    return client.post("/segment", files={"image": ("x.png", IMAGE)}, **kw)


def test_the_clients_id_comes_back_on_success_and_on_errors(keyed: TestClient) -> None:
    ok = _segment(keyed, headers={"X-API-Key": "k", "X-Request-ID": "trace-1"})
    unauthorized = _segment(keyed, headers={"X-Request-ID": "trace-2"})
    too_large = keyed.post(
        "/segment",
        files={"image": ("x.png", b"\0" * 60_000)},
        headers={"X-API-Key": "k", "X-Request-ID": "trace-3"},
    )
    invalid = keyed.post(
        "/segment?format=nope",
        files={"image": ("x.png", IMAGE)},
        headers={"X-API-Key": "k", "X-Request-ID": "trace-4"},
    )
    missing = keyed.get("/nowhere", headers={"X-API-Key": "k", "X-Request-ID": "trace-5"})

    assert [r.status_code for r in (ok, unauthorized, too_large, invalid, missing)] == [
        200,
        401,
        413,
        422,
        404,
    ]
    for n, response in enumerate((ok, unauthorized, too_large, invalid, missing), start=1):
        assert response.headers["x-request-id"] == f"trace-{n}"
    assert "server-timing" in ok.headers


def test_an_id_is_generated_when_none_is_sent(keyed: TestClient) -> None:
    first = keyed.get("/healthz")
    second = keyed.get("/healthz")

    assert GENERATED.fullmatch(first.headers["x-request-id"])
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


@pytest.mark.parametrize(
    "sent",
    ["a" * 10_000, "evil\x01id", "two words", "tab\tid", "é-accent"],
    ids=["10kB", "control-char", "space", "tab", "non-ascii"],
)
def test_an_unsafe_id_is_replaced_not_echoed(keyed: TestClient, sent: str) -> None:
    response = keyed.get("/healthz", headers={"X-Request-ID": sent.encode("utf-8")})

    assert response.status_code == 200
    returned = response.headers["x-request-id"]
    assert returned != sent
    assert GENERATED.fullmatch(returned)


class Captured:
    """JSON lines written by the service's own formatter, as a list of dicts."""

    def __init__(self) -> None:
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        self.handler.addFilter(RequestIdFilter())
        self.handler.setFormatter(JsonFormatter())

    def lines(self) -> list[dict]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines() if line]


@pytest.fixture
def captured() -> Iterator[Captured]:
    capture = Captured()
    root = logging.getLogger()
    level = root.level
    root.addHandler(capture.handler)
    root.setLevel(logging.INFO)
    yield capture
    root.removeHandler(capture.handler)
    root.setLevel(level)


def test_every_log_line_about_a_request_carries_its_id(
    keyed: TestClient, captured: Captured, monkeypatch: pytest.MonkeyPatch
) -> None:
    predictor = keyed.app.state.engine.predictor

    def broken(x: torch.Tensor) -> torch.Tensor:
        raise ValueError("broken kernel")

    monkeypatch.setattr(predictor, "forward", broken)

    failed = _segment(keyed, headers={"X-API-Key": "k", "X-Request-ID": "fail-7"})

    assert failed.status_code == 500
    assert failed.headers["x-request-id"] == "fail-7"
    mine = [line for line in captured.lines() if line["request_id"] == "fail-7"]
    messages = [line["message"] for line in mine]
    assert any("unhandled error on POST /segment" in m for m in messages)
    access = [line for line in mine if line["logger"] == "service.access"]
    assert len(access) == 1
    assert access[0]["status"] == 500
    assert access[0]["route"] == "/segment"
    assert access[0]["bytes_in"] > len(IMAGE)
