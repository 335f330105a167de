"""``POST /admin/reload``: swap the served model for a checkpoint, with no failed request.

The route exists only when ``SATSEG_ADMIN_KEYS`` is set (404 otherwise) and wants one of those
keys, never an API key. A checkpoint named in the body must lie inside ``SATSEG_CHECKPOINT_DIR``
once resolved (``..`` and symbolic links cannot leave it).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request

from service.engine import Engine
from service.errors import UnauthorizedError, UnprocessableError
from service.limits import key_matches, presented_key
from service.schemas import ErrorResponse, ReloadRequest, ReloadResponse
from service.settings import Settings

router = APIRouter()
PUBLIC_PATHS = frozenset({"/admin/reload"})  # guarded by the admin keys, not the API keys


def checkpoint_path(settings: Settings, name: str | None) -> Path:
    """The checkpoint a reload reads: ``SATSEG_CHECKPOINT``, or ``name`` inside
    ``SATSEG_CHECKPOINT_DIR``.

    Raises:
        UnprocessableError: a name without a configured folder, or one that leads outside it.
    """
    if name is None or not name.strip():
        return settings.checkpoint
    folder = settings.checkpoint_dir
    if folder is None:
        raise UnprocessableError(
            "A checkpoint in the body needs SATSEG_CHECKPOINT_DIR; without it a reload reads "
            "SATSEG_CHECKPOINT only (send no body).",
            code="checkpoint_dir_unset",
        )
    try:
        root = folder.resolve()
        candidate = (root / name).resolve()
    except (OSError, ValueError):
        candidate = None
    if candidate is None or not candidate.is_relative_to(root) or candidate == root:
        raise UnprocessableError(
            f"checkpoint {name!r} is not a file inside SATSEG_CHECKPOINT_DIR.",
            code="checkpoint_outside_folder",
        )
    return candidate


@router.post(
    "/admin/reload",
    summary="Swap the model for a checkpoint",
    response_model=ReloadResponse,
    responses={
        401: {"model": ErrorResponse, "description": "Missing or wrong admin key."},
        409: {"model": ErrorResponse, "description": "Another reload is running."},
        422: {
            "model": ErrorResponse,
            "description": "The checkpoint is outside SATSEG_CHECKPOINT_DIR, or it failed to "
            "load or verify; the current model keeps serving.",
        },
        503: {"model": ErrorResponse, "description": "Still starting or shutting down."},
    },
)
async def reload(request: Request, body: Annotated[ReloadRequest | None, Body()] = None) -> Any:
    """Load the checkpoint beside the current model, warm it up, then swap atomically:
    requests in flight finish on the model they started with, later ones get the new one.
    A checkpoint that fails to load or verify is refused and the current model keeps serving.

    `curl -X POST -H "X-API-Key: $ADMIN_KEY" localhost:8000/admin/reload`
    """
    engine: Engine = request.app.state.engine
    settings = engine.settings
    keys = tuple(k.get_secret_value().encode() for k in settings.admin_keys)
    if not key_matches(presented_key(request.scope), keys):
        raise UnauthorizedError(
            "This endpoint needs an admin key (SATSEG_ADMIN_KEYS) as 'X-API-Key: <key>' or "
            "'Authorization: Bearer <key>'.",
            headers={"WWW-Authenticate": 'Bearer realm="satseg-admin"'},
        )
    path = checkpoint_path(settings, body.checkpoint if body else None)
    previous = engine.model_version
    model = await asyncio.to_thread(engine.reload, path)
    return {
        "status": "swapped",
        "sha256": model.sha256,
        "previous_sha256": previous,
        "path": str(model.path),
        "load_seconds": round(model.load_seconds, 3),
    }
