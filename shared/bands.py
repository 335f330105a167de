"""Which bands a model reads, in which order, and which pixels are nodata.

A :class:`BandSpec` travels from the dataset config (``data.bands``, ``data.nodata``) into the
checkpoint and from there to every reader of a scene, so nothing downstream guesses band order,
dtype or the nodata rule. It holds only plain values and round-trips through
:meth:`BandSpec.to_dict` for ``torch.load(weights_only=True)`` checkpoints.

:func:`nodata_mask` is the one nodata rule (``auto``, ``none`` or a value; docs/geotiff.md's "Bands
and nodata" says what each marks): the windowed reader (:mod:`shared.raster`), dataset reading
and statistics all call it. ``auto``'s zero collar is a property of the whole scene, so a reader
of windows traces it once per scene (:func:`trace_collar`) and hands each window its part
(:meth:`Collar.window`): a zero area in the middle of a window is collar only if it reaches the
scene's edge, wherever the window lies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.io import DatasetReader
from rasterio.windows import Window
from scipy import ndimage

# The dtypes a dataset or an upload may carry; others are refused with their name.
SUPPORTED_DTYPES = ("uint8", "uint16", "int16", "float32")
NODATA_AUTO = "auto"
NODATA_NONE = "none"
NodataRule = str | float  # "auto", "none" or a value
RGB_NAMES = ("red", "green", "blue")
# The collar is traced at full resolution for scenes up to this many pixels (a bool and an int32
# label per pixel: 80 MB), on a decimated overview of the scene above it.
COLLAR_MAX_PIXELS = 16_000_000
# Colour interpretations that name a band when the file gives no description.
_NAMED_COLORINTERP = frozenset({"red", "green", "blue", "gray", "alpha", "undefined"})


class BandError(ValueError):
    """A band selection or nodata rule that does not fit the raster; the message names the band."""


@dataclass(frozen=True)
class Band:
    """One input band: its name (description, colour or ``band_N``) and 1-based source index."""

    name: str
    index: int


@dataclass(frozen=True)
class BandSpec:
    """The ordered input bands of a model, their dtype and the nodata rule."""

    bands: tuple[Band, ...]
    dtype: str = "uint8"
    nodata: NodataRule = NODATA_AUTO

    def __post_init__(self) -> None:
        if not self.bands:
            raise BandError("a band spec needs at least one band")
        indexes = [b.index for b in self.bands]
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 1 for i in indexes):
            raise BandError(f"band indices are counted from 1, got {indexes}")
        if len(set(indexes)) != len(indexes):
            raise BandError(f"a band is selected twice: indices {indexes}")
        if self.dtype not in SUPPORTED_DTYPES:
            raise BandError(
                f"band dtype {self.dtype!r} is not supported (supported: "
                f"{', '.join(SUPPORTED_DTYPES)})"
            )
        object.__setattr__(self, "nodata", parse_nodata(self.nodata))

    @property
    def count(self) -> int:
        return len(self.bands)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.bands)

    @property
    def indexes(self) -> tuple[int, ...]:
        """1-based source indices, in model order (what ``src.read(indexes)`` takes)."""
        return tuple(b.index for b in self.bands)

    def reads_pictures(self) -> bool:
        """True for three 8-bit bands: the model takes pictures (PNG, JPEG...) as RGB; other
        band lists need a raster with their bands, read as values."""
        return self.count == 3 and self.dtype == "uint8"

    def is_rgb8(self) -> bool:
        """True for 8-bit red, green, blue in that order: the ImageNet-normalised case."""
        return self.dtype == "uint8" and tuple(n.lower() for n in self.names) == RGB_NAMES

    def to_dict(self) -> dict[str, Any]:
        """Plain values only, safe in a ``weights_only`` checkpoint and in JSON."""
        return {
            "bands": [{"name": b.name, "index": b.index} for b in self.bands],
            "dtype": self.dtype,
            "nodata": self.nodata,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BandSpec:
        """Inverse of :meth:`to_dict`.

        Raises:
            BandError: a missing or malformed key, named in the message.
        """
        if not isinstance(data, Mapping) or not isinstance(data.get("bands"), list | tuple):
            raise BandError(f"band spec must be a mapping with a 'bands' list, got {data!r}")
        bands = []
        for i, item in enumerate(data["bands"]):
            if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
                raise BandError(f"band spec bands[{i}] must be {{'name': str, 'index': int}}")
            bands.append(Band(name=item["name"], index=item.get("index")))  # type: ignore[arg-type]
        return cls(
            bands=tuple(bands),
            dtype=data.get("dtype", "uint8"),
            nodata=data.get("nodata", NODATA_AUTO),
        )

    @classmethod
    def rgb(cls, nodata: NodataRule = NODATA_AUTO) -> BandSpec:
        """8-bit red, green, blue from bands 1, 2, 3: what every checkpoint without bands holds."""
        return cls(tuple(Band(n, i) for i, n in enumerate(RGB_NAMES, start=1)), "uint8", nodata)


def parse_nodata(value: Any) -> NodataRule:
    """``"auto"``, ``"none"``, a number or its text -> the rule (a float for a value).

    Raises:
        BandError: anything else (the message quotes it).
    """
    if isinstance(value, str):
        text = value.strip().lower()
        if text in (NODATA_AUTO, NODATA_NONE):
            return text
        try:
            value = float(text)
        except ValueError:
            raise BandError(f"nodata must be 'auto', 'none' or a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BandError(f"nodata must be 'auto', 'none' or a number, got {value!r}")
    return float(value)


def parse_band_list(text: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """``"1,2,3,4"`` (or a sequence of ints) -> ``(1, 2, 3, 4)``: 1-based band numbers in model
    order, any count; None or ``""`` -> None.

    Raises:
        BandError: anything else (the message quotes it).
    """
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    try:
        parts = text.split(",") if isinstance(text, str) else list(text)
        bands = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise BandError(
            f"bands must be comma-separated band numbers such as 4,3,2; got {text!r}"
        ) from None
    if any(b < 1 for b in bands):
        raise BandError(f"band numbers are counted from 1; got {bands}")
    return bands


def model_band_indexes(
    spec: BandSpec, count: int, chosen: Sequence[int] | None = None
) -> tuple[int, ...]:
    """Which bands of a raster of ``count`` bands feed a model reading ``spec``.

    ``chosen`` (``bands=``) gives them in model order. Without it, a raster of exactly
    ``spec.count`` bands holds the model's bands in order; a larger one (a full product, like
    the training files) gives them at the spec's source indices.

    Raises:
        BandError: another number of bands; the message names the bands expected and received.
    """
    expected = f"{spec.count} bands ({', '.join(spec.names)}, {spec.dtype})"
    if chosen is not None:
        if len(chosen) != spec.count:
            raise BandError(
                f"the model reads {expected}; bands= lists {len(chosen)}: "
                f"{','.join(map(str, chosen))}"
            )
        missing = [b for b in chosen if b > count]
        if missing:
            raise BandError(
                f"band {missing[0]} asked for but the raster has {count} band"
                f"{'s' * (count != 1)}; the model reads {expected}"
            )
        return tuple(chosen)
    if count == spec.count:
        return tuple(range(1, count + 1))
    if count > spec.count and max(spec.indexes) <= count:
        return spec.indexes
    raise BandError(
        f"the model reads {expected}; the image has {count} band{'s' * (count != 1)}. "
        "Send a GeoTIFF with the model's bands, or choose them with bands="
    )


def band_names(
    descriptions: Sequence[str | None], colorinterp: Sequence[str | None] | None = None
) -> tuple[str, ...]:
    """The name of each band of a raster: its description, else its colour, else ``band_N``.

    ``colorinterp`` holds rasterio's ``ColorInterp`` names (``"red"``, ``"alpha"``...); a plain
    RGB GeoTIFF or JPEG has no descriptions but red, green and blue colour interpretations.
    """
    names = []
    for i, description in enumerate(descriptions, start=1):
        colour = (colorinterp[i - 1] or "") if colorinterp and i <= len(colorinterp) else ""
        if description and description.strip():
            names.append(description.strip())
        elif colour.lower() in _NAMED_COLORINTERP - {"undefined", "gray"}:
            names.append(colour.lower())
        else:
            names.append(f"band_{i}")
    return tuple(names)


def resolve_bands(
    selection: Sequence[int | str] | None,
    descriptions: Sequence[str | None],
    *,
    dtype: str,
    nodata: Any = NODATA_AUTO,
    colorinterp: Sequence[str | None] | None = None,
) -> BandSpec:
    """Resolve ``data.bands`` against a raster's bands.

    Args:
        selection: 1-based band indices and/or band names (case-insensitive match against
            :func:`band_names`), in model order; None selects every band except alpha bands.
        descriptions: the raster's band descriptions (``src.descriptions``), one per band.
        dtype: the raster's dtype name.
        nodata: the nodata rule (:func:`nodata_mask`).
        colorinterp: the raster's colour interpretation names, one per band.

    Raises:
        BandError: an index out of range, a name no band has (or more than one has), a band
            chosen twice, an empty selection or an unsupported dtype; the message names the
            band and lists the raster's bands.
    """
    names = band_names(descriptions, colorinterp)
    available = ", ".join(f"{i}={n}" for i, n in enumerate(names, start=1)) or "none"
    if selection is None:
        chosen = [i for i, n in enumerate(names, start=1) if n != "alpha"]
    else:
        if isinstance(selection, str | bytes) or not isinstance(selection, Sequence):
            raise BandError(f"bands must be a list of band numbers or names, got {selection!r}")
        if not selection:
            raise BandError(f"bands is empty; the raster has bands {available}")
        chosen = [_band_index(item, names, available) for item in selection]
    duplicated = sorted({names[i - 1] for i in chosen if chosen.count(i) > 1})
    if duplicated:
        raise BandError(f"band {', '.join(duplicated)} is selected more than once")
    if not chosen:
        raise BandError(f"the raster has no data bands (bands: {available})")
    return BandSpec(tuple(Band(names[i - 1], i) for i in chosen), dtype=str(dtype), nodata=nodata)


def _band_index(item: int | str, names: Sequence[str], available: str) -> int:
    if isinstance(item, bool):
        raise BandError(f"band {item!r} is neither a band number nor a band name")
    if isinstance(item, int):
        if not 1 <= item <= len(names):
            raise BandError(
                f"band {item} does not exist: the raster has {len(names)} band(s) "
                f"({available}); band numbers count from 1"
            )
        return item
    if isinstance(item, str):
        wanted = item.strip().lower()
        if wanted.isdigit():
            return _band_index(int(wanted), names, available)
        matches = [i for i, n in enumerate(names, start=1) if n.lower() == wanted]
        if not matches:
            raise BandError(f"no band is named {item!r}; the raster has bands {available}")
        if len(matches) > 1:
            raise BandError(
                f"band name {item!r} is ambiguous: bands {matches} carry it; select by number"
            )
        return matches[0]
    raise BandError(f"band {item!r} is neither a band number nor a band name")


def nodata_mask(
    data: np.ndarray,
    rule: NodataRule = NODATA_AUTO,
    *,
    nodata_value: float | None = None,
    alpha: np.ndarray | None = None,
    internal_mask: np.ndarray | None = None,
    scene_edges: tuple[bool, bool, bool, bool] = (True, True, True, True),
    collar: np.ndarray | None = None,
) -> np.ndarray:
    """``(H, W)`` bool, True where a pixel of ``data`` is nodata under ``rule``.

    Args:
        data: ``(C, H, W)`` band values, as read (before any scaling).
        rule: ``"auto"``: the raster's nodata tag, alpha band and internal mask, plus the
            pixels zero in every band and connected (4-neighbourhood) to the scene's edge, the
            untagged fill collar of many products; ``"none"``: every finite pixel is valid;
            a value: the pixels holding it in every band, in place of the tag (alpha and mask
            still apply). NaN and inf in any band are nodata under every rule.
        nodata_value: the raster's nodata tag (``src.nodata``), None when untagged.
        alpha: ``(H, W)`` alpha band, 0 where transparent (nodata).
        internal_mask: ``(H, W)`` GDAL per-dataset mask (``src.dataset_mask()`` of a file with
            an internal mask), 0 where nodata.
        scene_edges: which sides of ``data`` (top, bottom, left, right) are the scene's edges.
            A window inside a larger scene passes False for the sides that are not, so zeros
            there are not taken for the collar. The collar is traced within ``data`` only: a
            reader of windows must give each window the scene's collar, not this call's.
        collar: ``(H, W)`` bool, the window's part of the scene's collar
            (:meth:`Collar.window`); with it, ``auto`` marks the all-zero pixels inside it
            instead of tracing the collar within ``data`` (``scene_edges`` is then unused).
    """
    data = np.asarray(data)
    if data.ndim != 3:
        raise ValueError(f"data must be (C, H, W), got shape {data.shape}")
    rule = parse_nodata(rule)
    mask = np.zeros(data.shape[1:], dtype=bool)
    if data.dtype.kind == "f":
        mask |= ~np.isfinite(data).all(axis=0)
    if rule == NODATA_NONE:
        return mask
    for valid in (alpha, internal_mask):
        if valid is not None:
            valid = np.asarray(valid)
            if valid.shape != mask.shape:
                raise ValueError(f"mask shape {valid.shape} does not match data {mask.shape}")
            mask |= valid == 0
    value = nodata_value if rule == NODATA_AUTO else rule
    if value is not None and not (isinstance(value, float) and math.isnan(value)):
        mask |= (data == value).all(axis=0)
    if rule == NODATA_AUTO:
        zero = np.logical_not(data.any(axis=0))
        if collar is not None:
            if collar.shape != mask.shape:
                raise ValueError(f"collar shape {collar.shape} does not match data {mask.shape}")
            mask |= zero & collar
        else:
            mask |= edge_connected(zero, scene_edges)
    return mask


@dataclass(frozen=True)
class Collar:
    """A scene's edge-connected all-zero region, traced once on a grid of ``step`` pixel cells.

    With ``step`` 1 (scenes up to :data:`COLLAR_MAX_PIXELS`) ``cells`` is the collar itself and
    every window gets exactly the whole-scene rule. Above that the collar is traced on a
    nearest-neighbour overview and grown by one cell; a window's zero pixels inside those cells
    are collar. The limit of that approximation: a zero area narrower than a cell that reaches
    the edge only through the overview's gaps can be missed, and zeros inside the scene within
    one cell of the collar count as collar.

    Attributes:
        cells: ``(h, w)`` bool over the overview grid, True where the collar may lie.
        height, width: the scene's size in pixels.
    """

    cells: np.ndarray
    height: int
    width: int

    def window(self, row: int, col: int, height: int, width: int) -> np.ndarray:
        """``(height, width)`` bool: the cells of the collar over pixels ``[row, row + height)``
        x ``[col, col + width)``."""
        ch, cw = self.cells.shape
        rows = (np.arange(row, row + height) * ch) // self.height
        cols = (np.arange(col, col + width) * cw) // self.width
        return self.cells[np.ix_(rows, cols)]

    def any(self) -> bool:
        return bool(self.cells.any())


def trace_collar(
    src: DatasetReader, indexes: Sequence[int], *, max_pixels: int | None = None
) -> Collar:
    """The collar of an open raster's bands ``indexes``: pixels zero in every one of them and
    4-connected to the scene's edge, read one band at a time (memory: a few bytes per overview
    pixel, whatever the band count); the overview has at most ``max_pixels`` pixels (default
    :data:`COLLAR_MAX_PIXELS`)."""
    height, width = src.height, src.width
    max_pixels = max_pixels or COLLAR_MAX_PIXELS
    step = max(1, math.ceil(math.sqrt(height * width / max_pixels)))
    shape = (math.ceil(height / step), math.ceil(width / step))
    zero = np.ones(shape, dtype=bool)
    for index in dict.fromkeys(indexes):
        if step == 1:
            band = src.read(index)
        else:
            band = src.read(index, out_shape=shape, resampling=Resampling.nearest)
        zero &= band == 0
        if not zero.any():
            break
    cells = edge_connected(zero)
    if step > 1 and cells.any():
        cells = ndimage.binary_dilation(cells)
    return Collar(cells, height, width)


def edge_connected(
    candidates: np.ndarray, scene_edges: tuple[bool, bool, bool, bool] = (True, True, True, True)
) -> np.ndarray:
    """The ``candidates`` pixels (``(H, W)`` bool) 4-connected to the named edges of the array."""
    candidates = np.asarray(candidates, dtype=bool)
    if not candidates.any():
        return np.zeros_like(candidates)
    labels, _ = ndimage.label(candidates)
    top, bottom, left, right = scene_edges
    border = [
        side
        for side, on in (
            (labels[0, :], top),
            (labels[-1, :], bottom),
            (labels[:, 0], left),
            (labels[:, -1], right),
        )
        if on
    ]
    if not border:
        return np.zeros_like(candidates)
    touching = np.unique(np.concatenate(border))
    touching = touching[touching != 0]
    return np.isin(labels, touching)


def raster_nodata_inputs(
    src: DatasetReader, window: Window | None = None, out_shape: tuple[int, int] | None = None
) -> dict[str, Any]:
    """What marks nodata in an open rasterio dataset, as keyword arguments of
    :func:`nodata_mask`: its nodata tag, its alpha band and its internal (per-dataset) mask;
    ``out_shape`` reads the masks decimated (nearest), as for an overview of the scene.
    """
    kw: dict[str, Any] = {"window": window}
    if out_shape is not None:
        kw = {"window": window, "out_shape": out_shape, "resampling": Resampling.nearest}
    alpha_bands = [i for i, c in enumerate(src.colorinterp, start=1) if c == ColorInterp.alpha]
    alpha = src.read(alpha_bands[0], **kw) if alpha_bands else None
    internal = None
    flags = src.mask_flag_enums[0] if src.count else ()
    if MaskFlags.per_dataset in flags and MaskFlags.alpha not in flags:
        internal = src.dataset_mask(**kw)
    return {"nodata_value": src.nodata, "alpha": alpha, "internal_mask": internal}
