"""Property-based tests generated from the service's own OpenAPI schema (in-process).

Every generated request must get a documented status, content type, headers and body, and
never a 5xx. The app runs with an API key, so the authentication checks have work to do.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig
from starlette.types import ASGIApp, Receive, Scope, Send

from service.app import create_app
from service.engine import Engine
from tests.service.helpers import settings_for

KEY = "schemathesis-key-0123456789"

# A schema-valid upload is any bytes, but only real images can be segmented and images and
# masks must pair up, so a well-formed request can still be refused with 400, 413, 415 or 422
# (schemathesis otherwise expects 2xx for schema-valid data); 404 stays allowed for names of
# things that do not exist.
CONFIG = SchemathesisConfig.from_dict(
    {
        "checks": {
            "positive_data_acceptance": {
                "expected-statuses": ["2xx", "400", "401", "404", "413", "415", "422"]
            }
        }
    }
)


def _without_lifespan(app: ASGIApp) -> ASGIApp:
    """The app with lifespan events acknowledged but not forwarded: the fixture below owns
    the model's life, and schemathesis restarts lifespans between operations."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return
        while True:
            message = await receive()
            kind = message["type"].rsplit(".", 1)[-1]  # startup / shutdown
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return

    return wrapped


# The schema is loaded at import, before the session's checkpoint exists; the fixture gives
# the app its engine.
APP = create_app(settings_for("checkpoint-set-by-the-fixture.pt", api_keys=[KEY]))
schema = schemathesis.openapi.from_asgi("/openapi.json", _without_lifespan(APP), config=CONFIG)


@pytest.fixture(scope="module", autouse=True)
def loaded_engine(varied_checkpoint: Path) -> Iterator[Engine]:
    engine = Engine(settings_for(varied_checkpoint, api_keys=[KEY]))
    engine.start()
    assert engine.wait_loaded(timeout=120) and engine.ready
    APP.state.engine = engine
    yield engine
    engine.stop()


@schema.parametrize()
# derandomize: the same examples on every run and machine (a fixed seed drawn from the test),
# and no example database, so a failure here is reproducible rather than a one-off.
@settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_its_schema(case: schemathesis.Case) -> None:
    case.call_and_validate(headers={"X-API-Key": KEY})
