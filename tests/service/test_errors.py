"""Bad input gets one JSON error body with the right status; never a 500 or a stack trace."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from service.errors import describe_validation_errors, install_error_handlers
from tests.service.helpers import encode, png_mask, scene

HOSTILE = Path(__file__).resolve().parents[1] / "data" / "hostile"


def _assert_error(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    assert "Traceback" not in response.text
    return body["error"]["message"]


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("P", (4, 4)).save(buf, format="GIF")
    return buf.getvalue()


def _truncated() -> bytes:
    data = encode(scene(64, 64))
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("data", "status", "code", "words"),
    [
        (b"", 400, "empty_image", "empty"),
        (bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), 400,
         "corrupt_image", "not a recognised image"),
        (_truncated(), 400, "corrupt_image", ""),
        (b"hello, I am text pretending to be a PNG\n" * 10, 400, "corrupt_image", "text"),
        (_gif(), 415, "unsupported_format", "GIF"),
    ],
    ids=["empty", "random", "truncated", "text", "gif"],
)  # fmt: skip
def test_hostile_uploads_get_a_clear_4xx(
    client: TestClient, data: bytes, status: int, code: str, words: str
) -> None:
    response = client.post("/segment", files={"image": ("upload.png", data)})

    message = _assert_error(response, status, code)
    assert "upload.png" in message
    assert words.lower() in message.lower()


# Each bundled hostile file and its one right answer (tests/data/hostile/README.md): an error
# status, code and a word of the message, or 200 with a mask of the image's size.
HOSTILE_ANSWERS: dict[str, tuple[int, str, str] | tuple[int, tuple[int, int]]] = {
    "bomb.png": (413, "image_too_large", "30000x30000"),
    "empty.png": (400, "empty_image", "empty"),
    "text.png": (400, "corrupt_image", "text"),
    "truncated.png": (400, "corrupt_image", "truncated"),
    "gray16.png": (200, (2, 4)),
    "rgba.png": (200, (2, 2)),
    "cmyk.jpg": (200, (8, 32)),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_ANSWERS))
def test_every_bundled_hostile_file_gets_its_own_answer(client: TestClient, name: str) -> None:
    response = client.post("/segment", files={"image": (name, (HOSTILE / name).read_bytes())})

    expected = HOSTILE_ANSWERS[name]
    if expected[0] == 200:
        assert response.status_code == 200, response.text
        assert png_mask(response.content).shape == expected[1]
    else:
        status, code, words = expected
        message = _assert_error(response, status, code)
        assert name in message
        assert words.lower() in message.lower(), message


def test_every_bundled_hostile_file_has_an_expected_answer() -> None:
    assert {p.name for p in HOSTILE.iterdir() if p.suffix != ".md"} == set(HOSTILE_ANSWERS)


def test_unknown_format_parameter_is_422(client: TestClient) -> None:
    response = client.post(
        "/segment", params={"format": "jpeg"}, files={"image": ("x.png", encode(scene(8, 8)))}
    )

    assert "'format'" in _assert_error(response, 422, "validation_error")


def test_missing_image_field_is_422(client: TestClient) -> None:
    response = client.post("/segment", files={"picture": ("x.png", encode(scene(8, 8)))})

    assert "'image'" in _assert_error(response, 422, "validation_error")


def test_a_json_body_is_422(client: TestClient) -> None:
    _assert_error(client.post("/segment", json={"image": "x"}), 422, "validation_error")


def test_unknown_path_and_method_use_the_error_body(client: TestClient) -> None:
    _assert_error(client.get("/nothing-here"), 404, "not_found")
    response = client.get("/segment")
    _assert_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST"


def test_an_unexpected_exception_is_a_500_without_internals() -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internal detail /etc/passwd")

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom")

    message = _assert_error(response, 500, "internal_error")
    assert "secret" not in response.text and "RuntimeError" not in message


def test_validation_errors_read_as_one_sentence() -> None:
    errors = [
        {"loc": ("query", "format"), "msg": "Input should be 'png' or 'rle'", "type": "enum"},
        {"loc": ("body", "image"), "msg": "Field required", "type": "missing"},
    ]

    message = describe_validation_errors(errors)

    assert message == (
        "query parameter 'format': Input should be 'png' or 'rle'; form field 'image': is "
        "required (send it as a multipart/form-data file field)"
    )
