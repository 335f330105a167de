"""HTTP routes: parse the request, call the engine, shape the answer. No model code here."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
from fastapi import APIRouter, Depends, File, Query, Request, Security, UploadFile
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.engine import Engine, Ticket
from service.errors import ApiError, UnprocessableError
from service.schemas import (
    ErrorResponse,
    EvaluateFormat,
    EvaluateResponse,
    Health,
    ModelInfo,
    Ready,
    SegmentFormat,
    SegmentRle,
)
from shared.bands import BandError, BandSpec, NodataRule, parse_band_list, parse_nodata
from shared.checkpoint import bands_from_checkpoint, gsd_from_checkpoint
from shared.codec import (
    mask_to_classes,
    mask_to_geojson,
    mask_to_geotiff,
    mask_to_png,
    mask_to_rle,
    probabilities_to_cog,
)
from shared.geotiff import (
    GeoImage,
    RasterOptionError,
    Scale,
    decode_raster,
    is_tiff,
    mask_invalid,
    parse_scale,
    raster_size,
)
from shared.imaging import ImageError, decode_mask, encode_png
from shared.labels import LabelMap, MaskValueError
from shared.metrics import ConfusionMatrix, scores
from shared.pipeline import Prediction
from shared.raster import (
    georef_of,
    ground_sample_distance,
    open_for_model,
    read_all,
    scale_warning,
)

router = APIRouter()
T = TypeVar("T")


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


EngineDep = Annotated[Engine, Depends(get_engine)]

_API_KEY = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="Needed when SATSEG_API_KEYS is set."
)
_BEARER = HTTPBearer(auto_error=False, description="The same key as `Authorization: Bearer`.")


async def _api_key_documented(
    _key: Annotated[str | None, Security(_API_KEY)],
    _token: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)],
) -> None:
    """Declares the API-key schemes in OpenAPI; ``service.limits.ApiKeyMiddleware`` enforces
    them before the body is read."""


PROTECTED = [Depends(_api_key_documented)]


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error answers an endpoint can give (all share one body)."""
    text = {
        400: "The upload is empty, corrupt or not an image.",
        401: "Missing or wrong API key (only when SATSEG_API_KEYS is set).",
        413: "The body exceeds SATSEG_MAX_BODY_BYTES or the image exceeds SATSEG_MAX_PIXELS.",
        415: "An image format outside PNG, JPEG, TIFF, WebP and BMP.",
        422: "Invalid parameters (`bands`, `scale`, `format=geotiff` for an image without "
        "georeferencing), or inputs that do not fit together.",
        500: "An unexpected server error (the body carries no internals).",
        503: "Not ready, at capacity or out of device memory; see Retry-After.",
        504: "The request passed its deadline (SATSEG_REQUEST_TIMEOUT_S).",
    }
    return {s: {"model": ErrorResponse, "description": text[s]} for s in statuses}


_INFERENCE_ERRORS = _errors(400, 401, 413, 415, 422, 500, 503, 504)

ImageUpload = Annotated[
    UploadFile,
    File(
        description="The image: PNG, JPEG, TIFF, WebP or BMP, any size up to SATSEG_MAX_PIXELS. "
        "TIFFs (GeoTIFFs) may have any number of bands and any numeric type; see `bands` and "
        "`scale`."
    ),
]
FormatQuery = Annotated[
    SegmentFormat,
    Query(
        description="`png`: a palette PNG of class ids; `rle`: JSON with COCO RLE per class; "
        "`geotiff`: a single-band uint8 Cloud Optimized GeoTIFF of class ids with the input's "
        "CRS and geotransform (for georeferenced TIFF input only); `probabilities`: a uint8 "
        "COG with one band per class (softmax x 255, summing to 255 per pixel); `geojson`: "
        "polygons per class (see `crs`, `min_area`, `simplify`)."
    ),
]
GeoJsonCrs = Annotated[
    Literal["raster", "EPSG:4326"],
    Query(
        description="`format=geojson` coordinates: the raster's CRS, or longitude/latitude "
        "(EPSG:4326). Pixel coordinates (x column, y row) for an image without georeferencing."
    ),
]
MinArea = Annotated[
    float,
    Query(ge=0, allow_inf_nan=False, description="`format=geojson`: drop polygons under N px."),
]
Simplify = Annotated[
    float,
    Query(
        ge=0,
        allow_inf_nan=False,
        description="`format=geojson`: simplification tolerance in pixels (0 keeps every edge).",
    ),
]


@dataclass(frozen=True)
class RasterOptions:
    """How a TIFF upload becomes the model's input (see ``shared.geotiff``, ``shared.bands``);
    other formats ignore it."""

    bands: tuple[int, ...] | None
    scale: Scale
    nodata: NodataRule = "auto"


def raster_options(
    bands: Annotated[
        str | None,
        Query(
            description="TIFF bands in the model's order, 1-based. An RGB model: R,G,B, e.g. "
            "`4,3,2` (Sentinel-2 true colour), or one band shown as grey (default 1,2,3; band 1 "
            "for files of 1 or 2 bands). A multi-band model (see `GET /model`): one number per "
            "band it reads (default: the file's bands in order when it has exactly that many, "
            "else the bands at the checkpoint's source indices)."
        ),
    ] = None,
    scale: Annotated[
        str,
        Query(
            description="How TIFF values become 0..255: `auto` (uint8 unchanged, other types a "
            "per-band 2-98 percentile stretch), `minmax`, `percentile:LOW,HIGH`, or one fixed "
            "range `LOW,HIGH` for every band, e.g. `0,3000` for Sentinel-2 L2A reflectance."
        ),
    ] = "auto",
    nodata: Annotated[
        str,
        Query(
            description="Which TIFF pixels are nodata (answered 255, left out of scores): "
            "`auto` (the file's nodata value, alpha band and mask, plus pixels zero in every "
            "band connected to the scene's edge: an untagged fill collar), `none` (every "
            "finite pixel is valid), or a value that marks nodata where every band holds it."
        ),
    ] = "auto",
) -> RasterOptions:
    """Parsed before any upload is decoded, so a malformed choice costs nothing."""
    try:
        return RasterOptions(
            bands=parse_band_list(bands), scale=parse_scale(scale), nodata=parse_nodata(nodata)
        )
    except RasterOptionError as exc:
        raise UnprocessableError(str(exc), code=exc.code) from exc
    except BandError as exc:
        raise UnprocessableError(str(exc), code="invalid_raster_option") from exc


RasterDep = Annotated[RasterOptions, Depends(raster_options)]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


# The setting behind each size refusal, named in its message.
_LIMIT_SETTINGS = {
    "image_too_large": "SATSEG_MAX_PIXELS",
    "decoded_too_large": "SATSEG_MAX_DECODED_BYTES",
    "too_many_bands": "SATSEG_MAX_BANDS",
}


async def _checked(
    engine: Engine, what: str, fn: Callable[..., T], data: bytes, **options: Any
) -> T:
    """``fn(data, **options)`` on the I/O pool under the service's size limits; an
    :class:`ImageError` becomes an answer naming the upload (and the setting that refused it)."""
    settings = engine.settings
    try:
        return await engine.run_io(
            fn,
            data,
            max_pixels=settings.max_pixels,
            max_decoded_bytes=settings.max_decoded_bytes,
            **options,
        )
    except ImageError as exc:
        # Name the upload, which matters when several files come in one request.
        setting = _LIMIT_SETTINGS.get(exc.code)
        hint = f" ({setting})" if setting else ""
        raise ApiError(f"{what}: {exc}{hint}", status=exc.status, code=exc.code) from exc


async def _decode(
    engine: Engine, upload: UploadFile, what: str, decode: Callable[..., T], **options: Any
) -> T:
    return await _checked(engine, what, decode, await upload.read(), **options)


@dataclass(frozen=True)
class Decoded:
    """An upload as the model reads it.

    Attributes:
        rgb: ``(H, W, 3)`` uint8: the model's input for an RGB model, else a preview.
        geo: a TIFF's georeferencing and nodata pixels (None for other formats).
        pixels: ``(H, W, B)`` float32 band values for a multi-band model, else None.
        warnings: why the answer may be unreliable (an input at another scale).
    """

    rgb: np.ndarray
    geo: GeoImage | None
    pixels: np.ndarray | None = None
    warnings: tuple[str, ...] = ()


async def _decode_image(
    engine: Engine,
    upload: UploadFile,
    what: str,
    raster: RasterOptions,
    ticket: Ticket,
    held: AsyncExitStack,
) -> Decoded:
    """The upload as the ticket's model reads it (its band spec decides): RGB and, for a TIFF,
    its georeferencing and nodata pixels; for a multi-band model, the band values too.

    The header is checked first (pixels, bands, sample type, decoded bytes: 413/422 before any
    pixel is decoded), then the request's estimated working memory is reserved on ``held``
    (waits, or 503), and only then is the image decoded."""
    data = await upload.read()
    limits = {"max_bands": engine.settings.max_bands}
    size = await _checked(engine, what, raster_size, data, **limits)
    await held.enter_async_context(
        engine.reserve_memory(engine.working_memory(size, len(data), ticket))
    )
    predictor = ticket.model.predictor
    spec = bands_from_checkpoint(predictor.metadata)
    options = {"scale": raster.scale, "nodata": raster.nodata}
    if spec.reads_pictures():
        rgb, geo = await _checked(
            engine, what, decode_raster, data, bands=raster.bands, **options, **limits
        )
        decoded = Decoded(rgb, geo)
    else:
        fill = [m * predictor.normalization.scale for m in predictor.normalization.mean]
        decoded = await _checked(
            engine, what, _read_bands, data, spec=spec, fill=fill, bands=raster.bands, **options
        )
    georef = georef_of(decoded.geo)
    height, width = decoded.rgb.shape[:2]
    warning = scale_warning(
        gsd_from_checkpoint(predictor.metadata), ground_sample_distance(georef, height, width)
    )
    if warning is None:
        return decoded
    return Decoded(decoded.rgb, decoded.geo, decoded.pixels, (f"{what}: {warning}",))


def _read_bands(
    data: bytes,
    *,
    spec: BandSpec,
    fill: list[float],
    bands: tuple[int, ...] | None,
    scale: Scale,
    nodata: NodataRule,
    max_pixels: int,
    max_decoded_bytes: int | None,
) -> Decoded:
    """A TIFF for a multi-band model: its bands (``bands`` reorders) as values, nodata pixels at
    the training means (``fill``), and an RGB preview. Other formats answer 422."""
    with open_for_model(
        data, spec, fill=fill, bands=bands, scale=scale, nodata=nodata, max_pixels=max_pixels
    ) as raster:
        rows = read_all(raster)
        return Decoded(rows.rgb, raster.geo_image(rows), rows.pixels)


def _label_map(ticket: Ticket) -> LabelMap:
    """The label map of the model that answers this request (fixed at admission)."""
    return ticket.model.predictor.label_map


MODEL_VERSION = "X-Model-Version"


_FILES = {
    SegmentFormat.png: ("image/png", "mask.png"),
    SegmentFormat.geotiff: ("image/tiff", "mask.tif"),
    SegmentFormat.probabilities: ("image/tiff", "probabilities.tif"),
}


def _encode_image(
    prediction: Prediction, geo: GeoImage | None, label_map: LabelMap, format: SegmentFormat
) -> bytes:
    """The mask as a palette PNG or (``geo`` georeferenced) a COG, or the probabilities as a
    COG; nodata pixels are already ignore_index (probabilities 0)."""
    mask = prediction.mask
    if format is SegmentFormat.geotiff:
        assert geo is not None  # checked before inference
        return mask_to_geotiff(mask, geo, label_map)
    if format is SegmentFormat.probabilities:
        assert prediction.probabilities is not None
        return probabilities_to_cog(prediction.probabilities, georef_of(geo), label_map, mask)
    return mask_to_png(mask, label_map)


PreviewQuery = Annotated[
    bool,
    Query(
        description="`format=rle`: add the input as an RGB PNG (`preview`), e.g. for a "
        "browser that cannot show a TIFF; a multi-band input shows its red, green and blue "
        "bands, else its first three."
    ),
]


@router.post(
    "/segment",
    dependencies=PROTECTED,
    summary="Segment one image",
    response_model=SegmentRle,
    responses={
        200: {
            "description": "`format=png`: the class-id mask, same height and width as the "
            "input, with the label colours as its palette. `format=rle`: JSON. "
            "`format=geotiff`: a single-band uint8 GeoTIFF of class ids on the input's CRS, "
            "geotransform and size, the label colours as its colour table; nodata input "
            "pixels are ignore_index in every format.",
            "content": {
                "image/png": {"schema": {"type": "string", "format": "binary"}},
                "image/tiff": {"schema": {"type": "string", "format": "binary"}},
                "application/geo+json": {"schema": {"type": "object"}},
            },
        },
        **_INFERENCE_ERRORS,
    },
)
async def segment(
    engine: EngineDep,
    image: ImageUpload,
    raster: RasterDep,
    response: Response,
    format: FormatQuery = SegmentFormat.png,
    crs: GeoJsonCrs = "raster",
    min_area: MinArea = 0.0,
    simplify: Simplify = 0.0,
    preview: PreviewQuery = False,
) -> Any:
    """Predict a class for every pixel of the uploaded image.

    `curl -F image=@tile.jpg localhost:8000/segment -o mask.png`

    `curl -F image=@scene.tif "localhost:8000/segment?format=geotiff&bands=4,3,2" -o mask.tif`

    `curl -F image=@scene.tif "localhost:8000/segment?format=geojson&crs=EPSG:4326"`

    Scenes over the service's pixel limit: `python -m trainer.predict`, which streams them.
    """
    start = time.perf_counter()
    name = f"image '{image.filename}'"
    async with AsyncExitStack() as held:  # admission, then the image's memory
        ticket = held.enter_context(engine.admit())
        upload = await _decode_image(engine, image, name, raster, ticket, held)
        geo = upload.geo
        await _check_placeable(image, name, geo, format, crs)
        decoded = time.perf_counter()
        prediction = await engine.predict(
            upload.rgb,
            ticket,
            valid=None if geo is None else geo.valid,
            probabilities=format is SegmentFormat.probabilities,
            pixels=upload.pixels,
        )
        inferred = time.perf_counter()
        body = await _encode(
            engine,
            prediction,
            upload,
            _label_map(ticket),
            format,
            crs=crs,
            min_area=min_area,
            simplify=simplify,
            preview=preview,
        )
        end = time.perf_counter()
    timing = {
        "decode": _ms(decoded - start),
        "inference": _ms(inferred - decoded),
        "encode": _ms(end - inferred),
        "total": _ms(end - start),
    }
    if format is not SegmentFormat.rle:
        return _answer(format, body, timing, ticket.model.sha256, upload.warnings)
    response.headers[MODEL_VERSION] = ticket.model.sha256
    response.headers.update(_warning_headers(upload.warnings))
    return {**body, "timing_ms": timing, "warnings": list(upload.warnings)}


async def _encode(
    engine: Engine,
    prediction: Prediction,
    upload: Decoded,
    label_map: LabelMap,
    format: SegmentFormat,
    *,
    crs: str,
    min_area: float,
    simplify: float,
    preview: bool,
) -> Any:
    """The answer's content, encoded on the I/O pool: for ``rle`` its JSON fields but timing
    and warnings, for ``geojson`` the feature collection, else the file's bytes."""
    mask = prediction.mask
    if format is SegmentFormat.geojson:
        return await engine.run_io(
            mask_to_geojson,
            mask,
            georef_of(upload.geo),
            label_map,
            crs=crs,
            min_area=min_area,
            simplify=simplify,
        )
    if format is not SegmentFormat.rle:
        return await engine.run_io(_encode_image, prediction, upload.geo, label_map, format)
    return {
        "height": int(mask.shape[0]),
        "width": int(mask.shape[1]),
        "classes": await engine.run_io(mask_to_classes, mask, label_map),
        "preview": await engine.run_io(_data_url, upload.rgb) if preview else None,
    }


async def _check_placeable(
    image: UploadFile, name: str, geo: GeoImage | None, format: SegmentFormat, crs: str
) -> None:
    """Refuse, before inference, an answer that could not be placed on the map."""
    if format is SegmentFormat.geotiff and (geo is None or not geo.georeferenced):
        await image.seek(0)
        tiff = is_tiff(await image.read(4))  # a plain TIFF decodes through PIL: geo None
        found = "a TIFF without a CRS, geotransform or GCPs" if tiff else "not a TIFF"
        raise UnprocessableError(
            f"format=geotiff needs a georeferenced TIFF; {name} is {found}. "
            "Ask for format=png or format=rle instead.",
            code="not_georeferenced",
        )
    if format is SegmentFormat.geojson and crs != "raster" and not georef_of(geo).crs:
        raise UnprocessableError(
            f"crs={crs} needs a TIFF with a CRS; {name} has none. "
            "Leave crs out for pixel coordinates.",
            code="not_georeferenced",
        )


def _answer(
    format: SegmentFormat,
    content: Any,
    timing: dict[str, float],
    model_version: str,
    warnings: tuple[str, ...] | list[str],
) -> Response:
    """A GeoJSON or file answer, with its timing, model version and warnings as headers."""
    headers = {
        "Server-Timing": ", ".join(f"{k};dur={v}" for k, v in timing.items()),
        MODEL_VERSION: model_version,
        **_warning_headers(warnings),
    }
    if format is SegmentFormat.geojson:
        if warnings:
            content = {**content, "warnings": list(warnings)}
        return JSONResponse(content, media_type="application/geo+json", headers=headers)
    media_type, filename = _FILES[format]
    headers["Content-Disposition"] = f'inline; filename="{filename}"'
    return Response(content, media_type=media_type, headers=headers)


def _data_url(rgb: np.ndarray) -> str:
    """``(H, W, 3)`` uint8 as a PNG ``data:`` URL."""
    return "data:image/png;base64," + base64.b64encode(encode_png(rgb)).decode("ascii")


WARNING_HEADER = "X-SatSeg-Warning"


def _warning_headers(warnings: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``X-SatSeg-Warning`` with the answer's warnings (ASCII, one line), or nothing."""
    if not warnings:
        return {}
    text = " | ".join(warnings)
    return {WARNING_HEADER: text.encode("ascii", "replace").decode().replace("\n", " ")}


ImageUploads = Annotated[
    list[UploadFile],
    File(min_length=1, description="Images; repeat the field for several pairs."),
]
MaskUploads = Annotated[
    list[UploadFile],
    File(
        min_length=1,
        description="Ground-truth masks (index or colour PNG), paired with images in order.",
    ),
]
EvaluateFormatQuery = Annotated[
    EvaluateFormat,
    Query(
        description="`rle` adds each prediction and ground truth as COCO RLE; `png` "
        "leaves them out."
    ),
]


@dataclass
class _Tally:
    """What an ``/evaluate`` request gathers over its pairs besides their scores."""

    decode_s: float = 0.0
    infer_s: float = 0.0
    warnings: list[str] = field(default_factory=list)


@router.post(
    "/evaluate",
    dependencies=PROTECTED,
    summary="Score predictions against ground-truth masks",
    response_model=EvaluateResponse,
    responses=_INFERENCE_ERRORS,
)
async def evaluate(
    engine: EngineDep,
    image: ImageUploads,
    mask: MaskUploads,
    raster: RasterDep,
    response: Response,
    format: EvaluateFormatQuery = EvaluateFormat.png,
    preview: PreviewQuery = False,
) -> Any:
    """Segment each image and compare it with its mask: confusion matrix, IoU, Dice,
    pixel accuracy per pair and over all pairs.

    Images may be GeoTIFFs (`bands`, `scale` as for `/segment`); their nodata pixels are
    left out of the scores."""
    _check_pair_count(len(image), len(mask), engine.settings.max_pairs)
    start = time.perf_counter()
    tally = _Tally()
    with_masks = format is EvaluateFormat.rle
    with engine.admit() as ticket:
        label_map = _label_map(ticket)
        total = ConfusionMatrix(label_map.num_classes, label_map.ignore_index)
        pairs = [
            await _evaluate_pair(
                engine, ticket, total, tally, index, files, raster, with_masks, preview
            )
            for index, files in enumerate(zip(image, mask, strict=True))
        ]
        aggregate = _scores(total, label_map)
    end = time.perf_counter()
    response.headers[MODEL_VERSION] = ticket.model.sha256
    response.headers.update(_warning_headers(tally.warnings))
    return {
        "warnings": tally.warnings,
        "num_pairs": len(pairs),
        "pairs": pairs,
        "aggregate": aggregate,
        "timing_ms": {
            "decode": _ms(tally.decode_s),
            "inference": _ms(tally.infer_s),
            "encode": _ms(end - start - tally.decode_s - tally.infer_s),
            "total": _ms(end - start),
        },
    }


async def _evaluate_pair(
    engine: Engine,
    ticket: Ticket,
    total: ConfusionMatrix,
    tally: _Tally,
    index: int,
    files: tuple[UploadFile, UploadFile],
    raster: RasterOptions,
    with_masks: bool,
    preview: bool,
) -> dict[str, Any]:
    """Pair ``index`` decoded, segmented and scored (its confusion matrix joins ``total``, its
    times and warnings ``tally``); with ``with_masks`` and ``preview``, its image as a PNG."""
    image_file, mask_file = files
    label_map = _label_map(ticket)
    async with AsyncExitStack() as held:  # one pair's memory at a time
        t0 = time.perf_counter()
        decoded, truth = await _decode_pair(
            engine, ticket, held, label_map, index, image_file, mask_file, raster
        )
        geo = decoded.geo
        tally.warnings.extend(decoded.warnings)
        t1 = time.perf_counter()
        prediction = await engine.segment(
            decoded.rgb, ticket, valid=None if geo is None else geo.valid, pixels=decoded.pixels
        )
    t2 = time.perf_counter()
    tally.decode_s, tally.infer_s = tally.decode_s + t1 - t0, tally.infer_s + t2 - t1
    names = (image_file.filename, mask_file.filename)
    pair = await engine.run_io(
        _score_pair, label_map, total, index, names, prediction, truth, geo, with_masks=with_masks
    )
    if preview and with_masks:
        pair["preview"] = await engine.run_io(_data_url, decoded.rgb)
    return pair


def _check_pair_count(images: int, masks: int, max_pairs: int) -> None:
    if images != masks:
        raise UnprocessableError(
            f"Got {images} image(s) and {masks} mask(s); send one mask per image, paired in order.",
            code="pair_count_mismatch",
        )
    if images > max_pairs:
        raise UnprocessableError(
            f"Got {images} pairs; at most {max_pairs} are evaluated per request "
            "(SATSEG_MAX_PAIRS).",
            code="too_many_pairs",
        )


async def _decode_pair(
    engine: Engine,
    ticket: Ticket,
    held: AsyncExitStack,
    label_map: LabelMap,
    index: int,
    image_file: UploadFile,
    mask_file: UploadFile,
    raster: RasterOptions,
) -> tuple[Decoded, np.ndarray]:
    """Decode pair ``index`` to ``(image, truth)``; its mask must match the image's size and
    hold only known labels."""
    decoded = await _decode_image(
        engine, image_file, f"image {index} ('{image_file.filename}')", raster, ticket, held
    )
    pixels = decoded.rgb
    raw = await _decode(engine, mask_file, f"mask {index} ('{mask_file.filename}')", decode_mask)
    (ih, iw), (mh, mw) = pixels.shape[:2], raw.shape[:2]
    if (ih, iw) != (mh, mw):
        raise UnprocessableError(
            f"Pair {index}: mask '{mask_file.filename}' is {mw}x{mh} (width x height) but "
            f"image '{image_file.filename}' is {iw}x{ih}; they must be the same size.",
            code="mask_size_mismatch",
        )
    try:
        truth = await engine.run_io(label_map.to_index, raw)
    except MaskValueError as exc:
        raise UnprocessableError(
            f"Pair {index}: mask '{mask_file.filename}': {exc}", code="unknown_mask_values"
        ) from exc
    return decoded, truth


def _score_pair(
    label_map: LabelMap,
    total: ConfusionMatrix,
    index: int,
    names: tuple[str | None, str | None],
    prediction: np.ndarray,
    truth: np.ndarray,
    geo: GeoImage | None,
    *,
    with_masks: bool,
) -> dict[str, Any]:
    """Per-pair scores, and with ``with_masks`` the prediction and truth as RLE; the pair's
    confusion matrix is also added to ``total``.

    ``prediction`` and ``truth`` are ``(H, W)`` uint8 ids; ``ignore_index`` truth pixels are
    not scored. Nodata pixels of a GeoTIFF image become ``ignore_index`` in both first: the
    model saw no data there."""
    prediction = mask_invalid(prediction, geo, label_map.ignore_index)
    truth = mask_invalid(truth, geo, label_map.ignore_index)
    matrix = ConfusionMatrix(label_map.num_classes, label_map.ignore_index)
    matrix.update(prediction, truth)
    total.merge(matrix)
    result: dict[str, Any] = {
        "index": index,
        "image": names[0],
        "mask": names[1],
        "height": int(prediction.shape[0]),
        "width": int(prediction.shape[1]),
        "scores": _scores(matrix, label_map),
        "prediction": mask_to_rle(prediction, label_map) if with_masks else None,
        "truth": mask_to_rle(truth, label_map) if with_masks else None,
    }
    return result


def _scores(matrix: ConfusionMatrix, label_map: LabelMap) -> dict[str, Any]:
    result = scores(matrix.matrix, label_map.names)  # per-class "id": label ids are 0..C-1
    result["confusion_matrix"] = matrix.matrix.tolist()
    return result


@router.get(
    "/model",
    dependencies=PROTECTED,
    summary="Architecture, classes and checkpoint metadata",
    response_model=ModelInfo,
    responses=_errors(401, 503),
)
async def model(engine: EngineDep) -> Any:
    return engine.model_info()


@router.get("/healthz", summary="Liveness", response_model=Health)
async def healthz() -> Any:
    """Answers as long as the process serves HTTP, whatever the model's state."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness",
    response_model=Ready,
    responses={503: {"model": ErrorResponse, "description": "Not ready; the message says why."}},
)
async def readyz(engine: EngineDep) -> Any:
    """200 once the model is loaded and warmed up; 503 with the reason while loading, when
    the checkpoint was refused, and during shutdown."""
    if not engine.ready:
        error = engine.not_ready_error()
        return JSONResponse(
            {"error": {"code": error.code, "message": error.message}},
            status_code=503,
            headers=error.headers,
        )
    return {
        "status": "ready",
        "queue": {"in_flight": engine.in_flight, "capacity": engine.settings.max_queue},
    }
