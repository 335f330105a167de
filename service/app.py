"""The FastAPI application: ``create_app(settings)``.

``uvicorn service.app:app`` serves an app built from the environment; ``python -m service``
does the same with graceful-shutdown handling (see ``service/__main__.py``).
"""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import Response
from pydantic import ValidationError

from service import admin, page, routes
from service.access import AccessMiddleware
from service.engine import Engine
from service.errors import install_error_handlers
from service.limits import ApiKeyMiddleware, BodySizeLimitMiddleware
from service.metrics import CONTENT_TYPE
from service.settings import Settings, invalid_settings_message

# Open even when API keys are set: probes, and the API description itself.
PUBLIC_PATHS = frozenset(
    {
        "/healthz",
        "/readyz",
        "/metrics",
        "/docs",
        "/docs/oauth2-redirect",
        "/redoc",
        "/openapi.json",
    }
)

DESCRIPTION = """\
Semantic segmentation of satellite images with a DeepLabV3 model.

* `POST /segment` — a class-id mask as a palette PNG, or COCO RLE per class.
* `POST /evaluate` — scores predictions against ground-truth masks.
* `GET /model`, `GET /healthz`, `GET /readyz`, `GET /metrics` (Prometheus).

Every answer carries `X-Request-ID` (yours if valid, else a new one) and `X-Model-Version`
(the sha256 of the checkpoint that answered).

Every error answers `{"error": {"code", "message"}}`. With `SATSEG_API_KEYS` set, send a key
as `X-API-Key: <key>` or `Authorization: Bearer <key>`.
"""


def routers() -> list[tuple[APIRouter, frozenset[str]]]:
    """Routers to include, each with the paths of it that need no API key.

    The browser page's ``PUBLIC_PATHS`` stay open: exact paths, or prefixes ending in ``/``
    (``"/"`` itself is exact).
    """
    return [(routes.router, frozenset()), (page.router, frozenset(page.PUBLIC_PATHS))]


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """Build the app. The model loads in the background once the app starts (lifespan),
    so ``/healthz`` answers at once and ``/readyz`` turns 200 when the model is warm."""
    settings = settings or Settings()
    engine = engine or Engine(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            # The server has stopped taking requests; let admitted ones finish, then stop.
            # A load still in progress is waited for too: torch threads killed mid-call at
            # interpreter exit abort the process instead of letting it exit cleanly.
            engine.begin_drain()
            await asyncio.to_thread(engine.wait_idle, settings.shutdown_grace_s)
            await asyncio.to_thread(engine.wait_loaded, settings.shutdown_grace_s)
            engine.stop()

    app = FastAPI(
        title="SatSeg",
        version=_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    install_error_handlers(app)

    public = set(PUBLIC_PATHS)
    included = routers()
    if settings.admin_keys:  # otherwise /admin/reload does not exist: 404
        included.append((admin.router, admin.PUBLIC_PATHS))  # it checks the admin keys itself
    for router, open_paths in included:
        app.include_router(router)
        public |= open_paths
    if settings.metrics:
        _add_metrics_route(app, engine)
    known_paths = {getattr(r, "path", "") for r in app.routes}
    known_paths |= {getattr(r, "path", "") for router, _ in included for r in router.routes}

    if not settings.api_keys:
        _document_open_access(app)

    # The last added runs first: the key check, then the body cap, then FastAPI.
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(
        ApiKeyMiddleware,
        keys=[k.get_secret_value() for k in settings.api_keys],
        is_public=public_path_matcher(public),
    )
    # Outermost: ids, model version, metrics and the log line cover the answers above too.
    app.add_middleware(
        AccessMiddleware,
        metrics=engine.metrics,
        model_version=lambda: engine.model_version,
        known_paths=frozenset(known_paths - {""}),
    )
    return app


def _add_metrics_route(app: FastAPI, engine: Engine) -> None:
    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        """Counters, histograms and gauges of this process in the Prometheus text format."""
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE)


def public_path_matcher(paths: Iterable[str]) -> Callable[[str], bool]:
    """``paths`` -> a test for "needs no API key": exact paths, and prefixes ending in ``/``.

    ``"/"`` alone is the page itself, never a prefix (that would open every path).
    """
    paths = set(paths)
    prefixes = tuple(p for p in paths if p.endswith("/") and p != "/")
    exact = frozenset(paths - set(prefixes))

    def is_public(path: str) -> bool:
        return path in exact or path.startswith(prefixes)

    return is_public


def _document_open_access(app: FastAPI) -> None:
    """Leave the API-key schemes out of OpenAPI when no keys are set: the docs then say what
    the service does (no authentication), and clients are not told to send a key."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.pop("security", None)
                    operation.get("responses", {}).pop("401", None)
            schema.get("components", {}).pop("securitySchemes", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("satseg")
    except metadata.PackageNotFoundError:
        return "0.0.0"


@functools.cache
def _default_app() -> FastAPI:
    try:
        settings = Settings()
    except ValidationError as exc:
        # uvicorn would print pydantic's traceback; say which variable is wrong, as
        # `python -m service` does, and exit 2 before anything is served.
        message = invalid_settings_message(exc)
        print(f"service.app: error: invalid settings: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    return create_app(settings)


def __getattr__(name: str) -> FastAPI:
    # `uvicorn service.app:app` builds the app on first use, so importing this module
    # (tests, tools) reads no environment and loads nothing.
    if name == "app":
        return _default_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
