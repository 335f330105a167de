"""A YAML file read into a mapping and ``key.path=value`` overrides set in it: the layers a
config is made of, before its keys are checked. Failures are ValueErrors naming the file or the
override."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, turning every failure into a ValueError naming the file."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        mark = getattr(exc, "problem_mark", None)  # YAML syntax errors know their line
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{path}:{where} cannot read ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict | None):
        raise ValueError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data or {}


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.lr=3e-4"`` -> ``("train.lr", 3e-4)``; the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"override {item!r}: expected key.path=value")
    try:
        return key, yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return key, raw


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data["a"]["b"] = value`` for key ``"a.b"``, creating mappings on the way."""
    *sections, leaf = key.split(".")
    for i, part in enumerate(sections):
        if data.get(part) is None:
            data[part] = {}
        if not isinstance(data := data[part], dict):
            raise ValueError(f"override {key}: {'.'.join(sections[: i + 1])} is not a section")
    data[leaf] = value
