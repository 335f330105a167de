"""API keys, and checkpoints that must be refused without running anything."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from service import limits, routes
from service.app import public_path_matcher
from service.settings import Settings
from shared.checkpoint import load_checkpoint, save_checkpoint
from tests.service.helpers import encode, running_app, scene, settings_for

KEYS = ["first-key-0123456789", "second-key-abcdefghij"]
IMAGE = encode(scene(16, 16))


@pytest.fixture(scope="module")
def keyed(varied_checkpoint: Path):
    with running_app(settings_for(varied_checkpoint, api_keys=KEYS)) as client:
        yield client


def _segment(client: TestClient, headers: dict[str, str] | None = None):
    return client.post("/segment", files={"image": ("x.png", IMAGE)}, headers=headers or {})


# ----- API keys --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "Missing API key"),
        ({"X-API-Key": "wrong"}, "Invalid API key"),
        ({"Authorization": "Bearer wrong"}, "Invalid API key"),
        ({"Authorization": f"Basic {KEYS[0]}"}, "Missing API key"),
        ({"X-API-Key": KEYS[0][:-1]}, "Invalid API key"),
    ],
    ids=["none", "wrong-header", "wrong-bearer", "not-bearer", "prefix"],
)
def test_a_missing_or_wrong_key_is_401(keyed: TestClient, headers: dict, message: str) -> None:
    response = _segment(keyed, headers)

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert message in response.json()["error"]["message"]
    assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "headers",
    [{"X-API-Key": KEYS[0]}, {"X-API-Key": KEYS[1]}, {"Authorization": f"Bearer {KEYS[1]}"}],
    ids=["header-first", "header-second", "bearer"],
)
def test_a_valid_key_is_accepted(keyed: TestClient, headers: dict) -> None:
    assert _segment(keyed, headers).status_code == 200
    assert keyed.get("/model", headers=headers).status_code == 200


def test_every_api_route_needs_a_key_and_probes_and_docs_do_not(keyed: TestClient) -> None:
    assert keyed.get("/model").status_code == 401
    files = [("image", ("i.png", IMAGE)), ("mask", ("m.png", IMAGE))]
    assert keyed.post("/evaluate", files=files).status_code == 401
    for path in ("/healthz", "/readyz", "/openapi.json", "/docs"):
        assert keyed.get(path).status_code == 200, path


def test_the_key_is_checked_before_the_body_is_parsed(
    keyed: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded = []
    monkeypatch.setattr(routes, "decode_raster", lambda *a, **k: decoded.append(1))

    assert _segment(keyed, {"X-API-Key": "wrong"}).status_code == 401
    assert decoded == []


@pytest.mark.parametrize(
    "candidate",
    ["", KEYS[0][:-1], KEYS[0] + "x", KEYS[0].upper(), f" {KEYS[0]}", KEYS[0] + KEYS[1], "\udcff"],
    ids=["empty", "prefix", "extended", "upper-case", "leading-space", "two-keys", "not-utf8"],
)
def test_a_key_matches_only_itself_whole(candidate: str) -> None:
    keys = [k.encode() for k in KEYS]

    assert all(limits.key_matches(key, keys) for key in KEYS)
    assert not limits.key_matches(candidate, keys)
    assert not limits.key_matches(None, keys)
    assert not limits.key_matches(KEYS[0], [])


def test_keys_never_reach_the_logs_or_the_settings_repr(
    varied_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(varied_checkpoint, api_keys=KEYS)
    with caplog.at_level(logging.DEBUG), running_app(settings) as client:
        _segment(client, {"X-API-Key": KEYS[0]})
        _segment(client, {"X-API-Key": KEYS[1] + "x"})
        _segment(client, {"Authorization": f"Bearer {KEYS[1]}"})

    assert caplog.records  # something was logged, and none of it is a key
    for key in KEYS:
        assert key not in caplog.text
        assert key not in repr(settings) and key not in str(settings)
        assert key not in settings.model_dump_json()


def test_public_paths_are_exact_or_explicit_prefixes() -> None:
    is_public = public_path_matcher({"/healthz", "/", "/static/"})

    assert is_public("/healthz") and is_public("/") and is_public("/static/app.js")
    assert not is_public("/healthz/x") and not is_public("/segment") and not is_public("/static")


def test_keys_come_from_the_environment_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SATSEG_API_KEYS", " a-key , b-key ,")
    keys = Settings(_env_file=None).api_keys
    assert [k.get_secret_value() for k in keys] == ["a-key", "b-key"]

    monkeypatch.setenv("SATSEG_API_KEYS", '["c-key"]')
    assert [k.get_secret_value() for k in Settings(_env_file=None).api_keys] == ["c-key"]


def test_without_keys_the_api_is_open(client: TestClient) -> None:
    assert _segment(client).status_code == 200


# ----- checkpoints -----------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates a directory: the stand-in for any code an attacker would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _pickle_bomb(source: Path, path: Path, marker: Path) -> Path:
    ckpt = load_checkpoint(source)
    ckpt["config"]["note"] = _Payload(marker)
    torch.save(ckpt, path)  # torch.save pickles the payload, as an attacker's file would
    return path


def _readyz_error(checkpoint: Path) -> dict:
    with running_app(settings_for(checkpoint)) as client:
        response = client.get("/readyz")
        assert client.get("/healthz").status_code == 200
        segment = _segment(client)
    assert response.status_code == 503
    assert segment.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "model_unavailable"
    assert str(checkpoint) in error["message"]
    return error


def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "payload-ran"
    path = _pickle_bomb(tiny_checkpoint, tmp_path / "evil.pt", marker)

    error = _readyz_error(path)

    assert not marker.exists()
    assert "checkpoint refused" in error["message"]
    # The payload is real: a plain (unsafe) torch.load would have run it.
    control = tmp_path / "control-ran"
    torch.load(_pickle_bomb(tiny_checkpoint, tmp_path / "control.pt", control), weights_only=False)
    assert control.exists()


def test_a_truncated_checkpoint_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    data = tiny_checkpoint.read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])

    _readyz_error(path)


def test_a_checkpoint_whose_labels_disagree_with_its_head_is_refused(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    ckpt = load_checkpoint(tiny_checkpoint)
    classes = ckpt["label_map"]["classes"]
    ckpt["label_map"]["classes"] = [*classes, {"id": 3, "name": "ice", "color": [255, 255, 255]}]
    path = tmp_path / "mismatch.pt"
    save_checkpoint(ckpt, path)

    error = _readyz_error(path)

    # The head's 3 outputs against the 4 classes of the tampered label map, named.
    assert "3 classes but the label map has 4 (ocean, land, lake, ice)" in error["message"]


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.pt"
    path.write_text("definitely not a checkpoint\n")

    _readyz_error(path)
