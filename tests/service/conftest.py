"""Fixtures for the service tests (helpers live in ``tests/service/helpers.py``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from service.settings import Settings
from shared.checkpoint import load_checkpoint, save_checkpoint
from tests.service.helpers import running_app, settings_for


@pytest.fixture(scope="session")
def varied_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with a head whose answer varies across an image.

    A random-initialised DeepLabV3 predicts one class everywhere (its head bias dominates);
    with a zero bias and unit-variance head weights all three classes appear in the test
    scenes, so the mask, RLE and score tests compare something.
    """
    ckpt = load_checkpoint(tiny_checkpoint)
    weight = ckpt["state_dict"]["classifier.4.weight"]
    generator = torch.Generator().manual_seed(0)
    ckpt["state_dict"]["classifier.4.weight"] = torch.randn(weight.shape, generator=generator)
    ckpt["state_dict"]["classifier.4.bias"].zero_()
    path = tmp_path_factory.mktemp("varied") / "varied.pt"
    save_checkpoint(ckpt, path)
    return path


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
