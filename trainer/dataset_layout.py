"""The on-disk dataset layout: finding image/mask pairs and validating them.

``<root>/TAIN_VAL_SET`` (or ``TRAIN_VAL_SET``) and ``<root>/TEST_SET``, each with ``IMAGES/`` and
``MASKS/`` paired by file stem; images are pictures or TIFF/GeoTIFF rasters of any band count
(docs/datasets.md). :func:`read_image_bands` is the one reader of a dataset image's band values
and nodata, used by training, evaluation and ``trainer.prepare stats``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.io import DatasetReader
from rasterio.transform import Affine

from shared.bands import (
    NODATA_AUTO,
    BandError,
    BandSpec,
    NodataRule,
    band_names,
    nodata_mask,
    raster_nodata_inputs,
    resolve_bands,
)
from shared.datasets import IMAGE_EXTENSIONS, MASK_EXTENSIONS, RASTER_EXTENSIONS
from shared.imaging import ImageError, decode_image, decode_mask, read_image
from shared.labels import LabelMap, MaskValueError
from shared.raster import Georef, ground_sample_distance

SPLIT_DIRS: dict[str, tuple[str, ...]] = {
    "trainval": ("TAIN_VAL_SET", "TRAIN_VAL_SET"),
    "test": ("TEST_SET",),
}
IMAGES_DIR = "IMAGES"
MASKS_DIR = "MASKS"
# The bands a picture decodes to.
PICTURE_BANDS = ("red", "green", "blue")
# Listing more than this many offending files in one message helps nobody.
_MAX_LISTED = 10


class DatasetLayoutError(ValueError):
    """The dataset folder does not follow the layout; the message names the folder."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file (or folder) of a dataset."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class SplitScan:
    """What a split folder holds, before any file is decoded."""

    directory: Path
    pairs: list[tuple[Path, Path]] = field(default_factory=list)
    images_without_mask: list[Path] = field(default_factory=list)
    masks_without_image: list[Path] = field(default_factory=list)
    duplicate_stems: list[Path] = field(default_factory=list)
    unsupported_files: list[Path] = field(default_factory=list)


@dataclass
class DatasetReport:
    """Result of :func:`check_dataset`: problems plus what was found per split."""

    problems: list[Problem] = field(default_factory=list)
    pairs: dict[str, int] = field(default_factory=dict)
    # split -> (C,) int64 pixel counts per class id, over the masks that decoded cleanly
    class_pixels: dict[str, np.ndarray] = field(default_factory=dict)
    ignored_pixels: dict[str, int] = field(default_factory=dict)


def split_dir(root: str | Path, split: str) -> Path:
    """Return the folder of ``split`` ("trainval" or "test") under ``root``.

    Raises DatasetLayoutError naming the expected folder when it is missing, or when both
    spellings of the training split exist (which one to use would be a guess).
    """
    root = Path(root)
    if split not in SPLIT_DIRS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_DIRS)}")
    if not root.is_dir():
        raise DatasetLayoutError(f"dataset folder not found: {root}", root)
    found = [root / name for name in SPLIT_DIRS[split] if (root / name).is_dir()]
    if not found:
        expected = " or ".join(str(root / name) for name in SPLIT_DIRS[split])
        raise DatasetLayoutError(f"missing {split} split folder: expected {expected}", root)
    if len(found) > 1:
        both = " and ".join(str(p) for p in found)
        raise DatasetLayoutError(f"ambiguous {split} split: both {both} exist; keep one", root)
    return found[0]


def scan_split(root: str | Path, split: str) -> SplitScan:
    """List a split's files and pair them by stem, without decoding anything.

    Hidden files (``.DS_Store``, editor swap files) are skipped; any other file whose suffix is
    not an image (or lossless mask) type is reported in ``unsupported_files``.
    """
    directory = split_dir(root, split)
    images_dir, masks_dir = directory / IMAGES_DIR, directory / MASKS_DIR
    for sub in (images_dir, masks_dir):
        if not sub.is_dir():
            raise DatasetLayoutError(f"missing folder: {sub}", sub)

    scan = SplitScan(directory=directory)
    images = _by_stem(images_dir, IMAGE_EXTENSIONS, scan)
    masks = _by_stem(masks_dir, MASK_EXTENSIONS, scan)
    for stem in sorted(images.keys() | masks.keys()):
        image, mask = images.get(stem), masks.get(stem)
        if image is None:
            scan.masks_without_image.append(mask)  # type: ignore[arg-type]
        elif mask is None:
            scan.images_without_mask.append(image)
        else:
            scan.pairs.append((image, mask))
    return scan


def find_pairs(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    """Return the (image, mask) paths of a split, sorted by stem.

    ``split`` is "trainval" (``TAIN_VAL_SET`` or ``TRAIN_VAL_SET``) or "test" (``TEST_SET``).
    Raises DatasetLayoutError naming the folder when a folder is missing, when an image has no
    mask (or a mask no image), when two files share a stem, or when the split holds no pairs.
    """
    scan = scan_split(root, split)
    troubles = [
        ("images without a mask", scan.images_without_mask),
        ("masks without an image", scan.masks_without_image),
        ("files sharing a stem", scan.duplicate_stems),
    ]
    for what, paths in troubles:
        if paths:
            raise DatasetLayoutError(
                f"{scan.directory}: {len(paths)} {what}: {_list_paths(paths)}", scan.directory
            )
    if not scan.pairs:
        raise DatasetLayoutError(
            f"{scan.directory}: no image/mask pairs in {IMAGES_DIR}/ and {MASKS_DIR}/",
            scan.directory,
        )
    return scan.pairs


def check_dataset(
    root: str | Path,
    label_map: LabelMap,
    splits: Sequence[str] = ("trainval", "test"),
) -> DatasetReport:
    """Decode every pair of every split and report each bad file.

    Checks: the split folders exist; every image has a mask and vice versa; no two files share
    a stem; each image decodes; each mask decodes and holds only the mapping's ids (or colours)
    or ``ignore_index``; image and mask have the same height and width.
    """
    report = DatasetReport()
    for split in splits:
        try:
            scan = scan_split(root, split)
        except DatasetLayoutError as err:
            report.problems.append(Problem(err.path, str(err)))
            continue
        report.problems += [Problem(p, "image has no mask") for p in scan.images_without_mask]
        report.problems += [Problem(p, "mask has no image") for p in scan.masks_without_image]
        report.problems += [
            Problem(p, "another file in the same folder has the same stem")
            for p in scan.duplicate_stems
        ]
        report.problems += [_unsupported(p) for p in scan.unsupported_files]
        if not scan.pairs:
            report.problems.append(Problem(scan.directory, "no image/mask pairs"))
        counts = np.zeros(label_map.num_classes, dtype=np.int64)
        ignored = 0
        for image_path, mask_path in scan.pairs:
            index, problems = _check_pair(image_path, mask_path, label_map)
            report.problems += problems
            if index is not None:
                counts += np.bincount(index.ravel(), minlength=256)[: label_map.num_classes]
                ignored += int((index == label_map.ignore_index).sum())
        report.pairs[split] = len(scan.pairs)
        report.class_pixels[split] = counts
        report.ignored_pixels[split] = ignored
    return report


def validate_dataset(
    root: str | Path,
    label_map: LabelMap,
    splits: Sequence[str] = ("trainval", "test"),
) -> list[Problem]:
    """Return every problem :func:`check_dataset` finds (empty list: the dataset is usable)."""
    return check_dataset(root, label_map, splits).problems


def _check_pair(
    image_path: Path, mask_path: Path, label_map: LabelMap
) -> tuple[np.ndarray | None, list[Problem]]:
    """Decode one pair; return the (H,W) index mask when it is valid, and the problems found.

    The bytes are decoded directly (not via ``read_image``) because each Problem already names
    its file; the path would otherwise appear twice in every line.
    """
    problems: list[Problem] = []
    image_hw: tuple[int, int] | None = None
    try:
        if is_raster(image_path):
            with open_image(image_path) as src:
                image_hw = (src.height, src.width)
        else:
            image_hw = decode_image(image_path.read_bytes()).shape[:2]
    except ImageError as err:
        problems.append(Problem(image_path, f"image does not decode: {err}"))
    except OSError as err:
        problems.append(Problem(image_path, f"cannot read image: {err}"))

    index: np.ndarray | None = None
    try:
        index = label_map.to_index(decode_mask(mask_path.read_bytes()))
    except ImageError as err:
        problems.append(Problem(mask_path, f"mask does not decode: {err}"))
    except MaskValueError as err:
        problems.append(Problem(mask_path, f"mask has values outside the label map: {err}"))
    except OSError as err:
        problems.append(Problem(mask_path, f"cannot read mask: {err}"))

    if image_hw is not None and index is not None and index.shape[:2] != image_hw:
        problems.append(
            Problem(
                mask_path,
                f"mask is {index.shape[1]}x{index.shape[0]} but image {image_path.name} is "
                f"{image_hw[1]}x{image_hw[0]} (WxH)",
            )
        )
        index = None
    return index, problems


def _unsupported(path: Path) -> Problem:
    accepted = MASK_EXTENSIONS if path.parent.name == MASKS_DIR else IMAGE_EXTENSIONS
    return Problem(
        path,
        f"unsupported file type {path.suffix!r} in {path.parent.name}/ "
        f"(accepted: {', '.join(sorted(accepted))})",
    )


def _by_stem(folder: Path, extensions: frozenset[str], scan: SplitScan) -> dict[str, Path]:
    """Map stem -> file for the files of ``folder`` with an accepted suffix (case-insensitive)."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.suffix.lower() not in extensions:
            scan.unsupported_files.append(path)
            continue
        if path.stem in found:
            scan.duplicate_stems.append(path)
            continue
        found[path.stem] = path
    return found


def _list_paths(paths: Iterable[Path]) -> str:
    paths = list(paths)
    names = ", ".join(p.name for p in paths[:_MAX_LISTED])
    return names + (f" (and {len(paths) - _MAX_LISTED} more)" if len(paths) > _MAX_LISTED else "")


# --- band values -------------------------------------------------------------------------------


def is_raster(path: Path) -> bool:
    """Whether ``path`` is read as a raster (TIFF/GeoTIFF) rather than decoded as a picture."""
    return path.suffix.lower() in RASTER_EXTENSIONS


def open_image(path: Path) -> DatasetReader:
    """Open a raster image with rasterio (a context manager).

    Raises:
        ImageError: the file does not open as a raster; the message says why.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except RasterioError as err:
        raise ImageError(f"not a readable raster: {err}") from None


def dataset_band_spec(
    root: str | Path,
    selection: Sequence[int | str] | None = None,
    nodata: NodataRule = NODATA_AUTO,
) -> tuple[BandSpec, Path | None]:
    """The bands a model trained on ``root`` reads: ``selection`` (``data.bands``) resolved
    against the first readable training image, and that image (None when there is none).

    Picture datasets (PNG, JPEG...) hold red, green, blue (8-bit). A dataset without readable
    training images resolves as pictures: checking its files (:func:`check_dataset`) names
    what is wrong with it.

    Raises:
        BandError: a selection the image's bands do not fit; the message names the band and
            lists the image's bands.
        ImageError: the image's bands are of different types.
    """
    try:
        images = [image for image, _ in scan_split(root, "trainval").pairs]
    except DatasetLayoutError:
        images = []
    for image in images:
        if not is_raster(image):
            break
        try:
            src = open_image(image)
        except ImageError:
            continue
        with src:
            if len(set(src.dtypes)) > 1:
                raise ImageError(
                    f"{image}: bands of different types are not supported: {src.dtypes}"
                )
            names = band_names(src.descriptions, [c.name for c in src.colorinterp])
            return resolve_bands(selection, names, dtype=src.dtypes[0], nodata=nodata), image
    first = images[0] if images else None
    return resolve_bands(selection, PICTURE_BANDS, dtype="uint8", nodata=nodata), first


def read_image_bands(path: Path, spec: BandSpec) -> tuple[np.ndarray, np.ndarray | None]:
    """One dataset image's bands: ``(H, W, B)`` values in ``spec``'s order and dtype, and the
    ``(H, W)`` bool nodata mask under ``spec.nodata`` (None when every pixel is valid).

    A picture decodes to 8-bit RGB (its bands picked by ``spec``) and has no nodata, exactly as
    before rasters were read; a raster's nodata is traced over the whole file (a chip's edges are
    its scene's edges).

    Raises:
        ImageError: unreadable file, or one without ``spec``'s bands or dtype (named).
        OSError: the file cannot be read.
    """
    if not is_raster(path):
        rgb = read_image(path)
        if spec.indexes == (1, 2, 3):
            return rgb, None
        if max(spec.indexes) > 3:
            raise ImageError(f"{path}: a picture has 3 bands, data.bands asks for {spec.indexes}")
        return np.ascontiguousarray(rgb[:, :, [i - 1 for i in spec.indexes]]), None
    with open_image(path) as src:
        if src.count < max(spec.indexes) or src.dtypes[0] != spec.dtype:
            raise ImageError(
                f"{path}: {src.count} bands {src.dtypes[0]}, but the dataset's bands are "
                f"{', '.join(f'{b.index}={b.name}' for b in spec.bands)} ({spec.dtype})"
            )
        try:
            values = src.read(list(spec.indexes))
            nodata = nodata_mask(values, spec.nodata, **raster_nodata_inputs(src))
        except (RasterioError, BandError, ValueError) as err:
            raise ImageError(f"{path}: cannot read its bands: {err}") from None
    image = np.ascontiguousarray(values.transpose(1, 2, 0))
    return image, (nodata if nodata.any() else None)


def image_gsd(path: Path | None) -> float | None:
    """Ground sample distance of a georeferenced image, metres per pixel; None otherwise.

    Pixels in degrees (EPSG:4326) are converted at the equator (about 111 320 m a degree), not
    at the image's own latitude, so every tile of a global dataset gives the same number: the
    bundled Blue Marble's 1/15 degree is about 7.4 km.
    """
    if path is None or not is_raster(path):
        return None
    with open_image(path) as src:
        crs, t, height, width = src.crs, src.transform, src.height, src.width
    if crs is None or t == Affine.identity():
        return None
    if crs.is_geographic:
        # The same pixel size, moved so that the image's centre lies on the equator.
        centre_lat = t.d * width / 2 + t.e * height / 2 + t.f
        t = Affine(t.a, t.b, t.c, t.d, t.e, t.f - centre_lat)
    return ground_sample_distance(Georef(crs, t), height, width)
