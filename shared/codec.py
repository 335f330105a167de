"""Arrays to answer bodies: the encoding half of the HTTP seam (the model never sees these).

Decoding is ``shared.imaging`` and ``shared.geotiff``; here the ``(H, W)`` uint8 class-id mask
becomes a palette PNG, a GeoTIFF on the input's footprint or per-class COCO RLE, and checkpoint
metadata becomes plain JSON.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from shared import rle
from shared.geotiff import GeoImage, write_geotiff_mask
from shared.imaging import encode_png
from shared.labels import LabelMap


def mask_to_png(mask: np.ndarray, label_map: LabelMap) -> bytes:
    """``(H, W)`` uint8 class ids -> single-channel 'P' PNG whose palette is the label colours."""
    return encode_png(mask, palette=label_map.palette())


def mask_to_geotiff(mask: np.ndarray, geo: GeoImage, label_map: LabelMap) -> bytes:
    """``(H, W)`` uint8 class ids -> single-band uint8 GeoTIFF with ``geo``'s CRS, transform
    (or GCPs) and size, the label colours as its colour table.

    ``ignore_index`` is declared nodata only when the input had nodata pixels, so a mask of a
    fully valid scene carries no nodata value that GIS tools would hide.
    """
    nodata = label_map.ignore_index if geo.valid is not None else None
    return write_geotiff_mask(mask, geo.profile, label_map=label_map, nodata=nodata)


def mask_to_rle(mask: np.ndarray, label_map: LabelMap) -> dict[str, Any]:
    """``(H, W)`` uint8 class ids -> ``{"height", "width", "classes": mask_to_classes(...)}``."""
    return {
        "height": int(mask.shape[0]),
        "width": int(mask.shape[1]),
        "classes": mask_to_classes(mask, label_map),
    }


def mask_to_classes(mask: np.ndarray, label_map: LabelMap) -> list[dict[str, Any]]:
    """One entry per class of ``label_map`` (in its order, absent classes included)::

        {"id", "name", "area", "fraction", "rle": {"size": [h, w], "counts": str}}

    ``area`` counts from one bincount over the mask, not one pass per class.
    """
    height, width = mask.shape
    total = max(height * width, 1)
    counts = np.bincount(mask.ravel(), minlength=256)
    out = []
    for cls in label_map.classes:
        area = int(counts[cls.id])
        out.append(
            {
                "id": cls.id,
                "name": cls.name,
                "area": area,
                "fraction": area / total,
                "rle": rle.encode(mask == cls.id),
            }
        )
    return out


def jsonable(value: Any) -> Any:
    """Checkpoint metadata -> something ``json.dumps(allow_nan=False)`` accepts.

    Non-finite floats become ``None``; tensors, arrays and numpy scalars become lists and
    numbers; anything else unknown becomes its ``str``.
    """
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
        return jsonable(value.tolist())
    return str(value)
