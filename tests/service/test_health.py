"""GET /healthz, /readyz and /model, during loading, when ready and when loading failed."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.engine import Engine
from service.settings import Settings
from shared.inference import InferenceOptions, Predictor
from shared.labels import LabelMap
from tests.service.helpers import encode, running_app, scene, settings_for


def test_model_describes_architecture_classes_and_checkpoint(
    client: TestClient, label_map: LabelMap
) -> None:
    body = client.get("/model").json()

    assert body["arch"] == {
        "name": "deeplabv3",
        "backbone": "mobilenet_v3_large",
        "num_classes": 3,
        "aux_loss": False,
    }
    assert body["classes"] == [
        {"id": c.id, "name": c.name, "color": list(c.color)} for c in label_map.classes
    ]
    assert body["ignore_index"] == 255
    checkpoint = body["checkpoint"]
    assert checkpoint["path"].endswith("varied.pt")
    assert checkpoint["metrics"] == {"val": {"miou": 0.0}}
    assert checkpoint["config"]["model"]["backbone"] == "mobilenet_v3_large"
    assert checkpoint["created_at"].startswith("20")
    assert checkpoint["schema_version"] == 1
    assert (body["device"], body["precision"]) == ("cpu", "fp32")
    assert (body["tile"], body["overlap"]) == (64, 16)
    assert body["flips"] is False
    assert body["logit_offsets"] is None  # the checkpoint records none


def test_model_reports_the_checkpoint_logit_offsets_and_segment_applies_them(
    varied_checkpoint: Path, tmp_path: Path
) -> None:
    from shared.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(varied_checkpoint)
    ckpt["logit_offsets"] = [0.0, 0.0, -1000.0]  # class 2 is never chosen
    save_checkpoint(ckpt, tmp_path / "adjusted.pt")
    image = encode(scene(100, 90, seed=4))
    with running_app(settings_for(varied_checkpoint)) as plain:
        plain_mask = plain.post("/segment?format=rle", files={"image": image}).json()
    with running_app(settings_for(tmp_path / "adjusted.pt")) as adjusted:
        body = adjusted.get("/model").json()
        assert body["logit_offsets"] == {"ocean": 0.0, "land": 0.0, "lake": -1000.0}
        adjusted_mask = adjusted.post("/segment?format=rle", files={"image": image}).json()
    area = {c["name"]: c["area"] for c in plain_mask["classes"]}
    assert area["lake"] > 0  # without the offsets the scene has class 2
    assert {c["name"]: c["area"] for c in adjusted_mask["classes"]}["lake"] == 0


def test_flips_setting_reaches_the_model_and_is_reported(varied_checkpoint: Path) -> None:
    image = encode(scene(100, 90, seed=4))
    with running_app(settings_for(varied_checkpoint)) as plain:
        plain_logits = plain.post("/segment?format=probabilities", files={"image": image})
    with running_app(settings_for(varied_checkpoint, flips=True)) as flipped:
        assert flipped.get("/model").json()["flips"] is True
        engine = flipped.app.state.engine
        assert engine.model.predictor.options.flips is True
        flipped_logits = flipped.post("/segment?format=probabilities", files={"image": image})
    assert plain_logits.status_code == flipped_logits.status_code == 200
    assert plain_logits.content != flipped_logits.content  # the average of four views differs


def test_readyz_reports_the_queue_when_ready(client: TestClient) -> None:
    response = client.get("/readyz")

    assert response.status_code == 200
    assert response.json() == {"status": "ready", "queue": {"in_flight": 0, "capacity": 16}}
    assert client.get("/healthz").json() == {"status": "ok"}


@pytest.fixture
def slow_loading(service_settings: Settings):
    """An app whose model load waits for ``release`` (yields client and the event)."""
    release = threading.Event()

    def load(options: InferenceOptions) -> Predictor:
        assert release.wait(60)
        return Predictor.from_checkpoint(service_settings.checkpoint, options)

    app = create_app(service_settings, engine=Engine(service_settings, load=load))
    with TestClient(app) as client:
        yield client, release, app.state.engine
        release.set()


def test_healthz_answers_while_the_model_loads_and_readyz_flips(slow_loading) -> None:
    client, release, engine = slow_loading

    assert client.get("/healthz").status_code == 200
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "loading"
    assert client.get("/model").status_code == 503
    segment = client.post("/segment", files={"image": ("x.png", encode(scene(8, 8)))})
    assert segment.status_code == 503
    assert segment.json()["error"]["code"] == "loading"
    assert segment.headers["retry-after"] == "1"

    release.set()
    assert engine.wait_loaded(60)

    assert client.get("/readyz").status_code == 200
    assert client.post("/segment", files={"image": ("x.png", encode(scene(8, 8)))}).is_success


def test_missing_checkpoint_leaves_the_service_alive_but_never_ready(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "best.pt"
    with running_app(settings_for(missing)) as client:
        for _ in range(2):  # stays so: no retry loop, no crash
            response = client.get("/readyz")
            assert response.status_code == 503
            error = response.json()["error"]
            assert error["code"] == "model_unavailable"
            assert str(missing) in error["message"]
        assert client.get("/healthz").status_code == 200
        segment = client.post("/segment", files={"image": ("x.png", encode(scene(8, 8)))})
        assert segment.status_code == 503
        assert segment.json()["error"]["code"] == "model_unavailable"
        assert client.get("/model").status_code == 503


def test_an_impossible_device_is_reported_not_raised(tiny_checkpoint: Path) -> None:
    # CUDA asked for where there is none (or a precision the device cannot run).
    import torch

    if torch.cuda.is_available():
        settings = settings_for(tiny_checkpoint, device="cpu", precision="fp16")
    else:
        settings = settings_for(tiny_checkpoint, device="cuda")
    with running_app(settings) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert "could not load the model" in response.json()["error"]["message"]
