"""Windowed reading of rasters: the scene is read a band of rows at a time, never whole.

:class:`GdalRaster` (anything GDAL reads, through rasterio windows) and :class:`ArrayRaster` (an
image already in memory, e.g. a decoded upload) give the pipeline the same thing: ``(h, W, 3)``
uint8 RGB rows, their validity, and for a multi-band model the band values (``Rows.pixels``),
with a :class:`Georef` for the writers. Nodata follows :func:`shared.bands.nodata_mask`, the one
rule. Details: docs/inference-path.md, "Reading".
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import rasterio
from rasterio.control import GroundControlPoint
from rasterio.crs import CRS
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.io import DatasetReader, MemoryFile
from rasterio.transform import Affine
from rasterio.windows import Window

from shared.bands import (
    NODATA_AUTO,
    NODATA_NONE,
    BandError,
    BandSpec,
    Collar,
    NodataRule,
    band_names,
    model_band_indexes,
    nodata_mask,
    parse_nodata,
    raster_nodata_inputs,
    trace_collar,
)
from shared.geotiff import (
    STATS_SAMPLES,
    GeoImage,
    Scale,
    band_range,
    check_header,
    choose_bands,
    clean_error,
    is_tiff,
    parse_bands,
    parse_scale,
    to_uint8,
)
from shared.imaging import (
    DEFAULT_MAX_PIXELS,
    CorruptImageError,
    ImageError,
    ImageTooLargeError,
    UnsupportedFormatError,
    decode_image,
    image_size,
)

# GDAL's block cache would otherwise keep up to 5% of RAM of decoded blocks alive; the pipeline
# reads each row band once, so a small cache loses nothing and keeps memory flat.
READ_CACHE_BYTES = 64 * 1024 * 1024
# Pixels per GDAL read of a window (columns a multiple of the alignment, usually a block side):
# a band of 512 rows of a 40,000 px wide scene is read in chunks of 4096 columns.
READ_CHUNK_PIXELS = 512 * 4096
READ_CHUNK_ALIGN = 512


class BandMismatchError(ImageError):
    """An input without the bands the model reads; the message names those expected and
    received."""

    status = 422
    code = "band_mismatch"


@dataclass(frozen=True)
class Georef:
    """Where a raster's pixels lie on Earth.

    Attributes:
        crs: coordinate reference system, or None.
        transform: pixel -> CRS affine transform (identity when the file has none).
        gcps: ground control points, for rasters placed by GCPs instead of a transform.
        gcps_crs: the CRS of ``gcps``.
    """

    crs: CRS | None = None
    transform: Affine = field(default_factory=Affine.identity)
    gcps: tuple[GroundControlPoint, ...] = ()
    gcps_crs: CRS | None = None

    @property
    def georeferenced(self) -> bool:
        """Whether the pixels are placed on Earth (a CRS, a geotransform or GCPs)."""
        return self.crs is not None or self.transform != Affine.identity() or bool(self.gcps)


# A georeferenced input whose pixels are this many times larger or smaller than the model's
# training data gets its answer with a warning: features look different at another scale.
GSD_WARN_RATIO = 4.0
# Metres per degree of latitude (and of longitude at the equator) on the WGS84 ellipsoid.
_METRES_PER_DEGREE = 111_320.0


def ground_sample_distance(georef: Georef, height: int, width: int) -> float | None:
    """Side of a pixel in metres (the geometric mean of its width and height), at the scene's
    centre for geographic CRSs; None without a CRS and geotransform."""
    if georef.crs is None or georef.transform == Affine.identity():
        return None
    t = georef.transform
    area = abs(t.a * t.e - t.b * t.d)
    if area == 0:
        return None
    if georef.crs.is_geographic:
        lat = t.d * width / 2 + t.e * height / 2 + t.f
        scale = _METRES_PER_DEGREE**2 * max(math.cos(math.radians(lat)), 1e-6)
        return math.sqrt(area * scale)
    return math.sqrt(area) * float(georef.crs.linear_units_factor[1])


def scale_warning(model_gsd_m: float | None, input_gsd_m: float | None) -> str | None:
    """A warning when the input's pixels differ from the training data's by more than
    :data:`GSD_WARN_RATIO` times either way; None when they do not or either is unknown."""
    if not model_gsd_m or not input_gsd_m:
        return None
    ratio = input_gsd_m / model_gsd_m
    if 1 / GSD_WARN_RATIO <= ratio <= GSD_WARN_RATIO:
        return None
    return (
        f"the input's pixels are {_metres(input_gsd_m)}, the model was trained on "
        f"{_metres(model_gsd_m)} pixels ({ratio:.3g}x): predictions at another scale are "
        "unreliable; resample the input to the model's resolution"
    )


def _metres(value: float) -> str:
    return f"{value / 1000:.3g} km" if value >= 1000 else f"{value:.3g} m"


@dataclass(frozen=True)
class Rows:
    """A band of rows read from a raster.

    Attributes:
        rgb: ``(h, W, 3)`` uint8 (for a multi-band model, a preview of the scene).
        valid: ``(h, W)`` bool, False where the input was nodata/masked/NaN; None when all valid.
        pixels: ``(h, W, B)`` float32, the model's bands as read (nodata pixels hold the
            reader's fill values); None when the model reads ``rgb``.
    """

    rgb: np.ndarray
    valid: np.ndarray | None = None
    pixels: np.ndarray | None = None

    @property
    def model_input(self) -> np.ndarray:
        """What the model reads: ``pixels`` for a multi-band model, else ``rgb``."""
        return self.rgb if self.pixels is None else self.pixels


class RasterSource(Protocol):
    """What the pipeline reads from: a size, a georeference and rows on demand."""

    height: int
    width: int
    georef: Georef
    # Whether any pixel may be nodata; decides whether the outputs declare a nodata value.
    has_nodata: bool

    def read_rows(self, row: int, count: int) -> Rows:
        """Rows ``[row, row + count)`` (clipped to the raster), full width."""
        ...


class ArrayRaster:
    """An ``(H, W, 3)`` uint8 image in memory as a :class:`RasterSource`."""

    def __init__(
        self,
        rgb: np.ndarray,
        valid: np.ndarray | None = None,
        georef: Georef | None = None,
        pixels: np.ndarray | None = None,
    ) -> None:
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"image must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
        if rgb.shape[0] == 0 or rgb.shape[1] == 0:
            raise ValueError(f"image is empty ({rgb.shape[0]}x{rgb.shape[1]})")
        if valid is not None and valid.shape != rgb.shape[:2]:
            raise ValueError(f"valid is {valid.shape}, image is {rgb.shape[:2]}")
        if pixels is not None and (pixels.ndim != 3 or pixels.shape[:2] != rgb.shape[:2]):
            raise ValueError(f"pixels are {pixels.shape}, image is {rgb.shape[:2]}")
        self.rgb = rgb
        self.valid = valid
        self.pixels = pixels
        self.height, self.width = int(rgb.shape[0]), int(rgb.shape[1])
        self.georef = georef or Georef()
        self.has_nodata = valid is not None

    def read_rows(self, row: int, count: int) -> Rows:
        return self.read_window(row, 0, count, self.width)

    def read_window(self, row: int, col: int, height: int, width: int) -> Rows:
        """Rows ``[row, row + height)`` of columns ``[col, col + width)`` (clipped)."""
        rows, cols = slice(row, row + height), slice(col, col + width)
        valid = None if self.valid is None else self.valid[rows, cols]
        pixels = None if self.pixels is None else self.pixels[rows, cols]
        return Rows(self.rgb[rows, cols], valid, pixels)


@dataclass(frozen=True)
class SceneStatistics:
    """What a :class:`GdalRaster` derives from the whole scene when it opens: the traced
    collar (None unless the nodata rule is auto) and the per-band stretch. Handed to another
    opening of the same file with the same options (a block read in another process), it
    spares that opening the whole-scene reads and keeps every window's pixels the same."""

    collar: Collar | None
    stretch: tuple[tuple[float, float], ...]


class GdalRaster:
    """A raster GDAL reads, read window by window through rasterio.

    Use as a context manager (or call :meth:`close`). Band choice and scaling as in
    :func:`shared.geotiff.read_geotiff`; the per-band stretch is fixed at opening, from a
    decimated read of at most ``STATS_SAMPLES`` pixels per band, so every window is scaled
    alike.

    ``model``, a multi-band model's band spec, has the bands it reads (``model_bands``, 1-based
    in model order, else :func:`shared.bands.model_band_indexes`) read as values into
    ``Rows.pixels``, nodata pixels set to ``fill`` (one value per band; 0 by default); the RGB
    rows are then a preview of those bands: the ones named red, green and blue, else the first
    three (``bands``, if given, picks the preview instead). ``nodata`` is the rule of
    :func:`shared.bands.nodata_mask`. ``statistics``, from :attr:`statistics` of an earlier
    opening, replaces the whole-scene reads.

    Raises:
        BandMismatchError: the raster does not have the bands ``model`` reads.
    """

    def __init__(
        self,
        source: str | Path | bytes,
        *,
        bands: Sequence[int] | str | None = None,
        scale: str | Scale | None = "auto",
        max_pixels: int | None = None,
        nodata: NodataRule = NODATA_AUTO,
        model: BandSpec | None = None,
        model_bands: Sequence[int] | None = None,
        fill: Sequence[float] | None = None,
        statistics: SceneStatistics | None = None,
    ) -> None:
        self._stack = ExitStack()
        is_bytes = isinstance(source, bytes | bytearray | memoryview)
        self._what = "the TIFF" if is_bytes else str(source)
        chosen, self.scale = parse_bands(bands), parse_scale(scale)
        self.nodata = parse_nodata(nodata)
        self.model_bands: tuple[int, ...] | None = None
        if fill is not None and (model is None or len(fill) != model.count):
            raise ValueError("fill needs one value per model band")
        self._fill = None if fill is None else np.asarray(fill, dtype=np.float32)
        try:
            # Opened inside an environment of our own and closed explicitly, so that the
            # dataset holds no per-thread GDAL environment: it may be opened in one thread
            # (a decoding pool) and read and closed in another.
            with warnings.catch_warnings(), _small_cache():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                if is_bytes:
                    memfile = MemoryFile(bytes(source))
                    self._stack.callback(memfile.close)
                    self.src: DatasetReader = memfile.open(driver="GTiff")
                else:
                    self.src = rasterio.open(source)
                self._stack.callback(self.src.close)
            check_header(self.src, max_pixels)
            if len(set(self.src.dtypes)) > 1:
                raise UnsupportedFormatError(
                    f"bands of different types are not supported: {self.src.dtypes}"
                )
            if model is not None:
                try:
                    self.model_bands = model_band_indexes(model, self.src.count, model_bands)
                except BandError as exc:
                    raise BandMismatchError(str(exc)) from None
                if chosen is None:
                    chosen = self._preview_bands()
            self.bands = choose_bands(self.src.count, chosen)
            self.dtype = self.src.dtypes[0]
            self.height, self.width = self.src.height, self.src.width
            gcps, gcps_crs = self.src.gcps
            self.georef = Georef(self.src.crs, self.src.transform, tuple(gcps), gcps_crs)
            # The bands whose values decide nodata: those the model reads.
            self._read_bands = tuple(dict.fromkeys(self.model_bands or self.bands))
            self._float = np.dtype(self.dtype).kind == "f"
            flagged = any(
                MaskFlags.all_valid not in self.src.mask_flag_enums[b - 1] for b in self._read_bands
            )
            with _small_cache():
                self._collar: Collar | None = None
                if statistics is not None:
                    self._collar = statistics.collar
                elif self.nodata == NODATA_AUTO:
                    self._collar = trace_collar(self.src, self._read_bands)
                self.has_nodata = self._float or (
                    self.nodata != NODATA_NONE
                    and (
                        flagged
                        or self.nodata != NODATA_AUTO
                        or (self._collar is not None and self._collar.any())
                    )
                )
                self.stretch = statistics.stretch if statistics is not None else self._stretch()
        except ImageError:
            self.close()
            raise
        except RasterioError as exc:
            self.close()
            raise CorruptImageError(f"cannot read {self._what}: {clean_error(exc)}") from None

    def __enter__(self) -> GdalRaster:
        return self

    @property
    def statistics(self) -> SceneStatistics:
        """The whole-scene statistics this opening computed (or was given)."""
        return SceneStatistics(self._collar, self.stretch)

    def geo_image(self, rows: Rows) -> GeoImage:
        """``rows`` with this raster's georeferencing, bands, type and stretch."""
        georef = self.georef
        return GeoImage(
            rgb=rows.rgb,
            crs=georef.crs,
            transform=georef.transform,
            gcps=georef.gcps,
            gcps_crs=georef.gcps_crs,
            valid=rows.valid,
            bands=self.bands,
            dtype=self.dtype,
            stretch=self.stretch,
        )

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def read_rows(self, row: int, count: int) -> Rows:
        return self.read_window(row, 0, count, self.width)

    def read_window(self, row: int, col: int, height: int, width: int) -> Rows:
        """Rows ``[row, row + height)`` of columns ``[col, col + width)`` (clipped), scaled
        with the whole raster's stretch, so that windows of a scene join seamlessly."""
        height, width = min(height, self.height - row), min(width, self.width - col)
        # A wide window is read in column chunks: the temporaries of a read (the bands as read,
        # nodata masks, scaling) then grow with the chunk, only the finished rows with the window.
        step = READ_CHUNK_PIXELS // max(height, 1) // READ_CHUNK_ALIGN * READ_CHUNK_ALIGN
        step = max(step, READ_CHUNK_ALIGN)
        try:
            with _small_cache():
                if width <= step:
                    return self._read(Window(col, row, width, height))
                return self._read_chunked(row, col, height, width, step)
        except MemoryError:
            raise ImageTooLargeError("the raster window cannot be read within memory") from None
        except RasterioError as exc:
            raise CorruptImageError(f"cannot read {self._what}: {clean_error(exc)}") from None

    def _read_chunked(self, row: int, col: int, height: int, width: int, step: int) -> Rows:
        """:meth:`_read` of the window, ``step`` columns at a time, joined."""
        rgb = np.empty((height, width, 3), dtype=np.uint8)
        valid: np.ndarray | None = None
        pixels: np.ndarray | None = None
        for left in range(0, width, step):
            part = self._read(Window(col + left, row, min(step, width - left), height))
            cols = slice(left, left + part.rgb.shape[1])
            rgb[:, cols] = part.rgb
            if part.pixels is not None:
                if pixels is None:
                    pixels = np.empty((height, width, part.pixels.shape[2]), dtype=np.float32)
                pixels[:, cols] = part.pixels
            if part.valid is not None:
                if valid is None:
                    valid = np.ones((height, width), dtype=bool)
                valid[:, cols] = part.valid
        return Rows(rgb, valid, pixels)

    def _read(self, window: Window) -> Rows:
        unique = list(dict.fromkeys(self._read_bands + self.bands))
        values = self.src.read(unique, window=window)
        read = values[[unique.index(b) for b in self._read_bands]]
        valid = self._valid(read, window)
        rgb = np.empty((int(window.height), int(window.width), 3), dtype=np.uint8)
        for i, band in enumerate(self.bands):
            plane = values[unique.index(band)]
            rgb[:, :, i] = to_uint8(plane, valid, self.stretch[i], self.scale, self.dtype)
        pixels = None
        if self.model_bands is not None:
            planes = values[[unique.index(b) for b in self.model_bands]]
            pixels = np.ascontiguousarray(planes.transpose(1, 2, 0), dtype=np.float32)
            if valid is not None:
                pixels[~valid] = 0.0 if self._fill is None else self._fill
        if valid is not None and valid.all():
            valid = None
        return Rows(rgb, valid, pixels)

    def _valid(
        self, values: np.ndarray, window: Window | None, out_shape: tuple[int, int] | None = None
    ) -> np.ndarray | None:
        """``(h, w)`` bool validity of ``values`` (the read bands) under the nodata rule; a
        decimated whole-scene read (``out_shape``) traces its own collar."""
        inputs = raster_nodata_inputs(self.src, window, out_shape)
        if out_shape is not None or self._collar is None:
            nodata = nodata_mask(values, self.nodata, **inputs)
        else:
            row, col = (0, 0) if window is None else (int(window.row_off), int(window.col_off))
            collar = self._collar.window(row, col, values.shape[1], values.shape[2])
            nodata = nodata_mask(values, self.nodata, collar=collar, **inputs)
        return None if not nodata.any() else ~nodata

    def _preview_bands(self) -> tuple[int, ...]:
        """The model bands named red, green and blue, else the first three (one: grey)."""
        assert self.model_bands is not None
        colours = [c.name for c in self.src.colorinterp]
        names = band_names(self.src.descriptions, colours)
        lower = {names[b - 1].lower(): b for b in self.model_bands}
        named = [
            next((b for n, b in lower.items() if colour in n.split()), None)
            for colour in ("red", "green", "blue")
        ]
        if all(b is not None for b in named):
            return tuple(b for b in named if b is not None)
        return self.model_bands[:3] if len(self.model_bands) >= 3 else self.model_bands[:1]

    def _stretch(self) -> tuple[tuple[float, float], ...]:
        """Per chosen band, the ``(low, high)`` mapped to 0..255."""
        if self.scale.kind == "range" or (self.scale.kind == "auto" and self.dtype == "uint8"):
            return tuple(band_range(np.empty(0), None, self.scale, self.dtype) for _ in self.bands)
        step = max(1, math.ceil(math.sqrt(self.height * self.width / STATS_SAMPLES)))
        shape = (math.ceil(self.height / step), math.ceil(self.width / step))
        full = shape == (self.height, self.width)
        if full:
            valid = self._valid(self.src.read(list(self._read_bands)), None)
        else:
            values = self.src.read(
                list(self._read_bands), out_shape=shape, resampling=Resampling.nearest
            )
            valid = self._valid(values, None, out_shape=shape)
        ranges: dict[int, tuple[float, float]] = {}
        for band in dict.fromkeys(self.bands):
            if full:
                sample = self.src.read(band)
            else:
                sample = self.src.read(band, out_shape=shape, resampling=Resampling.nearest)
            ranges[band] = band_range(sample, valid, self.scale, self.dtype)
        return tuple(ranges[b] for b in self.bands)


def _small_cache() -> rasterio.Env:
    # Entered around each read, in the reading thread (GDAL environments are per thread).
    return rasterio.Env(GDAL_CACHEMAX=READ_CACHE_BYTES)


def open_file(
    path: str | Path,
    *,
    bands: Sequence[int] | str | None = None,
    scale: str | Scale | None = "auto",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    nodata: NodataRule = NODATA_AUTO,
    statistics: SceneStatistics | None = None,
) -> RasterSource:
    """A file as a :class:`RasterSource`. A TIFF (or other GDAL raster) is opened for windowed
    reads, without a pixel cap: it is never read whole. A PNG, JPEG, WebP or BMP, and a plain
    (not georeferenced) TIFF picture when no ``bands``/``scale`` are asked for, is decoded whole
    by :func:`shared.imaging.decode_image`, capped at ``max_pixels``. ``statistics``: as for
    :class:`GdalRaster`.

    Close a :class:`GdalRaster` when done (:func:`close_source`).

    Raises:
        ImageError: one of its subclasses. OSError: the file cannot be read.
    """
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(4)
    chosen, how = parse_bands(bands), parse_scale(scale)
    if not is_tiff(head):
        try:
            return ArrayRaster(decode_image(path.read_bytes(), max_pixels=max_pixels))
        except UnsupportedFormatError:
            # Not a picture format: perhaps one of GDAL's (JPEG 2000, ENVI, VRT...).
            return GdalRaster(path, bands=chosen, scale=how, nodata=nodata, statistics=statistics)
    raster = GdalRaster(path, bands=chosen, scale=how, nodata=nodata, statistics=statistics)
    if chosen is None and how.kind == "auto" and not raster.georef.georeferenced:
        try:
            picture = ArrayRaster(decode_image(path.read_bytes(), max_pixels=max_pixels))
        except (UnsupportedFormatError, CorruptImageError):
            return raster
        raster.close()
        return picture
    return raster


_PICTURE_KINDS = {b"\x89PNG": "PNG", b"\xff\xd8\xff": "JPEG", b"RIFF": "WebP", b"BM": "BMP"}


def open_for_model(
    source: str | Path | bytes,
    model: BandSpec,
    *,
    fill: Sequence[float] | None = None,
    bands: Sequence[int] | None = None,
    scale: str | Scale | None = "auto",
    nodata: NodataRule = NODATA_AUTO,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> GdalRaster:
    """A scene for a multi-band model (``model`` is not 8-bit RGB): a raster GDAL reads, with
    the model's bands (``bands`` reorders) in ``Rows.pixels``, nodata pixels at ``fill``.

    Raises:
        BandMismatchError: a picture (PNG, JPEG...) or a raster without the model's bands; the
            message names the bands expected and received.
        ImageError: another of its subclasses.
    """
    if isinstance(source, bytes):
        head = bytes(source[:8])
    else:
        with Path(source).open("rb") as f:
            head = f.read(8)
    kind = next((k for magic, k in _PICTURE_KINDS.items() if head.startswith(magic)), None)
    if kind is not None:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        try:
            received = f"{image_size(data).bands} band(s)"
        except ImageError:
            received = "an unreadable header"
        raise BandMismatchError(
            f"the model reads {model.count} bands ({', '.join(model.names)}, {model.dtype}); "
            f"the upload is a {kind} picture with {received}. Send a GeoTIFF with the "
            "model's bands."
        )
    return GdalRaster(
        source,
        scale=scale,
        max_pixels=max_pixels,
        nodata=nodata,
        model=model,
        model_bands=bands,
        fill=fill,
    )


def close_source(source: RasterSource) -> None:
    """Release a source's file (a no-op for in-memory ones)."""
    if isinstance(source, GdalRaster):
        source.close()


def read_all(source: RasterSource) -> Rows:
    """Every row of ``source`` in memory (for inputs known to be small)."""
    return source.read_rows(0, source.height)


def georef_of(geo: GeoImage | None) -> Georef:
    """The :class:`Georef` of a decoded upload (an empty one for non-TIFF input)."""
    if geo is None:
        return Georef()
    return Georef(geo.crs, geo.transform, geo.gcps, geo.gcps_crs)
