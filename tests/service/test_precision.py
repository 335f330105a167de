"""GET /model and the log say which precision serves and why: the int8 gate's verdict."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import shared.acceleration as acceleration
import shared.precision as precision
from service.app import create_app
from service.engine import Engine
from shared.inference import InferenceOptions, Predictor
from shared.labels import LabelMap
from shared.preprocess import Normalization
from tests.service.helpers import settings_for
from tests.toy_models import Toy, lake_fragile_inputs


def test_model_reports_the_bf16_fallback_when_int8_costs_the_lakes(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calibration, checks = lake_fragile_inputs()
    monkeypatch.setattr(acceleration, "calibration_set", lambda *a, **k: (calibration, checks))
    monkeypatch.setattr(precision, "has_int8_matmul", lambda: True)
    monkeypatch.setattr(precision, "cpu_bf16_is_fast", lambda: True)
    settings = settings_for(tiny_checkpoint, precision="auto", optimize=True, tile=32, overlap=0)

    def load(options: InferenceOptions) -> Predictor:
        return Predictor(Toy(), LabelMap.load(), Normalization(), options)

    app = create_app(settings, engine=Engine(settings, load=load))
    with caplog.at_level(logging.INFO), TestClient(app) as client:
        assert app.state.engine.wait_loaded(60)
        body = client.get("/model").json()

    assert body["precision"] == "bf16"
    reason = body["precision_reason"]
    assert "int8 refused by the agreement gate" in reason and "lake IoU 0.000 < 0.9" in reason
    agreement = body["int8_agreement"]
    assert agreement["class_iou"]["lake"] == 0.0 and agreement["class_pixels"]["lake"] > 0
    assert agreement["class_iou"]["ocean"] == 1.0 and agreement["pixel"] >= 0.995
    logged = [r.getMessage() for r in caplog.records if r.name.startswith(("shared", "service"))]
    assert any("model ready" in m and "lake IoU 0.000" in m and "(bf16;" in m for m in logged)


def test_model_says_an_explicit_precision_was_set(client: TestClient) -> None:
    body = client.get("/model").json()
    assert (body["precision"], body["precision_reason"]) == ("fp32", "fp32: set explicitly")
    assert body["int8_agreement"] is None
