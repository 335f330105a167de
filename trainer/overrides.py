"""The layers a config is made of, before its keys are checked: YAML files (a file may name a
``base:`` file it changes) and ``key.path=value`` overrides set in them. Failures are ValueErrors
naming the file or the override."""

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


# The top-level key naming the file a config is built on, relative to the config's own folder.
BASE_KEY = "base"


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A config file over its ``base:`` file, and that file over its own base, and so on.

    Sections merge key by key (the file's keys over its base's); any other value, a list or
    null included, replaces the base's. The result has no ``base`` key: a run's saved config
    holds every value and needs no other file.
    """
    return _read_layered(Path(path), ())


def _read_layered(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    data = read_yaml(path)
    if BASE_KEY not in data:
        return data
    base = data.pop(BASE_KEY)
    if not isinstance(base, str) or not base.strip():
        raise ValueError(f"{path}: {BASE_KEY} must be the path of a config file, got {base!r}")
    base_path = path.parent / base
    chain = (*seen, path.resolve())
    if base_path.resolve() in chain:
        loop = " -> ".join(str(p) for p in (*chain, base_path.resolve()))
        raise ValueError(f"{path}: {BASE_KEY} files form a loop: {loop}")
    try:
        below = _read_layered(base_path, chain)
    except ValueError as err:
        raise ValueError(f"{path}: {BASE_KEY} {base}: {err}") from None
    return merge_sections(below, data)


def merge_sections(below: dict[str, Any], above: dict[str, Any]) -> dict[str, Any]:
    """``above``'s keys over ``below``'s, mappings merged recursively; neither is changed."""
    merged = dict(below)
    for key, value in above.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_sections(merged[key], value)
        else:
            merged[key] = value
    return merged


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
