"""Protections that act before a request reaches a route: body size and API keys.

Both are plain ASGI middleware so they run before FastAPI parses anything: an oversized
upload or an unauthenticated client costs only the bytes already on the wire.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Iterable, Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_body


async def send_error(
    send: Send, status: int, code: str, message: str, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """Send the one error body directly over ASGI (no request object needed)."""
    body = json.dumps(error_body(code, message)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    """Raised from ``receive`` inside the app once the byte budget is spent."""


class BodySizeLimitMiddleware:
    """Answer 413 once a request body exceeds ``max_body_bytes``.

    The count is of bytes actually received, so it holds whether ``Content-Length`` is
    honest, understated, absent (chunked transfer) or overstated. A declared length above
    the cap is refused at once, before a single body byte is read.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    def _message(self) -> str:
        return f"Request body is larger than the limit of {self.max_body_bytes} bytes."

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await send_error(send, 413, "body_too_large", self._message(), _CLOSE)
            return

        received = 0
        exceeded = False
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            # Whatever the app makes of the interrupted body (FastAPI calls it a parse error)
            # is replaced by the 413 below.
            if exceeded:
                return
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not response_started:
            await send_error(send, 413, "body_too_large", self._message(), _CLOSE)


# The rest of an oversized body is never read, so the connection cannot be reused.
_CLOSE = ((b"connection", b"close"),)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def key_matches(candidate: str | None, keys: Iterable[bytes]) -> bool:
    """True when ``candidate`` equals one of ``keys``, in time independent of where they differ.

    Every key is compared (no early exit) so the timing does not tell which key was close.
    """
    if candidate is None:
        return False
    given = candidate.encode("utf-8", "surrogateescape")
    found = False
    for key in keys:
        found |= hmac.compare_digest(given, key)
    return found


def presented_key(scope: Scope) -> str | None:
    """The key a client sent: ``X-API-Key: K`` or ``Authorization: Bearer K``."""
    bearer: str | None = None
    for name, value in scope.get("headers", ()):
        if name == b"x-api-key":
            return value.decode("latin-1")
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                bearer = token.strip()
    return bearer


class ApiKeyMiddleware:
    """Refuse requests without a valid API key (401) unless their path is public.

    With no keys configured the middleware lets everything through. Keys are never logged:
    nothing here writes to a log, and the settings hold them as ``SecretStr``.
    """

    def __init__(self, app: ASGIApp, keys: Sequence[str], is_public: Callable[[str], bool]) -> None:
        self.app = app
        self._keys = tuple(k.encode("utf-8") for k in keys)
        self._is_public = is_public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._keys or self._is_public(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        key = presented_key(scope)
        if key_matches(key, self._keys):
            await self.app(scope, receive, send)
            return
        message = (
            "Missing API key: send it as 'X-API-Key: <key>' or 'Authorization: Bearer <key>'."
            if key is None
            else "Invalid API key."
        )
        await send_error(
            send,
            401,
            "unauthorized",
            message,
            ((b"www-authenticate", b'Bearer realm="satseg"'), *_CLOSE),
        )
