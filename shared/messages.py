"""Exception messages cut to what a one-line report or error body holds."""

from __future__ import annotations

import re


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def one_line(exc: BaseException, limit: int | None = None) -> str:
    """An error's whole message on one line, white space folded (its type's name when it has
    none), cut to ``limit`` characters and "..." where longer."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if limit is None or len(text) <= limit else text[:limit] + "..."


def first_sentence(exc: BaseException) -> str:
    """The first sentence of an error's first line: torch's messages run on with advice, and
    the first sentence carries the fact."""
    return first_line(exc).split(". ")[0]


def refused_global(exc: BaseException) -> str | None:
    """The class a ``torch.load(weights_only=True)`` refused, as its message names it."""
    match = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return match.group(1) if match else None
