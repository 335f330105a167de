"""The app factory: routers, and an OpenAPI document that describes every answer."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.service.helpers import settings_for

API = {
    ("post", "/segment"): {"200", "400", "413", "415", "422", "500", "503", "504"},
    ("post", "/evaluate"): {"200", "400", "413", "415", "422", "500", "503", "504"},
    ("get", "/model"): {"200", "503"},
    ("get", "/healthz"): {"200"},
    ("get", "/readyz"): {"200", "503"},
}


@pytest.fixture(scope="module")
def open_schema() -> dict:
    return create_app(settings_for("unused.pt")).openapi()


def test_every_endpoint_documents_its_answers_with_the_error_model(open_schema: dict) -> None:
    for (method, path), statuses in API.items():
        responses = open_schema["paths"][path][method]["responses"]
        assert statuses <= set(responses), (method, path)
        for status in statuses - {"200"}:
            ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith("/ErrorResponse"), (method, path, status)


def test_segment_documents_every_answer_format(open_schema: dict) -> None:
    operation = open_schema["paths"]["/segment"]["post"]
    content = operation["responses"]["200"]["content"]

    assert set(content) == {"image/png", "image/tiff", "application/json", "application/geo+json"}
    assert content["application/json"]["schema"]["$ref"].endswith("/SegmentRle")
    fmt = next(p for p in operation["parameters"] if p["name"] == "format")
    schemas = open_schema["components"]["schemas"]
    assert schemas["SegmentFormat"]["enum"] == ["png", "rle", "geotiff", "probabilities", "geojson"]
    assert fmt["schema"]["default"] == "png"


@pytest.mark.parametrize("path", ["/segment", "/evaluate"])
def test_raster_options_are_documented(open_schema: dict, path: str) -> None:
    parameters = {p["name"]: p for p in open_schema["paths"][path]["post"]["parameters"]}

    assert "4,3,2" in parameters["bands"]["description"]
    assert "percentile:LOW,HIGH" in parameters["scale"]["description"]
    assert parameters["scale"]["schema"]["default"] == "auto"


def test_evaluate_offers_only_its_own_formats(open_schema: dict) -> None:
    operation = open_schema["paths"]["/evaluate"]["post"]
    fmt = next(p for p in operation["parameters"] if p["name"] == "format")

    assert fmt["schema"]["$ref"].endswith("/EvaluateFormat")
    assert open_schema["components"]["schemas"]["EvaluateFormat"]["enum"] == ["png", "rle"]
    pair = open_schema["components"]["schemas"]["PairResult"]["properties"]
    assert {"prediction", "truth"} <= set(pair)


def test_response_models_describe_their_fields(open_schema: dict) -> None:
    schemas = open_schema["components"]["schemas"]
    for name in ("SegmentRle", "EvaluateResponse", "ModelInfo", "Ready", "ErrorResponse"):
        assert schemas[name]["properties"], name
    assert "description" in schemas["ClassScore"]["properties"]["iou"]


def test_api_keys_appear_in_the_docs_only_when_required(open_schema: dict) -> None:
    keyed = create_app(settings_for("unused.pt", api_keys=["k"])).openapi()

    assert "securitySchemes" not in open_schema.get("components", {})
    assert "401" not in open_schema["paths"]["/segment"]["post"]["responses"]
    assert set(keyed["components"]["securitySchemes"]) == {"APIKeyHeader", "HTTPBearer"}
    assert "401" in keyed["paths"]["/segment"]["post"]["responses"]
    assert "security" not in keyed["paths"]["/healthz"]["get"]


def test_the_app_serves_the_viewer_page_at_the_root() -> None:
    # The service's own app (not the page router alone), without its model: the page needs none.
    client = TestClient(create_app(settings_for("unused.pt")))

    page = client.get("/")
    script = client.get("/static/app.js")

    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert '<script src="/static/app.js"' in page.text
    assert script.status_code == 200 and "/segment" in script.text


def test_create_app_reads_the_environment_when_given_no_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SATSEG_MAX_PAIRS", "3")

    app = create_app()

    assert isinstance(app.state.settings, Settings)
    assert app.state.settings.max_pairs == 3


def test_uvicorn_with_an_invalid_setting_exits_2_naming_its_variable() -> None:
    # `uvicorn service.app:app` builds the app from the environment on import: a bad value
    # must end start-up with the variable's name, not pydantic's traceback.
    env = os.environ | {"SATSEG_MAX_QUEUE": "-3", "SATSEG_CHECKPOINT": "missing.pt"}
    started = subprocess.run(
        [sys.executable, "-m", "uvicorn", "service.app:app", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert started.returncode == 2
    assert "SATSEG_MAX_QUEUE: Input should be greater than 0" in started.stderr
    assert "Traceback" not in started.stderr
