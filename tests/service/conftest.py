"""Fixtures for the service tests (helpers live in ``tests/service/helpers.py``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.settings import Settings
from tests.service.helpers import running_app, settings_for


@pytest.fixture(scope="session")
def service_settings(varied_checkpoint: Path) -> Settings:
    return settings_for(varied_checkpoint)


@pytest.fixture(scope="module")
def client(varied_checkpoint: Path) -> Iterator[TestClient]:
    """A ready service on the varied tiny checkpoint, shared by the tests of one module."""
    with running_app(settings_for(varied_checkpoint)) as c:
        assert c.get("/readyz").status_code == 200
        yield c


@pytest.fixture
def app_factory(varied_checkpoint: Path) -> Callable[..., Any]:
    """``app_factory(**settings)`` -> context manager yielding a client of a fresh app."""

    def make(wait: bool = True, client_kw: dict | None = None, **overrides: Any) -> Any:
        return running_app(
            settings_for(varied_checkpoint, **overrides), wait=wait, **(client_kw or {})
        )

    return make
