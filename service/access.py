"""The outermost layer of every request: its id, its model version, its metrics and its log line.

It wraps the whole app, so answers given by the inner middleware (401 without a key, 413 for a
body over the cap) carry ``X-Request-ID`` and ``X-Model-Version``, are counted and are logged
like any other.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_response, internal_error
from service.logs import REQUEST_ID, request_id_from
from service.metrics import ServiceMetrics

log = logging.getLogger("service.access")

REQUEST_ID_HEADER = b"x-request-id"
MODEL_VERSION_HEADER = b"x-model-version"


class AccessMiddleware:
    """Give each request an id (the client's ``X-Request-ID`` if valid, else a new one), echo it
    and the model version on the answer, count the answer and log one line about it.

    ``model_version`` names the checkpoint in use (its sha256), or None when no model is loaded;
    a route that pins a model for its request sets the header itself and is left alone.
    """

    def __init__(
        self,
        app: ASGIApp,
        metrics: ServiceMetrics,
        model_version: Callable[[], str | None],
        known_paths: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.known_paths = known_paths
        self.metrics = metrics
        self.model_version = model_version

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        exchange = _Exchange(request_id_from(_header(scope, REQUEST_ID_HEADER)))
        token = REQUEST_ID.set(exchange.request_id)
        start = time.perf_counter()

        async def counted_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                exchange.bytes_in += len(message.get("body", b""))
            return message

        async def tagged_send(message: Message) -> None:
            await send(exchange.tag(message, self.model_version))

        try:
            try:
                await self.app(scope, counted_receive, tagged_send)
            except Exception as exc:
                # Answered here, inside the request's context, so the 500 carries the request
                # id and the traceback's log line names it.
                if exchange.response_started:
                    raise
                answer = internal_error(scope.get("method", ""), scope.get("path", ""), exc)
                await answer(scope, counted_receive, tagged_send)
            except asyncio.CancelledError:
                # The server cancels what is still running when its shutdown grace period
                # ends; the client gets a JSON 503 it can retry on another replica, not the
                # server's plain-text 500. The cancellation then goes on.
                if not exchange.response_started:
                    await _stopped_before_finishing(scope, counted_receive, tagged_send)
                raise
        finally:
            self._record(scope, exchange, time.perf_counter() - start)
            REQUEST_ID.reset(token)

    def _record(self, scope: Scope, exchange: _Exchange, seconds: float) -> None:
        """Count the answer and log its line."""
        route = _route(scope, self.known_paths)
        self.metrics.observe_request(route, exchange.status, seconds, exchange.error_code)
        log.info(
            "%s %s %d %.1f ms",
            scope.get("method", ""),
            scope.get("path", ""),
            exchange.status,
            seconds * 1000,
            extra={
                "method": scope.get("method"),
                "route": route,
                "path": scope.get("path"),
                "status": exchange.status,
                "duration_ms": round(seconds * 1000, 2),
                "bytes_in": exchange.bytes_in,
                "bytes_out": exchange.bytes_out,
                "error_code": exchange.error_code,
                "model_version": exchange.version,
            },
        )


async def _stopped_before_finishing(scope: Scope, receive: Receive, send: Send) -> None:
    log.warning("%s %s cancelled by the server's shutdown", scope.get("method"), scope.get("path"))
    answer = error_response(
        503,
        "shutting_down",
        "The server stopped before finishing this request; send it again.",
        headers={"Retry-After": "1", "Connection": "close"},
    )
    await answer(scope, receive, send)


@dataclass
class _Exchange:
    """What one request's answer was, gathered as its messages pass."""

    request_id: str
    status: int = 500  # until the app starts a response
    bytes_in: int = 0
    bytes_out: int = 0
    error_code: str | None = None
    version: str | None = None
    is_json_error: bool = False
    response_started: bool = False

    def tag(self, message: Message, model_version: Callable[[], str | None]) -> Message:
        """Note an outgoing message; a response start gets the request id and model version."""
        if message["type"] == "http.response.start":
            self.response_started = True
            self.status = message["status"]
            headers = [
                (k, v) for k, v in message.get("headers", ()) if k.lower() != REQUEST_ID_HEADER
            ]
            headers.append((REQUEST_ID_HEADER, self.request_id.encode()))
            pinned = next((v for k, v in headers if k.lower() == MODEL_VERSION_HEADER), None)
            if pinned is not None:
                self.version = pinned.decode("latin-1")
            else:
                self.version = model_version()
                if self.version:
                    headers.append((MODEL_VERSION_HEADER, self.version.encode()))
            self.is_json_error = self.status >= 400 and any(
                k.lower() == b"content-type" and v.startswith(b"application/json")
                for k, v in headers
            )
            return {**message, "headers": headers}
        if message["type"] == "http.response.body":
            body = message.get("body", b"")
            if self.is_json_error and self.error_code is None:
                self.error_code = _error_code(body)
            self.bytes_out += len(body)
        return message


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def _route(scope: Scope, known_paths: frozenset[str]) -> str:
    """The matched route's template (``/segment``), never the raw path: unknown paths share
    ``other`` so a scanner cannot create a metric series per URL it tries. Answers given before
    routing (401, 413) fall back to the path when it is one of the app's own."""
    path = getattr(scope.get("route"), "path", None)
    if isinstance(path, str) and path:
        return path
    raw = scope.get("path", "")
    return raw if raw in known_paths else "other"


def _error_code(body: bytes) -> str | None:
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
    return code if isinstance(code, str) else None
