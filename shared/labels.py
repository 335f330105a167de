"""Class definitions from ``label_mapping.json`` and conversions between masks and class ids.

Ground-truth masks arrive either as single-channel index images (pixel value = class id) or as
RGB colour images (pixel colour = class colour, as many Kaggle satellite datasets ship them).
:meth:`LabelMap.to_index` turns both into one ``(H, W)`` uint8 array of class ids; anything it
does not recognise is an error that names the offending values, never a silent remap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_LABEL_MAPPING: Path = Path(__file__).resolve().parents[1] / "label_mapping.json"

# A mask with thousands of stray values (e.g. a photo passed as a mask) would give an unreadable
# message; name the first few and count the rest.
_MAX_REPORTED_VALUES = 20
_BLACK = (0, 0, 0)


class LabelMapError(ValueError):
    """``label_mapping.json`` (or the dict it came from) is invalid; the message names the
    problem and the source."""


class MaskValueError(ValueError):
    """A mask holds values or colours that the label mapping does not define.

    ``values`` lists the offending values: ints for index masks, ``[r, g, b]`` lists for colour
    masks (at most the first 20, sorted; the message gives the total count).
    """

    def __init__(self, message: str, values: list | None = None) -> None:
        super().__init__(message)
        self.values: list = list(values) if values is not None else []


@dataclass(frozen=True)
class LabelClass:
    """One class: its id (the value in index masks), name and RGB display colour."""

    id: int
    name: str
    color: tuple[int, int, int]


@dataclass(frozen=True)
class LabelMap:
    """The classes of a dataset plus the index that marks unlabelled pixels.

    Invariants (checked on construction): ids are exactly ``0..C-1``; names are unique and
    non-empty; colours are unique RGB triples in 0..255; ``ignore_index`` is in 0..255 and not a
    class id (it must fit the uint8 index masks).
    """

    classes: tuple[LabelClass, ...]
    ignore_index: int = 255

    def __post_init__(self) -> None:
        # Keep classes ordered by id so that position == id everywhere else.
        ordered = tuple(sorted(self.classes, key=lambda c: c.id))
        object.__setattr__(self, "classes", ordered)
        _validate(ordered, self.ignore_index, "<LabelMap>")

    # -- properties --------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def colors(self) -> np.ndarray:
        """``(C, 3)`` uint8 class colours, row ``i`` for class id ``i``."""
        return np.array([c.color for c in self.classes], dtype=np.uint8).reshape(-1, 3)

    # -- (de)serialisation -------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> LabelMap:
        """Build and validate from the ``label_mapping.json`` structure:
        ``{"ignore_index": 255, "classes": [{"id": 0, "name": "ocean", "color": [r, g, b]}, ...]}``.

        Raises:
            LabelMapError: naming ``source`` and the problem.
        """
        if not isinstance(data, dict):
            raise LabelMapError(f"{source}: expected a JSON object, got {type(data).__name__}")
        unknown = set(data) - {"ignore_index", "classes"}
        if unknown:
            raise LabelMapError(f"{source}: unknown keys {sorted(unknown)}")
        ignore_index = data.get("ignore_index", 255)
        if not _is_int(ignore_index):
            raise LabelMapError(f"{source}: ignore_index must be an integer, got {ignore_index!r}")
        raw_classes = data.get("classes")
        if not isinstance(raw_classes, list) or not raw_classes:
            raise LabelMapError(f"{source}: 'classes' must be a non-empty list")
        classes = [_parse_class(entry, i, source) for i, entry in enumerate(raw_classes)]
        classes.sort(key=lambda c: c.id)
        _validate(tuple(classes), ignore_index, source)
        return cls(classes=tuple(classes), ignore_index=int(ignore_index))

    @classmethod
    def load(cls, path: str | Path = DEFAULT_LABEL_MAPPING) -> LabelMap:
        """Read and validate a ``label_mapping.json`` file.

        Raises:
            LabelMapError: the file is missing, unreadable, not JSON or not a valid mapping.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise LabelMapError(f"{path}: cannot read label mapping ({e})") from e
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise LabelMapError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict:
        """The ``label_mapping.json`` structure (plain JSON types; safe in checkpoints)."""
        return {
            "ignore_index": self.ignore_index,
            "classes": [{"id": c.id, "name": c.name, "color": list(c.color)} for c in self.classes],
        }

    # -- conversions ---------------------------------------------------------------------------

    def to_index(self, mask: np.ndarray) -> np.ndarray:
        """Turn a ground-truth mask into class ids.

        Args:
            mask: ``(H, W)`` integer class ids (``(H, W, 1)`` accepted), or ``(H, W, 3)`` RGB
                colours. In colour masks black ``(0, 0, 0)`` means ``ignore_index`` unless a
                class owns black (this is the inverse of :meth:`to_color`).

        Returns:
            ``(H, W)`` uint8 class ids; ``ignore_index`` pixels are kept as ``ignore_index``.

        Raises:
            MaskValueError: values or colours outside the mapping (named in the message), or a
                shape that is neither of the above.
        """
        mask = np.asarray(mask)
        if mask.ndim == 3 and mask.shape[2] == 1:
            mask = mask[..., 0]
        if mask.ndim == 2:
            return self._index_from_values(mask)
        if mask.ndim == 3 and mask.shape[2] == 3:
            return self._index_from_colors(mask)
        raise MaskValueError(
            f"mask must be (H, W) class ids or (H, W, 3) RGB colours, got shape {mask.shape}"
        )

    def to_color(self, index: np.ndarray) -> np.ndarray:
        """``(H, W)`` class ids -> ``(H, W, 3)`` uint8 colours; ``ignore_index`` becomes black.

        Raises:
            MaskValueError: ids that are neither a class nor ``ignore_index``.
        """
        index = np.asarray(index)
        if index.ndim != 2:
            raise MaskValueError(f"index mask must be (H, W), got shape {index.shape}")
        index = self._index_from_values(index)
        lut = np.zeros((256, 3), dtype=np.uint8)
        lut[: self.num_classes] = self.colors
        return lut[index]

    def palette(self) -> list[int]:
        """768 ints for ``PIL.Image.putpalette``: class colours at their ids, the rest black."""
        flat = np.zeros((256, 3), dtype=np.uint8)
        flat[: self.num_classes] = self.colors
        return [int(v) for v in flat.ravel()]

    # -- helpers -------------------------------------------------------------------------------

    def _index_from_values(self, mask: np.ndarray) -> np.ndarray:
        valid = np.zeros(256, dtype=bool)
        valid[: self.num_classes] = True
        valid[self.ignore_index] = True
        if mask.dtype == np.bool_:
            mask = mask.astype(np.uint8)
        if mask.dtype.kind not in "iu":
            if mask.dtype.kind != "f":
                raise MaskValueError(f"mask must hold integers, got dtype {mask.dtype}")
            # Float masks are accepted only when every value is a whole number.
            bad = np.unique(mask[(mask != np.round(mask)) | (mask < 0) | (mask > 255)])
            if bad.size:
                raise _value_error(bad.tolist(), self)
            mask = mask.astype(np.int64)
        if mask.size == 0:
            return mask.astype(np.uint8)
        lo, hi = int(mask.min()), int(mask.max())
        if lo >= 0 and hi <= 255:
            # Fast path for the usual uint8 masks: which of the 256 possible values occur.
            present = np.bincount(mask.ravel().astype(np.intp, copy=False), minlength=256) > 0
            bad = np.flatnonzero(present & ~valid)
        else:
            values = np.unique(mask)
            in_range = (values >= 0) & (values <= 255)
            ok = np.zeros(values.shape, dtype=bool)
            ok[in_range] = valid[values[in_range].astype(np.intp)]
            bad = values[~ok]
        if bad.size:
            raise _value_error([int(v) for v in bad], self)
        return mask.astype(np.uint8, copy=False)

    def _index_from_colors(self, mask: np.ndarray) -> np.ndarray:
        if mask.dtype.kind not in "iu" or mask.size and (mask.min() < 0 or mask.max() > 255):
            raise MaskValueError(
                f"colour mask must hold 8-bit RGB values, got dtype {mask.dtype}"
                + (f" with range [{mask.min()}, {mask.max()}]" if mask.size else "")
            )
        rgb = mask.astype(np.uint32)
        packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]

        codes = [(r << 16) | (g << 8) | b for r, g, b in (c.color for c in self.classes)]
        ids = [c.id for c in self.classes]
        if _BLACK not in [c.color for c in self.classes]:
            codes.append(0)
            ids.append(self.ignore_index)
        order = np.argsort(codes)
        sorted_codes = np.asarray(codes, dtype=np.uint32)[order]
        sorted_ids = np.asarray(ids, dtype=np.uint8)[order]

        # Map every pixel colour to a class with one binary search instead of a loop per class.
        pos = np.searchsorted(sorted_codes, packed).clip(max=len(sorted_codes) - 1)
        known = sorted_codes[pos] == packed
        if not known.all():
            bad = np.unique(packed[~known])
            colours = [[int(c >> 16) & 255, int(c >> 8) & 255, int(c) & 255] for c in bad]
            raise _value_error(colours, self, kind="colours")
        return sorted_ids[pos]


def overlay(
    image: np.ndarray, index: np.ndarray, label_map: LabelMap, alpha: float = 0.5
) -> np.ndarray:
    """Blend class colours over an image, for eyeballing predictions and labels.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        index: ``(H, W)`` class ids; ``ignore_index`` pixels show the image unchanged.
        label_map: supplies the colours.
        alpha: weight of the class colour, 0 (image only) to 1 (colours only).

    Returns:
        ``(H, W, 3)`` uint8.
    """
    image = np.asarray(image)
    index = np.asarray(index)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if index.shape != image.shape[:2]:
        raise ValueError(f"index shape {index.shape} does not match image {image.shape[:2]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colors = label_map.to_color(index).astype(np.float32)
    blended = image.astype(np.float32) * (1.0 - alpha) + colors * alpha
    out = np.rint(blended).astype(np.uint8)
    ignored = index == label_map.ignore_index
    out[ignored] = image[ignored]
    return out


def _is_int(value: Any) -> bool:
    # bool is an int subclass; `true` in JSON is not a class id.
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_class(entry: Any, position: int, source: str) -> LabelClass:
    where = f"{source}: classes[{position}]"
    if not isinstance(entry, dict):
        raise LabelMapError(f"{where} must be an object with id, name and color")
    missing = {"id", "name", "color"} - set(entry)
    if missing:
        raise LabelMapError(f"{where} is missing {sorted(missing)}")
    cid, name, color = entry["id"], entry["name"], entry["color"]
    if not _is_int(cid):
        raise LabelMapError(f"{where}: id must be an integer, got {cid!r}")
    if not isinstance(name, str) or not name.strip():
        raise LabelMapError(f"{where}: name must be a non-empty string, got {name!r}")
    if (
        not isinstance(color, list | tuple)
        or len(color) != 3
        or not all(_is_int(v) and 0 <= v <= 255 for v in color)
    ):
        raise LabelMapError(f"{where} ({name!r}): color must be [r, g, b] in 0..255, got {color!r}")
    return LabelClass(id=cid, name=name, color=(color[0], color[1], color[2]))


def _validate(classes: tuple[LabelClass, ...], ignore_index: int, source: str) -> None:
    if not classes:
        raise LabelMapError(f"{source}: at least one class is required")
    ids = [c.id for c in classes]
    if sorted(ids) != list(range(len(ids))):
        raise LabelMapError(
            f"{source}: class ids must be 0..{len(ids) - 1} without gaps, got {ids}"
        )
    names = [c.name for c in classes]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise LabelMapError(f"{source}: duplicate class names {duplicates}")
    colors = [tuple(c.color) for c in classes]
    if any(len(c) != 3 or not all(_is_int(v) and 0 <= v <= 255 for v in c) for c in colors):
        raise LabelMapError(f"{source}: every colour must be three ints in 0..255, got {colors}")
    dup_colors = sorted({c for c in colors if colors.count(c) > 1})
    if dup_colors:
        # Colour masks could not be decoded unambiguously.
        raise LabelMapError(f"{source}: classes share colours {[list(c) for c in dup_colors]}")
    if not _is_int(ignore_index) or not 0 <= ignore_index <= 255:
        raise LabelMapError(
            f"{source}: ignore_index must be an integer in 0..255, got {ignore_index!r}"
        )
    if ignore_index in ids:
        raise LabelMapError(f"{source}: ignore_index {ignore_index} is also a class id")


def _value_error(values: list, label_map: LabelMap, kind: str = "values") -> MaskValueError:
    shown = values[:_MAX_REPORTED_VALUES]
    more = f" (and {len(values) - len(shown)} more)" if len(values) > len(shown) else ""
    allowed = (
        f"class ids 0..{label_map.num_classes - 1} and ignore_index {label_map.ignore_index}"
        if kind == "values"
        else f"class colours {[list(c.color) for c in label_map.classes]}"
    )
    return MaskValueError(
        f"mask has {len(values)} {kind} not in the label mapping: {shown}{more}; "
        f"expected {allowed}",
        values=shown,
    )
