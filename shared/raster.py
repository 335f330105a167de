"""Windowed reading of rasters: the scene is read a band of rows at a time, never whole.

Two kinds of source give the pipeline the same thing, ``(h, W, 3)`` uint8 RGB rows plus the
rows' validity (False where the input was nodata, masked or NaN):

* :class:`GdalRaster`: a GeoTIFF, or anything else GDAL reads, opened with rasterio and read
  through ``src.read(bands, window=Window(...))``; band choice and value scaling follow
  :mod:`shared.geotiff` (``bands``, ``scale``), with the stretch statistics taken from a
  decimated read, so memory is bounded by the window, not the scene;
* :class:`ArrayRaster`: an image already in memory, e.g. a PNG/JPEG/WebP upload decoded by
  :func:`shared.imaging.decode_image`.

Both carry a :class:`Georef` (CRS, transform, GCPs) that the writers put on the output.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import rasterio
from rasterio.control import GroundControlPoint
from rasterio.crs import CRS
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.io import DatasetReader, MemoryFile
from rasterio.transform import Affine
from rasterio.windows import Window

from shared.geotiff import (
    STATS_SAMPLES,
    GeoImage,
    Scale,
    band_range,
    check_header,
    choose_bands,
    clean_error,
    is_geotiff,
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
)

# GDAL's block cache would otherwise keep up to 5% of RAM of decoded blocks alive; the pipeline
# reads each row band once, so a small cache loses nothing and keeps memory flat.
READ_CACHE_BYTES = 64 * 1024 * 1024


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


@dataclass(frozen=True)
class Rows:
    """A band of rows read from a raster.

    Attributes:
        rgb: ``(h, W, 3)`` uint8.
        valid: ``(h, W)`` bool, False where the input was nodata/masked/NaN; None when all valid.
    """

    rgb: np.ndarray
    valid: np.ndarray | None = None


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
        self, rgb: np.ndarray, valid: np.ndarray | None = None, georef: Georef | None = None
    ) -> None:
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"image must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
        if rgb.shape[0] == 0 or rgb.shape[1] == 0:
            raise ValueError(f"image is empty ({rgb.shape[0]}x{rgb.shape[1]})")
        if valid is not None and valid.shape != rgb.shape[:2]:
            raise ValueError(f"valid is {valid.shape}, image is {rgb.shape[:2]}")
        self.rgb = rgb
        self.valid = valid
        self.height, self.width = int(rgb.shape[0]), int(rgb.shape[1])
        self.georef = georef or Georef()
        self.has_nodata = valid is not None

    @classmethod
    def from_geoimage(cls, geo: GeoImage) -> ArrayRaster:
        return cls(geo.rgb, geo.valid, georef_of(geo))

    def read_rows(self, row: int, count: int) -> Rows:
        stop = min(row + count, self.height)
        valid = None if self.valid is None else self.valid[row:stop]
        return Rows(self.rgb[row:stop], valid)

    def read_window(self, row: int, col: int, height: int, width: int) -> Rows:
        """Rows ``[row, row + height)`` of columns ``[col, col + width)`` (clipped)."""
        rows, cols = slice(row, row + height), slice(col, col + width)
        valid = None if self.valid is None else self.valid[rows, cols]
        return Rows(self.rgb[rows, cols], valid)


class GdalRaster:
    """A raster GDAL reads, read window by window through rasterio.

    Use as a context manager (or call :meth:`close`). Band choice and scaling as in
    :func:`shared.geotiff.read_geotiff`; the per-band stretch is fixed at opening, from a
    decimated read of at most ``STATS_SAMPLES`` pixels per band, so every window is scaled
    alike.
    """

    def __init__(
        self,
        source: str | Path | bytes,
        *,
        bands: Sequence[int] | str | None = None,
        scale: str | Scale | None = "auto",
        max_pixels: int | None = None,
    ) -> None:
        self._stack = ExitStack()
        is_bytes = isinstance(source, bytes | bytearray | memoryview)
        self._what = "the TIFF" if is_bytes else str(source)
        chosen, self.scale = parse_bands(bands), parse_scale(scale)
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
            self.bands = choose_bands(self.src.count, chosen)
            self.dtype = self.src.dtypes[0]
            self.height, self.width = self.src.height, self.src.width
            gcps, gcps_crs = self.src.gcps
            self.georef = Georef(self.src.crs, self.src.transform, tuple(gcps), gcps_crs)
            self._check_valid = [
                MaskFlags.all_valid not in self.src.mask_flag_enums[b - 1]
                for b in dict.fromkeys(self.bands)
            ]
            self._float = np.dtype(self.dtype).kind == "f"
            self.has_nodata = any(self._check_valid) or self._float
            with _small_cache():
                self.stretch = self._stretch()
        except ImageError:
            self.close()
            raise
        except RasterioError as exc:
            self.close()
            raise CorruptImageError(f"cannot read {self._what}: {clean_error(exc)}") from None

    def __enter__(self) -> GdalRaster:
        return self

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
        window = Window(col, row, width, height)
        try:
            with _small_cache():
                return self._read(window)
        except MemoryError:
            raise ImageTooLargeError("the raster window cannot be read within memory") from None
        except RasterioError as exc:
            raise CorruptImageError(f"cannot read {self._what}: {clean_error(exc)}") from None

    def _read(self, window: Window) -> Rows:
        valid = self._valid(window)
        rgb = np.empty((int(window.height), int(window.width), 3), dtype=np.uint8)
        unique = list(dict.fromkeys(self.bands))
        values = self.src.read(unique, window=window)
        for i, band in enumerate(self.bands):
            plane = values[unique.index(band)]
            rgb[:, :, i] = to_uint8(plane, valid, self.stretch[i], self.scale, self.dtype)
        if valid is not None and valid.all():
            valid = None
        return Rows(rgb, valid)

    def _valid(self, window: Window | None, out_shape: tuple[int, int] | None = None) -> Any:
        valid: np.ndarray | None = None
        kw: dict[str, Any] = {"window": window}
        if out_shape is not None:
            kw = {"out_shape": out_shape, "resampling": Resampling.nearest}
        for band, check in zip(dict.fromkeys(self.bands), self._check_valid, strict=True):
            if check:
                band_valid = self.src.read_masks(band, **kw) > 0
                valid = band_valid if valid is None else valid & band_valid
        if self._float:
            for band in dict.fromkeys(self.bands):
                finite = np.isfinite(self.src.read(band, **kw))
                valid = finite if valid is None else valid & finite
        return valid

    def _stretch(self) -> tuple[tuple[float, float], ...]:
        """Per chosen band, the ``(low, high)`` mapped to 0..255."""
        if self.scale.kind == "range" or (self.scale.kind == "auto" and self.dtype == "uint8"):
            return tuple(band_range(np.empty(0), None, self.scale, self.dtype) for _ in self.bands)
        step = max(1, math.ceil(math.sqrt(self.height * self.width / STATS_SAMPLES)))
        shape = (math.ceil(self.height / step), math.ceil(self.width / step))
        full = shape == (self.height, self.width)
        valid = self._valid(None) if full else self._valid(None, out_shape=shape)
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


def open_raster(
    data: bytes,
    *,
    bands: Sequence[int] | str | None = None,
    scale: str | Scale | None = "auto",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> RasterSource:
    """An upload's bytes as a :class:`RasterSource`: TIFFs through :class:`GdalRaster` (plain
    palette/1-bit TIFFs through PIL, as :func:`shared.geotiff.decode_raster` does), PNG, JPEG,
    WebP and BMP through :func:`shared.imaging.decode_image`.

    Raises:
        ImageError: one of its subclasses.
    """
    chosen, how = parse_bands(bands), parse_scale(scale)
    if not is_tiff(data):
        return ArrayRaster(decode_image(data, max_pixels=max_pixels))
    if chosen is None and how.kind == "auto" and not is_geotiff(data):
        try:
            return ArrayRaster(decode_image(data, max_pixels=max_pixels))
        except (UnsupportedFormatError, CorruptImageError):
            pass
    return GdalRaster(data, bands=chosen, scale=how, max_pixels=max_pixels)


def open_file(
    path: str | Path,
    *,
    bands: Sequence[int] | str | None = None,
    scale: str | Scale | None = "auto",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> RasterSource:
    """A file as a :class:`RasterSource`. A TIFF (or other GDAL raster) is opened for windowed
    reads, without a pixel cap: it is never read whole. A PNG, JPEG, WebP or BMP, and a plain
    (not georeferenced) TIFF picture when no ``bands``/``scale`` are asked for, is decoded whole
    by :func:`shared.imaging.decode_image`, capped at ``max_pixels``.

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
            return GdalRaster(path, bands=chosen, scale=how)
    raster = GdalRaster(path, bands=chosen, scale=how)
    if chosen is None and how.kind == "auto" and not raster.georef.georeferenced:
        try:
            picture = ArrayRaster(decode_image(path.read_bytes(), max_pixels=max_pixels))
        except (UnsupportedFormatError, CorruptImageError):
            return raster
        raster.close()
        return picture
    return raster


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
