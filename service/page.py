"""The viewer page at ``GET /`` and the example tiles it offers.

The page is three static files (``service/static``) that call the same ``/model``, ``/segment``
and ``/evaluate`` endpoints users call with curl; nothing here touches the model. The example
API lists image/mask pairs of the bundled test split so a new user sees a result with one click.

Routes:
    GET /                          index.html
    GET /static/{name}             an allow-listed file from service/static
    GET /examples                  [{"name", "image_url", "mask_url"}]; [] without the folder
    GET /examples/{name}/image     the tile's image
    GET /examples/{name}/mask      the tile's ground-truth mask
    GET /examples/{name}/thumbnail the tile as a browser shows it (a TIFF as an RGB PNG)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import rasterio
from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel
from rasterio.errors import RasterioError

from shared.bands import BandError, resolve_bands
from shared.geotiff import decode_raster
from shared.imaging import ImageError, encode_png
from shared.raster import open_for_model, read_all

STATIC_DIR = Path(__file__).resolve().parent / "static"

# Only these files are served, so no request path ever reaches the file system.
STATIC_FILES: dict[str, str] = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}

# Open even when the service asks for API keys (entries ending in "/" are prefixes, others
# exact paths): the page's files hold no model output, and the examples are the bundled
# public data set. The page asks for a key when /model answers 401. "/" is the page alone
# (the app never reads it as a prefix).
PUBLIC_PATHS = frozenset({"/", "/static/", "/examples", "/examples/"})

EXAMPLES_ENV = "SATSEG_EXAMPLES_DIR"
DEFAULT_EXAMPLES_DIR = Path("data/bluemarble/TEST_SET")

IMAGE_TYPES: dict[str, str] = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".webp": "image/webp",
    ".bmp": "image/bmp",
}
MASK_TYPES: dict[str, str] = {".png": "image/png"}
# Browsers show none of these, so the examples list offers them as a PNG thumbnail.
TIFF_SUFFIXES = frozenset({".tif", ".tiff"})

# Everything the page loads comes from this origin; images are drawn from blob: URLs.
PAGE_HEADERS: dict[str, str] = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; "
        "style-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # The files change with the code, not per request: revalidate rather than go stale.
    "Cache-Control": "no-cache",
}


class ExampleTile(BaseModel):
    """One bundled test tile: its name (the file stem) and where to fetch it."""

    name: str
    image_url: str
    mask_url: str | None
    thumbnail_url: str


class ExampleErrorDetail(BaseModel):
    code: str
    message: str


class ExampleError(BaseModel):
    """Same shape as every other error body of the service."""

    error: ExampleErrorDetail


@dataclass(frozen=True)
class ExampleFiles:
    image: Path
    mask: Path | None


def examples_dir() -> Path:
    """The folder holding ``IMAGES/`` and ``MASKS/``: ``$SATSEG_EXAMPLES_DIR`` or the bundled split.

    Read on every request so the folder can appear (``make data``) while the service runs.
    """
    return Path(os.environ.get(EXAMPLES_ENV) or DEFAULT_EXAMPLES_DIR)


def _files_by_stem(folder: Path, suffixes: dict[str, str]) -> dict[str, Path]:
    """Regular files in ``folder`` with an allowed suffix, keyed by stem (first by name wins)."""
    if not folder.is_dir():
        return {}
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in suffixes and path.is_file() and not path.name.startswith("."):
            found.setdefault(path.stem, path)
    return found


def find_examples(root: Path) -> dict[str, ExampleFiles]:
    """Images of ``root/IMAGES`` with their mask of the same stem in ``root/MASKS`` (if any)."""
    images = _files_by_stem(root / "IMAGES", IMAGE_TYPES)
    masks = _files_by_stem(root / "MASKS", MASK_TYPES)
    return {stem: ExampleFiles(image=path, mask=masks.get(stem)) for stem, path in images.items()}


def _not_found(name: str) -> JSONResponse:
    # The name is looked up among the listed stems, never joined onto a path, so "../x" and
    # friends simply are not found.
    body = ExampleError(
        error=ExampleErrorDetail(
            code="example_not_found",
            message=f"no example tile named {name!r} in {examples_dir()}; GET /examples lists them",
        )
    )
    return JSONResponse(status_code=404, content=body.model_dump())


def tiff_thumbnail(path: Path) -> bytes:
    """A TIFF as the RGB PNG the service previews it as: its bands named red, green and blue,
    else its first three (a 3-band uint8 file as its colours)."""
    with rasterio.open(path) as src:
        colours = [c.name for c in src.colorinterp]
        spec = resolve_bands(None, src.descriptions, dtype=src.dtypes[0], colorinterp=colours)
    if spec.reads_pictures():
        rgb, _ = decode_raster(path.read_bytes())
    else:
        with open_for_model(path, spec) as raster:
            rgb = read_all(raster).rgb
    return encode_png(rgb)


def _example_file(path: Path) -> FileResponse:
    return FileResponse(
        path,
        media_type=IMAGE_TYPES[path.suffix.lower()],
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )


router = APIRouter()

_NOT_FOUND_DOC: dict[int | str, dict] = {404: {"model": ExampleError}}


@router.get("/", include_in_schema=False)
def index() -> FileResponse:
    """The viewer page."""
    return FileResponse(
        STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=PAGE_HEADERS
    )


@router.get("/static/{name}", include_in_schema=False)
def static_file(name: str) -> Response:
    """``app.js`` or ``style.css``; anything else is 404."""
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        body = ExampleError(
            error=ExampleErrorDetail(code="not_found", message=f"no static file {name!r}")
        )
        return JSONResponse(status_code=404, content=body.model_dump())
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers=PAGE_HEADERS)


@router.get("/examples", tags=["examples"])
def list_examples() -> list[ExampleTile]:
    """Tiles of the bundled test split (``$SATSEG_EXAMPLES_DIR``, default
    ``data/bluemarble/TEST_SET``); empty until ``python -m trainer.prepare bluemarble
    --out data/bluemarble`` has written it."""
    return [
        ExampleTile(
            name=name,
            image_url=f"/examples/{quote(name, safe='')}/image",
            mask_url=f"/examples/{quote(name, safe='')}/mask" if files.mask is not None else None,
            thumbnail_url=f"/examples/{quote(name, safe='')}/thumbnail",
        )
        for name, files in find_examples(examples_dir()).items()
    ]


@router.get(
    "/examples/{name}/image",
    tags=["examples"],
    response_class=FileResponse,
    responses={200: {"content": {t: {} for t in set(IMAGE_TYPES.values())}}, **_NOT_FOUND_DOC},
)
def example_image(name: str) -> Response:
    """The example tile's image file, as stored."""
    files = find_examples(examples_dir()).get(name)
    if files is None:
        return _not_found(name)
    return _example_file(files.image)


@router.get(
    "/examples/{name}/mask",
    tags=["examples"],
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}}}, **_NOT_FOUND_DOC},
)
def example_mask(name: str) -> Response:
    """The example tile's ground-truth mask (index PNG), as stored."""
    files = find_examples(examples_dir()).get(name)
    if files is None or files.mask is None:
        return _not_found(name)
    return _example_file(files.mask)


@router.get(
    "/examples/{name}/thumbnail",
    tags=["examples"],
    response_class=FileResponse,
    responses={
        200: {"content": {t: {} for t in set(IMAGE_TYPES.values())}},
        422: {"model": ExampleError},
        **_NOT_FOUND_DOC,
    },
)
def example_thumbnail(name: str) -> Response:
    """The example tile's image as a browser can show it: a picture as stored, a TIFF (which
    browsers cannot show) as an RGB PNG, its bands named red, green and blue, else the first
    three."""
    files = find_examples(examples_dir()).get(name)
    if files is None:
        return _not_found(name)
    if files.image.suffix.lower() not in TIFF_SUFFIXES:
        return _example_file(files.image)
    try:
        png = tiff_thumbnail(files.image)
    except (ImageError, BandError, RasterioError) as exc:
        body = ExampleError(
            error=ExampleErrorDetail(code="unreadable_example", message=f"example {name!r}: {exc}")
        )
        return JSONResponse(status_code=422, content=body.model_dump())
    return Response(
        png,
        media_type="image/png",
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )
