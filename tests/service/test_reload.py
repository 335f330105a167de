"""Model swap with no failed request: POST /admin/reload and SIGHUP.

Two checkpoints that predict different constant classes (0 everywhere, 1 everywhere) make the
model behind each answer visible in the answer itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from benchmarks.load import Answer, Reload, run_load
from tests.service.helpers import (
    encode,
    png_mask,
    running_app,
    scene,
    service_env,
    service_url,
    settings_for,
    start_service,
    wait_ready,
)
from tests.service.models import constant_checkpoint

ADMIN = "admin-secret"
IMAGE = encode(scene(40, 40, seed=2))


@pytest.fixture(scope="module")
def models(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ``zero.pt`` (class 0 everywhere) and ``one.pt`` (class 1 everywhere)."""
    folder = tmp_path_factory.mktemp("models")
    constant_checkpoint(tiny_checkpoint, 0, folder / "zero.pt")
    constant_checkpoint(tiny_checkpoint, 1, folder / "one.pt")
    return folder


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def predicted(response) -> set[int]:
    assert response.status_code == 200, response.text
    return set(np.unique(png_mask(response.content)).tolist())


def _segment(client: TestClient):
    return client.post("/segment", files={"image": ("x.png", IMAGE)})


def _reload(client: TestClient, body: dict | None = None, key: str = ADMIN):
    return client.post("/admin/reload", json=body, headers={"X-API-Key": key})


@pytest.fixture
def admin_app(models: Path):
    settings = settings_for(
        models / "zero.pt", admin_keys=[ADMIN], api_keys=["api"], checkpoint_dir=models
    )
    with running_app(settings, headers={"X-API-Key": "api"}) as client:
        yield client


def test_reload_needs_admin_keys_set_and_an_admin_key(models: Path, admin_app) -> None:
    with running_app(settings_for(models / "zero.pt"), wait=False) as plain:
        assert _reload(plain).status_code == 404
    assert _reload(admin_app, key="api").status_code == 401  # an API key is not an admin key
    assert _reload(admin_app, key="").status_code == 401


def test_a_reload_swaps_the_model_and_every_answer_names_its_version(
    models: Path, admin_app: TestClient
) -> None:
    before = _segment(admin_app)
    assert predicted(before) == {0}
    assert before.headers["x-model-version"] == sha(models / "zero.pt")

    swap = _reload(admin_app, {"checkpoint": "one.pt"})

    assert swap.status_code == 200, swap.text
    assert swap.json()["sha256"] == sha(models / "one.pt")
    assert swap.json()["previous_sha256"] == sha(models / "zero.pt")
    after = _segment(admin_app)
    assert predicted(after) == {1}
    assert after.headers["x-model-version"] == sha(models / "one.pt")
    info = admin_app.get("/model")
    assert info.json()["checkpoint"]["sha256"] == sha(models / "one.pt")
    assert info.headers["x-model-version"] == sha(models / "one.pt")
    assert admin_app.get("/readyz").status_code == 200
    # No body: back to SATSEG_CHECKPOINT.
    assert _reload(admin_app).json()["sha256"] == sha(models / "zero.pt")
    assert predicted(_segment(admin_app)) == {0}


@pytest.mark.parametrize(
    "name",
    ["../zero.pt", "/etc/passwd", "sub/../../one.pt", "", "link.pt"],
    ids=["dotdot", "absolute", "nested-dotdot", "the-folder", "symlink-out"],
)
def test_a_checkpoint_outside_the_folder_is_refused(
    models: Path, tmp_path: Path, name: str
) -> None:
    folder = tmp_path / "allowed"
    folder.mkdir()
    shutil.copy(models / "one.pt", tmp_path / "one.pt")  # right beside the folder
    shutil.copy(models / "zero.pt", tmp_path / "zero.pt")
    (folder / "link.pt").symlink_to(tmp_path / "one.pt")
    settings = settings_for(tmp_path / "zero.pt", admin_keys=[ADMIN], checkpoint_dir=folder)
    with running_app(settings) as client:
        answer = _reload(client, {"checkpoint": name or "."})
        assert answer.status_code == 422
        assert answer.json()["error"]["code"] == "checkpoint_outside_folder"
        assert predicted(_segment(client)) == {0}


class Pickled:
    """An object whose unpickling would run code."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/satseg-pwned",))


@pytest.mark.parametrize("kind", ["corrupt", "pickle"])
def test_a_bad_checkpoint_is_refused_and_the_old_model_keeps_serving(
    models: Path, tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "ckpts"
    folder.mkdir()
    bad = folder / "bad.pt"
    if kind == "corrupt":
        data = (models / "one.pt").read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    else:
        torch.save({"state_dict": {}, "payload": Pickled()}, bad)
    settings = settings_for(models / "zero.pt", admin_keys=[ADMIN], checkpoint_dir=folder)
    with running_app(settings) as client:
        with caplog.at_level(logging.ERROR, logger="service.engine"):
            answer = _reload(client, {"checkpoint": "bad.pt"})

        assert answer.status_code == 422
        assert answer.json()["error"]["code"] == "checkpoint_refused"
        assert "keeps serving" in answer.json()["error"]["message"]
        assert client.get("/readyz").status_code == 200
        still = _segment(client)
        assert predicted(still) == {0}
        assert still.headers["x-model-version"] == sha(models / "zero.pt")
        metrics = client.get("/metrics").text
    assert 'satseg_model_reloads_total{result="refused"} 1.0' in metrics
    assert 'satseg_model_reloads_total{result="swapped"} 0.0' in metrics
    assert any("model reload refused" in r.getMessage() for r in caplog.records)
    assert not Path("/tmp/satseg-pwned").exists()


def test_a_request_in_flight_finishes_on_the_model_it_started_with(
    models: Path, admin_app: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = admin_app.app.state.engine
    entered, release = threading.Event(), threading.Event()
    real = engine._predict

    def held(*args, **kwargs):
        # The first request waits after admission, before its inference starts.
        if not entered.is_set():
            entered.set()
            assert release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "_predict", held)
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(_segment, admin_app)
        assert entered.wait(30)  # admitted on the old model, inference not yet started
        swap = _reload(admin_app, {"checkpoint": "one.pt"})
        assert swap.status_code == 200
        after = _segment(admin_app)  # the new model answers while the old one is still busy
        release.set()
        first = in_flight.result(60)

    assert predicted(after) == {1}
    assert after.headers["x-model-version"] == sha(models / "one.pt")
    assert predicted(first) == {0}
    assert first.headers["x-model-version"] == sha(models / "zero.pt")


def _service(checkpoint: Path, tmp_path: Path, **settings: object):
    env = service_env(checkpoint, tile=64, overlap=16, admin_keys=ADMIN, **settings)
    log = tmp_path / "service.log"
    proc = start_service(env, log)
    try:
        return service_url(log, proc), proc
    except BaseException:
        proc.kill()
        raise


def test_sighup_reloads_the_checkpoint_file(models: Path, tmp_path: Path) -> None:
    served = tmp_path / "served.pt"
    shutil.copy(models / "zero.pt", served)
    base, proc = _service(served, tmp_path)
    try:
        wait_ready(base, proc)
        image = {"image": ("x.png", IMAGE)}
        assert predicted(httpx.post(f"{base}/segment", files=image, timeout=60)) == {0}
        tmp = tmp_path / "next.pt"
        shutil.copy(models / "one.pt", tmp)
        os.replace(tmp, served)  # how an operator swaps the file: atomically

        proc.send_signal(signal.SIGHUP)

        end = time.monotonic() + 120
        while httpx.get(f"{base}/model").json()["checkpoint"]["sha256"] != sha(served):
            assert proc.poll() is None, "SIGHUP killed the service"
            assert time.monotonic() < end, "SIGHUP did not swap the model"
            time.sleep(0.2)
        assert predicted(httpx.post(f"{base}/segment", files=image, timeout=60)) == {1}
        assert httpx.get(f"{base}/readyz").status_code == 200
    finally:
        proc.terminate()
        proc.wait(60)
    assert "model swapped" in (tmp_path / "service.log").read_text()


def _mask_classes(png: bytes) -> set[int]:
    with Image.open(io.BytesIO(png)) as im:
        return set(np.unique(np.array(im)).tolist())


def test_a_reload_under_load_fails_no_request(models: Path, tmp_path: Path) -> None:
    """The load generator runs 4 clients for 6 s with a reload at 2 s (once 4 answers are in),
    and on for 2 s after the reload answered however long it took: every answer is a 200,
    answers before the reload come from the old model and those after it from the new one."""
    base, proc = _service(models / "zero.pt", tmp_path, checkpoint_dir=models)
    try:
        wait_ready(base, proc)
        reference = {
            name: httpx.post(f"{base}/segment", files={"image": ("x.png", IMAGE)}, timeout=60)
            for name in ("zero",)
        }
        answers: list[Answer] = []
        reload = Reload(at_s=2.0, checkpoint="one.pt", key=ADMIN, load_after_s=2.0, after_answers=4)
        summary = asyncio.run(
            run_load(
                base,
                IMAGE,
                clients=4,
                seconds=6.0,
                fmt="png",
                max_requests=5_000,
                reload=reload,
                answers=answers,
            )
        )
        after = httpx.post(f"{base}/segment", files={"image": ("x.png", IMAGE)}, timeout=60)
    finally:
        proc.terminate()
        proc.wait(60)

    assert reload.status == 200
    assert summary["by_status"] == {"200": summary["requests"]}  # not one failed request
    old, new = sha(models / "zero.pt"), sha(models / "one.pt")
    assert (reload.old_version, reload.new_version) == (old, new)
    assert summary["reload"]["new_model_before_reload"] == 0
    assert summary["reload"]["old_model_after_reload"] == 0
    before = [a for a in answers if a.answered < reload.sent]
    later = [a for a in answers if a.sent > reload.answered]
    assert before and later, "the run had no answers on one side of the swap"
    assert {a.version for a in before} == {old}
    assert {a.version for a in later} == {new}
    # One body per model, and each is that model's constant mask.
    bodies = {a.version: a.body_sha256 for a in answers}
    assert len({a.body_sha256 for a in answers if a.version == old}) == 1
    assert len({a.body_sha256 for a in answers if a.version == new}) == 1
    assert bodies[old] == hashlib.sha256(reference["zero"].content).hexdigest()
    assert bodies[new] == hashlib.sha256(after.content).hexdigest()
    assert _mask_classes(reference["zero"].content) == {0}
    assert _mask_classes(after.content) == {1}
