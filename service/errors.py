"""One error body for every failure: ``{"error": {"code": str, "message": str}}``.

Each exception the service can meet is mapped to a status code here and only here:
the service's own :class:`ApiError` family, the typed errors of ``shared`` (they carry
``status`` and ``code``), FastAPI's request validation and Starlette's HTTP errors.
Anything else becomes a 500 whose body says nothing about the code; the traceback goes
to the server log only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.imaging import ImageError
from shared.labels import MaskValueError

log = logging.getLogger("service")


class ApiError(Exception):
    """An error with a place in the HTTP contract: ``status``, ``code`` and a message."""

    status: int = 500
    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})


class NotReadyError(ApiError):
    """The model is not loaded (still loading, failed to load, or shutting down)."""

    status = 503
    code = "not_ready"


class OverloadedError(ApiError):
    """The request queue is full; the client should retry after ``Retry-After`` seconds."""

    status = 503
    code = "overloaded"


class DeviceOutOfMemoryError(ApiError):
    """The device ran out of memory for this request; the service itself is fine."""

    status = 503
    code = "out_of_memory"


class DeadlineExceededError(ApiError):
    """The request waited or ran past its deadline."""

    status = 504
    code = "timeout"


class UnprocessableError(ApiError):
    """Well-formed input that cannot be used (mismatched sizes, unknown labels, counts)."""

    status = 422
    code = "unprocessable"


class MemoryBudgetError(ApiError):
    """One request would need more working memory than the whole budget: it can never run."""

    status = 413
    code = "exceeds_memory_budget"


class ReloadRefusedError(ApiError):
    """A checkpoint offered for a model swap failed to load or verify; the old model serves on."""

    status = 422
    code = "checkpoint_refused"


class ReloadInProgressError(ApiError):
    """Another model reload is running."""

    status = 409
    code = "reload_in_progress"


class UnauthorizedError(ApiError):
    status = 401
    code = "unauthorized"


# Codes for HTTP errors raised by the framework itself (routing, body parsing).
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    503: "not_ready",
}


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    """The one JSON error shape."""
    return {"error": {"code": code, "message": message}}


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=dict(headers or {}))


def describe_validation_errors(errors: list[Any]) -> str:
    """Turn pydantic's error list into one sentence a person can act on.

    ``[{"loc": ("query", "format"), "msg": "Input should be 'png' or 'rle'"}]`` becomes
    ``query parameter 'format': Input should be 'png' or 'rle'``.
    """
    parts: list[str] = []
    for err in errors[:5]:
        loc = [str(p) for p in err.get("loc", ())]
        where = loc[0] if loc else "request"
        name = ".".join(loc[1:])
        kind = {"query": "query parameter", "body": "form field", "header": "header"}.get(
            where, where
        )
        msg = str(err.get("msg", "invalid"))
        if err.get("type") == "missing":
            msg = "is required"
            if where == "body" and name:
                msg += " (send it as a multipart/form-data file field)"
        parts.append(f"{kind} '{name}': {msg}" if name else f"{kind}: {msg}")
    if len(errors) > 5:
        parts.append(f"and {len(errors) - 5} more")
    return "; ".join(parts) or "invalid request"


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.headers)


async def _image_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ImageError)
    return error_response(exc.status, exc.code, str(exc))


async def _mask_value_error(_: Request, exc: Exception) -> JSONResponse:
    return error_response(422, "unknown_mask_values", str(exc))


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(422, "validation_error", describe_validation_errors(exc.errors()))


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return error_response(exc.status_code, code, message, exc.headers)


def internal_error(method: str, path: str, exc: BaseException) -> JSONResponse:
    """The 500 answer to an exception nothing else handled; its traceback goes to the log."""
    # The traceback is for the operator's log; the client gets no internals.
    log.error("unhandled error on %s %s", method, path, exc_info=exc)
    return error_response(500, "internal_error", "The server failed to handle this request.")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    return internal_error(request.method, request.url.path, exc)


def install_error_handlers(app: FastAPI) -> None:
    """Register the mapping from exceptions to the one error body on ``app``."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(ImageError, _image_error)
    app.add_exception_handler(MaskValueError, _mask_value_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
