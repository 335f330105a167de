"""GeoTIFF in: satellite rasters to RGB for the model, with their georeferencing.

Reading (:func:`read_geotiff`) turns a TIFF of any band count and numeric type into the
``(H, W, 3)`` uint8 RGB the model takes, and keeps its georeferencing (CRS, geotransform, GCPs)
so that the writers (:mod:`shared.codec`) give the mask exactly the source's footprint. RGB is
bands 1, 2, 3 unless chosen (``bands``, 1-based as in GDAL, e.g. ``(4, 3, 2)`` for Sentinel-2);
a one- or two-band raster, or a single chosen band, is grey. ``scale`` (:func:`parse_scale`; the
docs/geotiff.md lists the choices) maps values to 0..255, clipped and linear; ``auto`` passes
uint8 through and stretches other types per band. Pixels that are nodata under
:func:`shared.bands.nodata_mask`'s rule are in :attr:`GeoImage.valid`, left out of the
statistics, and read as 0.

Errors are the :mod:`shared.imaging` classes, so every caller already maps them to HTTP codes:
the pixel cap is checked from the header, before any pixel is read.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from rasterio.control import GroundControlPoint
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.io import DatasetReader, MemoryFile
from rasterio.transform import Affine

from shared.imaging import (
    DEFAULT_MAX_PIXELS,
    CorruptImageError,
    DecodedSize,
    EmptyImageError,
    ImageError,
    ImageTooLargeError,
    UnsupportedFormatError,
    check_decoded_size,
    decode_image,
    image_size,
)

# Classic TIFF and BigTIFF, little and big endian.
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
DEFAULT_PERCENTILES = (2.0, 98.0)
# Statistics come from a regular grid of at most this many pixels per band: percentiles of a
# 14.6 MP band cost ~10x more and move by a fraction of a grey level.
STATS_SAMPLES = 1_000_000
# GDAL's own failure messages name the in-memory file (/vsimem/<uuid>/<uuid>.tif); drop it.
_VSIMEM_NAME = re.compile(r"(/vsimem/[^\s:']*|[0-9a-f]{8}-[0-9a-f-]{27}\.tif)[:']?\s*")


# Hyperspectral sensors have a few hundred bands (AVIRIS-NG 425); thousands are a header attack.
DEFAULT_MAX_BANDS = 512


class TooManyBandsError(ImageTooLargeError):
    """The raster has more bands than the cap; nothing was decoded."""

    code = "too_many_bands"


class UnsupportedDataTypeError(UnsupportedFormatError):
    """A sample type the model's input path does not take (complex, 64-bit integers)."""

    status = 422
    code = "unsupported_dtype"


class RasterOptionError(ImageError):
    """A ``bands`` or ``scale`` choice that is malformed or does not fit the file."""

    status = 422
    code = "invalid_raster_option"


@dataclass(frozen=True)
class Scale:
    """How raster values are mapped to 0..255; build it with :func:`parse_scale`.

    Attributes:
        kind: "auto", "percentile", "minmax" or "range".
        low, high: percentiles for "percentile" (and "auto" on non-uint8 data), the fixed value
            range for "range"; unused by "minmax".
    """

    kind: Literal["auto", "percentile", "minmax", "range"] = "auto"
    low: float = DEFAULT_PERCENTILES[0]
    high: float = DEFAULT_PERCENTILES[1]


@dataclass(frozen=True)
class GeoImage:
    """A raster read for the model, with what is needed to georeference its mask.

    Attributes:
        rgb: ``(H, W, 3)`` uint8.
        crs: coordinate reference system, or None when the file has none.
        transform: pixel -> CRS affine geotransform (identity when the file has none).
        gcps: ground control points, for files georeferenced by GCPs instead of a transform.
        gcps_crs: the CRS of ``gcps``.
        valid: ``(H, W)`` bool, False where the input is nodata (:mod:`shared.bands`' rule);
            None when every pixel is valid.
        bands: the 1-based source bands used for R, G, B.
        dtype: the source's data type, e.g. "uint16".
        stretch: the ``(low, high)`` value range mapped to 0..255 for each of R, G, B
            (``(0, 255)`` for uint8 passed through).
    """

    rgb: np.ndarray
    crs: CRS | None
    transform: Affine
    gcps: tuple[GroundControlPoint, ...] = ()
    gcps_crs: CRS | None = None
    valid: np.ndarray | None = None
    bands: tuple[int, int, int] = (1, 2, 3)
    dtype: str = "uint8"
    stretch: tuple[tuple[float, float], ...] = field(default=())

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def georeferenced(self) -> bool:
        """Whether the file placed its pixels on Earth (a CRS, a geotransform or GCPs)."""
        return self.crs is not None or self.transform != Affine.identity() or bool(self.gcps)


def is_tiff(data: bytes) -> bool:
    """Whether ``data`` starts like a TIFF (classic or BigTIFF); reads 4 bytes, never raises."""
    return bytes(data[:4]) in _TIFF_MAGIC


def is_geotiff(data: bytes) -> bool:
    """Whether ``data`` is a TIFF that carries georeferencing (a CRS, a geotransform or GCPs).

    Reads the header only; False for anything else, including unreadable bytes. Never raises.
    """
    if not is_tiff(data):
        return False
    try:
        with _opened(data) as src:
            return src.crs is not None or src.transform != Affine.identity() or bool(src.gcps[0])
    except (RasterioError, ImageError):
        return False


def parse_bands(text: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """``"4,3,2"`` (or a sequence of ints) -> ``(4, 3, 2)``; None or ``""`` -> None (default).

    One band (shown as grey) or three (R, G, B), each a 1-based band number.

    Raises:
        RasterOptionError: anything else.
    """
    if text is None:
        return None
    if isinstance(text, str):
        if not text.strip():
            return None
        try:
            bands = tuple(int(part) for part in text.split(","))
        except ValueError:
            raise RasterOptionError(
                f"bands must be 1 or 3 comma-separated band numbers such as 4,3,2; got {text!r}"
            ) from None
    else:
        bands = tuple(int(b) for b in text)
    if len(bands) not in (1, 3) or any(b < 1 for b in bands):
        raise RasterOptionError(
            f"bands must be 1 or 3 band numbers counted from 1, such as 4,3,2; got {bands}"
        )
    return bands


def parse_scale(text: str | Scale | None) -> Scale:
    """Parse a scale choice: ``auto``, ``minmax``, ``percentile:LOW,HIGH`` or ``LOW,HIGH``.

    Raises:
        RasterOptionError: a malformed choice, percentiles outside 0..100 or LOW >= HIGH.
    """
    if isinstance(text, Scale):
        return text
    spec = (text or "auto").strip().lower()
    if spec in ("auto", "minmax"):
        return Scale(kind=spec)  # type: ignore[arg-type]
    kind: Literal["percentile", "range"] = "range"
    numbers = spec
    if spec.startswith("percentile"):
        kind = "percentile"
        numbers = spec.removeprefix("percentile").lstrip(":")
        if not numbers:
            return Scale(kind="percentile")
    try:
        low, high = (float(part) for part in numbers.split(","))
    except ValueError:
        raise RasterOptionError(
            "scale must be auto, minmax, percentile:LOW,HIGH (e.g. percentile:2,98) or a value "
            f"range LOW,HIGH (e.g. 0,3000); got {text!r}"
        ) from None
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise RasterOptionError(f"scale needs finite LOW < HIGH; got {low:g},{high:g}")
    if kind == "percentile" and not (low >= 0.0 and high <= 100.0):
        raise RasterOptionError(f"percentiles must lie in 0..100; got {low:g},{high:g}")
    return Scale(kind=kind, low=low, high=high)


def raster_size(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decoded_bytes: int | None = None,
    max_bands: int | None = None,
) -> DecodedSize:
    """What decoding an upload takes, from its header alone, with every header check applied:
    pixel cap, band count, sample type and decoded bytes (all bands of a TIFF, as GDAL decodes
    whole pixel-interleaved blocks).

    Raises:
        ImageError: the subclass a decode would raise for this header; nothing is decoded.
    """
    if not is_tiff(data):
        size = image_size(data, max_pixels=max_pixels)
        check_decoded_size(size, max_decoded_bytes)
        return size
    with _reading_tiff(), _opened(data) as src:
        check_header(src, max_pixels, max_bands=max_bands, max_decoded_bytes=max_decoded_bytes)
        return _tiff_size(src)


def read_geotiff(
    data: bytes,
    *,
    bands: Sequence[int] | str | None = None,
    scale: str | Scale | None = "auto",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decoded_bytes: int | None = None,
    max_bands: int | None = None,
    nodata: str | float = "auto",
) -> GeoImage:
    """Read a (Geo)TIFF into RGB uint8 for the model, keeping its georeferencing.

    Args:
        data: the file's bytes.
        bands: 1-based bands for R, G, B (or one band for grey); see the module docstring for
            the defaults. A string such as ``"4,3,2"`` is parsed by :func:`parse_bands`.
        scale: how values become 0..255; see :func:`parse_scale`.
        max_pixels: cap on width x height, checked from the header before reading pixels.
        max_decoded_bytes: cap on width x height x bands x bytes per sample (None: none).
        max_bands: cap on the file's band count (None: none).
        nodata: the nodata rule (``auto``, ``none`` or a value; :mod:`shared.bands`).

    Returns:
        A :class:`GeoImage` whose ``rgb`` is ``(H, W, 3)`` uint8.

    Raises:
        EmptyImageError, CorruptImageError, UnsupportedFormatError, ImageTooLargeError,
        RasterOptionError: nothing else.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"expected bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise EmptyImageError("the image is empty (0 bytes)")
    if not is_tiff(data):
        raise UnsupportedFormatError("not a TIFF file; GeoTIFF input must be a TIFF")
    from shared.raster import GdalRaster  # the windowed reader; it imports this module

    if max_decoded_bytes is not None or max_bands is not None:
        raster_size(
            data, max_pixels=max_pixels, max_decoded_bytes=max_decoded_bytes, max_bands=max_bands
        )
    with _reading_tiff():
        try:
            with GdalRaster(
                data, bands=bands, scale=scale, max_pixels=max_pixels, nodata=nodata
            ) as raster:
                return raster.geo_image(raster.read_rows(0, raster.height))
        except MemoryError:
            raise ImageTooLargeError("the raster cannot be read within the memory limits") from None


def decode_raster(
    data: bytes,
    *,
    bands: Sequence[int] | str | None = None,
    scale: str | Scale | None = "auto",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decoded_bytes: int | None = None,
    max_bands: int | None = None,
    nodata: str | float = "auto",
) -> tuple[np.ndarray, GeoImage | None]:
    """Any upload to ``(H, W, 3)`` uint8 RGB: TIFFs through :func:`read_geotiff` (any band count
    and type, georeferencing kept), everything else through :func:`shared.imaging.decode_image`.

    ``bands`` and ``scale`` are validated whatever the format, and apply to TIFFs only.

    Returns:
        ``(rgb, geo)``; ``geo`` is None for non-TIFF input.

    Raises:
        ImageError: one of its subclasses (RasterOptionError for bad ``bands``/``scale``).
    """
    chosen, how = parse_bands(bands), parse_scale(scale)
    limits = {"max_pixels": max_pixels, "max_decoded_bytes": max_decoded_bytes}
    if not is_tiff(data):
        return decode_image(data, **limits), None
    if chosen is None and how.kind == "auto" and not is_geotiff(data):
        # A plain TIFF (a palette, 1-bit, CMYK or RGBA picture) reads as its colours through
        # PIL; rasterio would hand over raw palette indices. Only rasters PIL cannot read
        # (many bands, float samples) go on to rasterio.
        try:
            return decode_image(data, **limits), None
        except (UnsupportedFormatError, CorruptImageError):
            pass
    geo = read_geotiff(data, bands=chosen, scale=how, max_bands=max_bands, nodata=nodata, **limits)
    return geo.rgb, geo


def mask_invalid(mask: np.ndarray, geo: GeoImage | None, fill: int) -> np.ndarray:
    """``mask`` with ``fill`` (e.g. ``ignore_index``) where the input pixel was nodata.

    Returns ``mask`` itself when every pixel was valid, else a copy.
    """
    if geo is None or geo.valid is None:
        return mask
    out = mask.copy()
    out[~geo.valid] = fill
    return out


# -- internals ---------------------------------------------------------------------------------


@contextmanager
def _reading_tiff() -> Iterator[None]:
    """GDAL's failures to read a TIFF as CorruptImageError; image errors raised inside pass."""
    try:
        yield
    except ImageError:
        raise
    except (RasterioError, ValueError) as e:
        raise CorruptImageError(f"cannot read the TIFF: {clean_error(e)}") from None


@contextmanager
def _opened(data: bytes) -> Iterator[DatasetReader]:
    """Open TIFF bytes with GDAL's TIFF driver only (never another of GDAL's 200 formats),
    without its warning about rasters that carry no georeferencing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with MemoryFile(bytes(data)) as memfile, memfile.open(driver="GTiff") as src:
            yield src


def check_header(
    src: DatasetReader,
    max_pixels: int | None,
    *,
    max_bands: int | None = None,
    max_decoded_bytes: int | None = None,
) -> None:
    """Refuse empty and over-sized rasters (``max_pixels``, ``max_bands``, ``max_decoded_bytes``;
    None for no cap), and sample types the model's input path does not take."""
    width, height = src.width, src.height
    if width <= 0 or height <= 0 or src.count < 1:
        raise CorruptImageError(f"the header claims an empty raster ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            f"image too large: {width}x{height} = {width * height:,} pixels; "
            f"the limit is {max_pixels:,} pixels"
        )
    if max_bands is not None and src.count > max_bands:
        raise TooManyBandsError(
            f"the raster has {src.count:,} bands; the limit is {max_bands:,} bands"
        )
    if any(np.dtype(t).kind == "c" for t in src.dtypes):
        raise UnsupportedDataTypeError(
            f"complex-valued rasters are not supported ({src.dtypes[0]}); send real-valued "
            "bands (e.g. the amplitude)"
        )
    if any(np.dtype(t).kind in "iu" and np.dtype(t).itemsize == 8 for t in src.dtypes):
        raise UnsupportedDataTypeError(
            f"64-bit integer rasters are not supported ({src.dtypes[0]}); send 8-, 16- or "
            "32-bit integers or floats"
        )
    check_decoded_size(_tiff_size(src), max_decoded_bytes)


def _tiff_size(src: DatasetReader) -> DecodedSize:
    """Every band of the file, at its widest sample type."""
    widest = max((np.dtype(t) for t in src.dtypes), key=lambda d: d.itemsize)
    return DecodedSize(src.width, src.height, src.count, widest.itemsize, widest.name)


def choose_bands(count: int, chosen: tuple[int, ...] | None) -> tuple[int, int, int]:
    if chosen is None:
        chosen = (1, 2, 3) if count >= 3 else (1,)
    missing = [b for b in chosen if b > count]
    if missing:
        raise RasterOptionError(
            f"band {missing[0]} asked for but the file has {count} band{'s' * (count != 1)}"
        )
    return (chosen[0],) * 3 if len(chosen) == 1 else (chosen[0], chosen[1], chosen[2])


def band_range(
    values: np.ndarray, valid: np.ndarray | None, how: Scale, dtype: str
) -> tuple[float, float]:
    """The ``(low, high)`` mapped to 0..255 for one band, from a sample of its values."""
    if how.kind == "range":
        return how.low, how.high
    if how.kind == "auto" and dtype == "uint8":
        return 0.0, 255.0
    step = max(1, math.ceil(math.sqrt(values.size / STATS_SAMPLES)))
    sample = values[::step, ::step]
    if valid is not None:
        sample = sample[valid[::step, ::step]]
    sample = sample.ravel()
    if sample.size == 0:
        return 0.0, 0.0
    if how.kind == "minmax":
        return float(sample.min()), float(sample.max())
    low, high = np.percentile(sample, (how.low, how.high))
    return float(low), float(high)


def to_uint8(
    values: np.ndarray,
    valid: np.ndarray | None,
    low_high: tuple[float, float],
    how: Scale,
    dtype: str,
) -> np.ndarray:
    if how.kind == "auto" and dtype == "uint8":
        out = values.copy()
    else:
        low, high = low_high
        if high > low:
            scaled = (values.astype(np.float32) - np.float32(low)) * np.float32(
                255.0 / (high - low)
            )
            np.clip(scaled, 0.0, 255.0, out=scaled)
            if values.dtype.kind == "f":
                np.nan_to_num(scaled, copy=False, nan=0.0)  # NaN pixels are invalid anyway
            out = np.rint(scaled).astype(np.uint8)
        else:
            # A constant band (or no valid pixel): nothing to stretch.
            out = np.zeros(values.shape, dtype=np.uint8)
    if valid is not None:
        out[~valid] = 0
    return out


def clean_error(exc: BaseException) -> str:
    # rasterio raises "Read failed. See previous exception" with GDAL's reason as the cause.
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    message = cause.args[-1] if cause.args else str(cause)
    return _VSIMEM_NAME.sub("", str(message)).strip(" ,") or type(exc).__name__
