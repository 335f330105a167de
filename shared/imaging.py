"""Bytes -> arrays: the one place where untrusted image files are decoded.

Every failure becomes an :class:`ImageError` subclass carrying an HTTP status and a short code, so
callers never see a bare PIL exception. Two limits protect the process:

* an allow-list of formats (PIL can parse dozens; we only need five), and
* a pixel cap checked from the header, before any pixel buffer exists, so a small file that
  claims 30000x30000 pixels (a decompression bomb) costs nothing;
* optionally a cap on the decoded bytes (width x height x bands x bytes per sample), also from
  the header: pixels alone do not say what decoding costs (a 62 MP float64 4-band raster
  decodes to 2 GB).

Decoding is split into :func:`_open` (header, format and size checks) and the per-mode
conversions, so other decoders (e.g. multi-band GeoTIFF) can reuse the same checks and errors.
"""

from __future__ import annotations

import copy
import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageMode, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000  # 5400x2700 scenes are 14.6 MP
# Decoded bytes of one upload: the default pixel cap in 8-bit RGB (192 MB) fits, with room for
# a 4-band 16-bit scene of 33 MP; a 62 MP float64 4-band raster (2 GB) does not.
DEFAULT_MAX_DECODED_BYTES = 256 * 1024 * 1024
ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "TIFF", "WEBP", "BMP"})

# PIL reports multi-picture JPEGs (what many cameras write) as "MPO"; they are JPEGs.
_FORMAT_ALIASES = {"MPO": "JPEG"}
# Modes PIL converts to RGB correctly by itself (CMYK via its naive inverse; alpha dropped).
_PIL_TO_RGB_MODES = frozenset(
    {"1", "L", "LA", "La", "P", "PA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
)
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
# Everything that can go wrong inside PIL while parsing or decoding a hostile file.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    TypeError,
    KeyError,
    struct.error,
    zlib.error,
    # PIL warns about broken tags and chunks; where warnings are errors they must not escape.
    Warning,
)


class ImageError(ValueError):
    """Base of every decoding error; ``status`` is the HTTP status a service should answer."""

    status: int = 400
    code: str = "image_error"


class EmptyImageError(ImageError):
    """Zero bytes were given."""

    status = 400
    code = "empty_image"


class CorruptImageError(ImageError):
    """Not a decodable image: truncated, random bytes, text, broken header."""

    status = 400
    code = "corrupt_image"


class UnsupportedFormatError(ImageError):
    """A real image in a format (or pixel mode) outside the allow-list."""

    status = 415
    code = "unsupported_format"


class ImageTooLargeError(ImageError):
    """The header claims more pixels than the cap; nothing was decoded."""

    status = 413
    code = "image_too_large"


class DecodedTooLargeError(ImageTooLargeError):
    """Decoding would take more bytes than the cap (pixels x bands x bytes per sample)."""

    code = "decoded_too_large"


@dataclass(frozen=True)
class DecodedSize:
    """What decoding an image takes, from its header: ``width x height x bands`` samples of
    ``sample_bytes`` each (``dtype`` names the sample type)."""

    width: int
    height: int
    bands: int
    sample_bytes: int
    dtype: str

    @property
    def nbytes(self) -> int:
        return self.width * self.height * self.bands * self.sample_bytes


def check_decoded_size(size: DecodedSize, max_decoded_bytes: int | None) -> None:
    """Raise :class:`DecodedTooLargeError`, naming the numbers, when ``size`` is over the cap
    (None: no cap)."""
    if max_decoded_bytes is not None and size.nbytes > max_decoded_bytes:
        raise DecodedTooLargeError(
            f"decoding needs {size.width}x{size.height} pixels x {size.bands} "
            f"band{'s' * (size.bands != 1)} x {size.sample_bytes} bytes ({size.dtype}) = "
            f"{size.nbytes:,} bytes; the limit is {max_decoded_bytes:,} bytes"
        )


def image_size(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedSize:
    """The :class:`DecodedSize` of a PNG/JPEG/TIFF/WebP/BMP from its header (no pixel decoded).

    Raises:
        ImageError: as :func:`decode_image` would for the header.
    """
    with _open(data, max_pixels) as im:
        return _decoded_size(im)


def decode_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_decoded_bytes: int | None = None
) -> np.ndarray:
    """Decode an image file to RGB.

    L, LA, P, RGBA (alpha dropped), CMYK and YCbCr go through PIL's conversion; 16-bit grey is
    scaled to 8 bits over its full range (``round(v / 257)``, never clipped); 16-bit RGB is
    reduced by PIL to its high byte.

    ``max_decoded_bytes`` (None: no cap) bounds width x height x bands x bytes per sample of the
    file's own pixel mode, checked from the header.

    Returns:
        ``(H, W, 3)`` uint8, C-contiguous and writable.

    Raises:
        ImageError: one of its subclasses; nothing else.
    """
    with _open(data, max_pixels, max_decoded_bytes) as im:
        return _decoded(im, _to_rgb)


def decode_mask(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_decoded_bytes: int | None = None
) -> np.ndarray:
    """Decode a ground-truth mask without changing its values; feed it to ``LabelMap.to_index``.

    Returns:
        ``(H, W)`` integers for single-channel masks (uint8 for L and 1-bit, palette *indices*
        for P, uint16 for 16-bit, int32 for I), or ``(H, W, 3)`` uint8 for RGB/RGBA colour masks
        (alpha dropped).

    Raises:
        ImageError: one of its subclasses; nothing else.
    """
    with _open(data, max_pixels, max_decoded_bytes) as im:
        return _decoded(im, _mask_array)


def read_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """:func:`decode_image` on a file. Decoding errors name the path; a missing or unreadable
    file raises the usual ``OSError`` (which names it too)."""
    return _read(path, decode_image, max_pixels)


def read_mask(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """:func:`decode_mask` on a file; errors as in :func:`read_image`."""
    return _read(path, decode_mask, max_pixels)


def encode_png(array: np.ndarray, palette: list[int] | None = None) -> bytes:
    """Encode an array as PNG.

    Args:
        array: ``(H, W)`` uint8 (or bool) -> mode ``P`` when ``palette`` is given, else ``L``;
            ``(H, W, 3)`` uint8 -> ``RGB``.
        palette: up to 768 ints (``LabelMap.palette()``), only for ``(H, W)`` arrays.
    """
    array = np.asarray(array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if array.dtype != np.uint8:
        raise ValueError(f"encode_png needs uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 3:
        if palette is not None:
            raise ValueError("a palette only applies to (H, W) index arrays")
        im = Image.fromarray(np.ascontiguousarray(array), mode="RGB")
    elif array.ndim == 2:
        im = Image.fromarray(np.ascontiguousarray(array), mode="L")
        if palette is not None:
            if len(palette) > 768 or len(palette) % 3 or not all(0 <= v <= 255 for v in palette):
                raise ValueError("palette must be at most 768 ints in 0..255, a multiple of 3")
            # putpalette turns an L image into P without touching the indices (convert("P")
            # would quantise them).
            im.putpalette(list(palette) + [0] * (768 - len(palette)))
    else:
        raise ValueError(f"encode_png needs (H, W) or (H, W, 3), got shape {array.shape}")
    buffer = io.BytesIO()
    im.save(buffer, format="PNG")
    return buffer.getvalue()


# -- internals ---------------------------------------------------------------------------------


def _open(data: bytes, max_pixels: int, max_decoded_bytes: int | None = None) -> Image.Image:
    """Parse the header only, enforce the allow-list, the pixel cap and the decoded-bytes cap,
    return the lazy image."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"expected bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise EmptyImageError("the image is empty (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data), formats=sorted(ALLOWED_FORMATS))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # PIL's own guard (a process-wide limit, by default above ours) fired from the header;
        # report it in our terms. The warning only arrives as an exception when warnings are
        # turned into errors.
        pil_limit = Image.MAX_IMAGE_PIXELS or max_pixels
        raise _too_large(_header_size(data), min(max_pixels, pil_limit)) from None
    except UnidentifiedImageError:
        raise _unidentified(data) from None
    except _DECODE_ERRORS as e:
        raise CorruptImageError(f"cannot parse the image header: {e}") from None

    fmt = _FORMAT_ALIASES.get(im.format or "", im.format)
    if fmt not in ALLOWED_FORMATS:  # defensive: `formats=` above should already ensure this
        im.close()
        raise _unsupported(im.format)
    width, height = im.size
    if width <= 0 or height <= 0:
        im.close()
        raise CorruptImageError(f"the header claims an empty image ({width}x{height})")
    if width * height > max_pixels:
        im.close()
        raise _too_large((width, height), max_pixels)
    try:
        check_decoded_size(_decoded_size(im), max_decoded_bytes)
    except ImageError:
        im.close()
        raise
    return im


def _decoded_size(im: Image.Image) -> DecodedSize:
    """Bands and bytes per sample of PIL's buffer for this mode (``I;16`` 2 bytes, ``F`` 4)."""
    mode = ImageMode.getmode(im.mode)
    sample = np.dtype(mode.typestr)
    width, height = im.size
    return DecodedSize(width, height, len(mode.bands), sample.itemsize, sample.name)


def _decoded(im: Image.Image, convert: Callable[[Image.Image], np.ndarray]) -> np.ndarray:
    """Decode the pixels and convert them, turning any PIL failure into a typed error."""
    try:
        im.load()
        return convert(im)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError) as e:
        raise ImageTooLargeError(f"the image cannot be decoded within the limits: {e}") from None
    except _DECODE_ERRORS as e:
        raise CorruptImageError(f"cannot decode the {im.format} image: {e}") from None


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode == "RGB":
        return np.array(im)
    if im.mode in _SIXTEEN_BIT_MODES:
        grey = _sixteen_to_eight(np.asarray(im))
        return np.repeat(grey[:, :, None], 3, axis=2)
    if im.mode in _PIL_TO_RGB_MODES:
        return np.array(im.convert("RGB"))
    raise UnsupportedFormatError(
        f"{im.format} images with pixel mode {im.mode!r} are not supported; "
        "use 8- or 16-bit greyscale, RGB, RGBA, palette or CMYK"
    )


def _mask_array(im: Image.Image) -> np.ndarray:
    if im.mode in {"L", "P"}:
        return np.array(im)
    if im.mode == "1":
        return np.array(im).astype(np.uint8)  # bool -> 0/1, not PIL's 0/255
    if im.mode in {"LA", "La"}:
        return np.array(im.getchannel(0))
    if im.mode == "PA":
        return np.array(im)[:, :, 0]
    if im.mode in _SIXTEEN_BIT_MODES:
        values = np.array(im)
        return values.astype(np.uint16) if im.mode != "I" else values.astype(np.int32)
    if im.mode == "RGB":
        return np.array(im)
    if im.mode in {"RGBA", "RGBa", "RGBX"}:
        return np.array(im)[:, :, :3].copy()
    raise UnsupportedFormatError(
        f"{im.format} masks with pixel mode {im.mode!r} are not supported; "
        "use a single-channel index image (L, P, 16-bit) or an RGB colour image"
    )


def _sixteen_to_eight(values: np.ndarray) -> np.ndarray:
    """Full-range 16 -> 8 bit: 0 -> 0, 65535 -> 255, rounding to nearest (v / 257)."""
    v = np.clip(values.astype(np.int64), 0, 65535)  # mode "I" is int32; keep the 16-bit range
    return ((v * 255 + 32767) // 65535).astype(np.uint8)


def _unidentified(data: bytes) -> ImageError:
    """Tell a real image in a refused format from bytes that are no image at all."""
    try:
        with Image.open(io.BytesIO(data)) as other:
            return _unsupported(other.format)
    except Exception:  # noqa: BLE001 - anything PIL raises here only means "not an image"
        head = bytes(data[:16])
        return CorruptImageError(
            f"not a recognised image ({len(data)} bytes starting with {head!r}); "
            f"expected one of {', '.join(sorted(ALLOWED_FORMATS))}"
        )


def _unsupported(fmt: str | None) -> UnsupportedFormatError:
    return UnsupportedFormatError(
        f"image format {fmt or 'unknown'} is not supported; "
        f"allowed formats: {', '.join(sorted(ALLOWED_FORMATS))}"
    )


def _too_large(size: tuple[int, int] | None, max_pixels: int) -> ImageTooLargeError:
    if size is None:
        claim = "its header claims more pixels than the decoder allows"
    else:
        claim = f"{size[0]}x{size[1]} = {size[0] * size[1]:,} pixels"
    return ImageTooLargeError(f"image too large: {claim}; the limit is {max_pixels:,} pixels")


def _header_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from the header alone, bypassing PIL's global bomb check (used only to
    word the error once that check has fired)."""
    prefix = bytes(data[:16])
    for fmt in sorted(ALLOWED_FORMATS):
        try:
            factory, accept = Image.OPEN[fmt]
            if accept is not None and not accept(prefix):
                continue
            im = factory(io.BytesIO(data), "")
            return im.size
        except Exception:  # noqa: BLE001, S112 - this format's parser rejects it; try the next
            continue
    return None


def _read(path: str | Path, decode: Callable[..., np.ndarray], max_pixels: int) -> np.ndarray:
    path = Path(path)
    data = path.read_bytes()
    try:
        return decode(data, max_pixels=max_pixels)
    except ImageError as e:
        # Same type and code, message prefixed with the file that caused it.
        err = copy.copy(e)
        err.args = (f"{path}: {e}",)
        raise err from e
