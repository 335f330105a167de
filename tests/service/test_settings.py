"""SATSEG_* settings: defaults, parsing and validation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings


def test_defaults_are_safe(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("SATSEG_")]:
        monkeypatch.delenv(name)
    settings = Settings(_env_file=None)

    assert settings.checkpoint == Path("runs/quickstart/best.pt")
    assert (settings.device, settings.precision) == ("auto", "auto")
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.max_body_bytes == 32 * 1024 * 1024
    assert settings.max_pixels == 64_000_000
    assert settings.api_keys == []


def test_environment_overrides_with_the_satseg_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SATSEG_CHECKPOINT", "/models/best.pt")
    monkeypatch.setenv("SATSEG_DEVICE", "cpu")
    monkeypatch.setenv("SATSEG_MAX_BODY_BYTES", "1000")
    monkeypatch.setenv("SATSEG_TILE", "256")

    settings = Settings(_env_file=None)

    assert settings.checkpoint == Path("/models/best.pt")
    assert settings.device == "cpu"
    assert settings.max_body_bytes == 1000
    assert settings.tile == 256


@pytest.mark.parametrize(
    "values",
    [
        {"device": "tpu"},
        {"precision": "int4"},
        {"tile": 100},
        {"tile": 64, "overlap": 64},
        {"max_body_bytes": 0},
        {"port": 70000},
    ],
)
def test_invalid_values_are_refused_at_start(values: dict) -> None:
    with pytest.raises(ValidationError):
        Settings(_env_file=None, **values)
