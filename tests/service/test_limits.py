"""Body-size and pixel limits: 413 counted on received bytes, before any decoding."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi.testclient import TestClient

from service import routes
from service.app import create_app
from service.settings import Settings
from tests.service.helpers import encode, listening_socket, peak_rss_bytes, scene, settings_for

HOSTILE = Path(__file__).resolve().parents[1] / "data" / "hostile"
LIMIT = 10_000


# ----- the middleware, driven over raw ASGI --------------------------------------------------


def _call(app, headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> tuple[int, dict, int]:
    """Send one POST /segment over ASGI; returns (status, JSON body, body chunks read)."""
    sent: list[dict] = []
    reads = 0

    async def receive() -> dict:
        nonlocal reads
        if reads < len(chunks):
            reads += 1
            return {
                "type": "http.request",
                "body": chunks[reads - 1],
                "more_body": reads < len(chunks),
            }
        await asyncio.sleep(3600)  # the client has nothing more; a reader would hang here
        raise AssertionError("unreachable")

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/segment",
        "raw_path": b"/segment",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test"), *headers],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout=30))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body), reads


@pytest.fixture
def small_limit_app(service_settings: Settings):
    return create_app(service_settings.model_copy(update={"max_body_bytes": LIMIT}))


MULTIPART = [(b"content-type", b"multipart/form-data; boundary=xyz")]


def _multipart(size: int) -> bytes:
    head = b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
    return head + b"\0" * size + b"\r\n--xyz--\r\n"


def test_an_honest_content_length_over_the_limit_is_refused_unread(
    small_limit_app, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded = []
    monkeypatch.setattr(routes, "decode_raster", lambda *a, **k: decoded.append(1))
    body = _multipart(LIMIT * 3)
    headers = [*MULTIPART, (b"content-length", str(len(body)).encode())]

    status, answer, reads = _call(small_limit_app, headers, [body])

    assert status == 413
    assert answer["error"]["code"] == "body_too_large"
    assert str(LIMIT) in answer["error"]["message"]
    assert reads == 0 and decoded == []


@pytest.mark.parametrize("declared", [None, b"100"], ids=["chunked-no-length", "lying-length"])
def test_bytes_received_over_the_limit_are_refused_mid_stream(
    small_limit_app, monkeypatch: pytest.MonkeyPatch, declared: bytes | None
) -> None:
    decoded = []
    monkeypatch.setattr(routes, "decode_raster", lambda *a, **k: decoded.append(1))
    body = _multipart(LIMIT * 5)
    chunks = [body[i : i + 1000] for i in range(0, len(body), 1000)]
    headers = [*MULTIPART] + ([(b"content-length", declared)] if declared else [])

    status, answer, reads = _call(small_limit_app, headers, chunks)

    assert status == 413
    assert answer["error"]["code"] == "body_too_large"
    # Reading stopped at the first chunk past the limit.
    assert reads == LIMIT // 1000 + 1 < len(chunks)
    assert decoded == []


def test_a_body_at_the_limit_passes_the_middleware(small_limit_app) -> None:
    body = _multipart(100)
    body += b"\0" * (LIMIT - len(body))  # padding after the closing boundary is ignored
    chunks = [body[i : i + 1000] for i in range(0, len(body), 1000)]

    status, answer, _ = _call(small_limit_app, MULTIPART, chunks)

    # Past the body cap the request reaches the route (no model loaded here: 503).
    assert status == 503
    assert answer["error"]["code"] == "loading"


def test_the_body_limit_is_the_setting(app_factory) -> None:
    data = encode(scene(64, 64))
    with app_factory(max_body_bytes=len(data) // 2) as client:
        response = client.post("/segment", files={"image": ("x.png", data)})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"


# ----- a real server and a chunked upload ----------------------------------------------------


@pytest.fixture(scope="module")
def live_server(varied_checkpoint: Path) -> Iterator[int]:
    """The app served by uvicorn on a loopback port in a thread; yields the port."""
    settings = settings_for(varied_checkpoint, max_body_bytes=LIMIT)
    sock = listening_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="error"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(30)
    sock.close()


def _raw_request(port: int, head: bytes, body_parts: list[bytes]) -> bytes:
    """Send a hand-written request while reading the answer, as curl does: a server that
    refuses a body early answers and closes before the client has sent it all."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:

        def send_all() -> None:
            try:
                sock.sendall(head)
                for part in body_parts:
                    sock.sendall(part)
            except OSError:
                pass  # the server answered and closed before the whole body was sent

        sender = threading.Thread(target=send_all, daemon=True)
        sender.start()
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass  # closing with unread body bytes resets the connection after the answer
        sender.join(30)
    return answer


def test_a_chunked_upload_over_the_limit_is_413_on_a_real_server(live_server: int) -> None:
    body = _multipart(LIMIT * 20)
    parts = [
        b"%x\r\n%s\r\n" % (len(c), c)
        for c in (body[i : i + 4096] for i in range(0, len(body), 4096))
    ]
    head = (
        b"POST /segment HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: multipart/form-data; boundary=xyz\r\nConnection: close\r\n\r\n"
    )

    answer = _raw_request(live_server, head, [*parts, b"0\r\n\r\n"])

    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b'"body_too_large"' in rest


def test_an_understated_content_length_cannot_smuggle_a_body(live_server: int) -> None:
    # The server reads exactly the declared bytes; the rest is never part of this request.
    body = _multipart(LIMIT * 3)
    head = (
        b"POST /segment HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 50\r\n"
        b"Content-Type: multipart/form-data; boundary=xyz\r\nConnection: close\r\n\r\n"
    )

    answer = _raw_request(live_server, head, [body])

    assert answer.startswith(b"HTTP/1.1 4"), answer[:300]
    assert not answer.startswith(b"HTTP/1.1 200")


# ----- pixels --------------------------------------------------------------------------------


def test_a_decompression_bomb_is_413_before_pixels_are_allocated(client: TestClient) -> None:
    bomb = (HOSTILE / "bomb.png").read_bytes()  # 429 bytes claiming 30000x30000 RGB (2.7 GB)
    before = peak_rss_bytes()

    response = client.post("/segment", files={"image": ("bomb.png", bomb)})

    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "image_too_large"
    assert "30000x30000" in error["message"]
    # Decoding even one plane would raise the peak by 900 MB.
    assert peak_rss_bytes() - before < 200 * 2**20


def test_the_pixel_cap_is_the_setting(app_factory) -> None:
    with app_factory(max_pixels=1000) as client:
        small = client.post("/segment", files={"image": ("s.png", encode(scene(25, 40)))})
        large = client.post("/segment", files={"image": ("l.png", encode(scene(25, 41)))})
        evaluate = client.post(
            "/evaluate",
            files=[("image", ("l.png", encode(scene(25, 41)))), ("mask", ("m.png", b"x"))],
        )

    assert small.status_code == 200
    assert large.status_code == 413
    assert large.json()["error"]["code"] == "image_too_large"
    assert evaluate.status_code == 413
