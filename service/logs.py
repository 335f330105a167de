"""Log lines of the service: plain text (the default) or one JSON object per line.

Every record made while a request is handled carries that request's id (``request_id``),
taken from a context variable the request middleware sets, so a log search for one id finds
every line about it. Nothing here logs headers or bodies: API keys and image bytes never
reach a log line.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import uuid
from datetime import UTC, datetime
from typing import Any

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "satseg_request_id", default=None
)
# Visible ASCII, bounded: an id is copied into headers and logs, so nothing else is echoed.
_VALID_REQUEST_ID = re.compile(r"[!-~]{1,128}")
# Fields the access line and others may add through ``extra=``; only these reach the output.
EXTRA_FIELDS = (
    "method",
    "route",
    "path",
    "status",
    "duration_ms",
    "bytes_in",
    "bytes_out",
    "error_code",
    "model_version",
)


def request_id_from(header: str | None) -> str:
    """The client's ``X-Request-ID`` when it is 1-128 visible ASCII characters, else a new id."""
    if header is not None and _VALID_REQUEST_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    """Stamp each record with the id of the request being handled (``-`` outside one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, and the
    request's fields when the line is about one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or REQUEST_ID.get(),
        }
        for name in EXTRA_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def configure_logging(level: str, fmt: str) -> None:
    """Send every logger (uvicorn's included) through one stderr handler in ``fmt``
    (``text`` or ``json``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
