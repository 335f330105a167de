"""Batch prediction: segment image files, folders and scenes of any size offline, through the
pipeline the service runs (:mod:`shared.pipeline`).

    python -m trainer.predict --checkpoint runs/quickstart/best.pt scenes/ extra.jpg --out masks/
    python -m trainer.predict --checkpoint best.pt S2_scene.tif --bands 4,3,2 --scale 0,3000 \
        --out masks/ --format cog
    python -m trainer.predict --checkpoint best.pt mosaic.tif --out vectors/ --format geojson \
        --crs EPSG:4326 --min-area 50 --simplify 1

GDAL rasters are streamed a band of rows at a time, so a scene of any size fits in the same memory.
Outputs (png, cog, probabilities, geojson; mirrored sub-folders) and the rules that keep inputs
safe are in docs/deployment.md, "Batch prediction". Nothing is written over an input; a file that
cannot be read or segmented is reported by name and skipped.

Exit codes: 0 every file segmented, 1 some files skipped, 2 bad arguments or checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from shared.bands import BandSpec, NodataRule, parse_band_list, parse_nodata
from shared.checkpoint import (
    CheckpointError,
    bands_from_checkpoint,
    gsd_from_checkpoint,
    load_checkpoint,
)
from shared.codec import GEOJSON_CRS, CogWriter, PolygonWriter, mask_to_png
from shared.files import atomic_write_bytes
from shared.geotiff import RasterOptionError, Scale, parse_bands, parse_scale
from shared.imaging import DEFAULT_MAX_PIXELS, ImageError, encode_png
from shared.inference import InferenceOptions, Predictor
from shared.labels import LabelMap, overlay
from shared.messages import first_line
from shared.pipeline import Band, WholeScene, stream
from shared.precision import INFERENCE_PRECISIONS
from shared.raster import (
    ArrayRaster,
    Georef,
    RasterSource,
    close_source,
    ground_sample_distance,
    open_file,
    open_for_model,
    scale_warning,
)
from trainer.dataset_layout import IMAGE_EXTENSIONS
from trainer.ray_options import add_ray_arguments

EXIT_OK, EXIT_SKIPPED, EXIT_USAGE = 0, 1, 2
OVERLAY_SUFFIX = "_overlay"
FORMATS = ("png", "cog", "probabilities", "geojson")
# What each format writes after the input's stem.
SUFFIXES = {
    "png": ".png",
    "cog": ".tif",
    "probabilities": "_probabilities.tif",
    "geojson": ".geojson",
}


class PredictError(Exception):
    """A problem with the arguments (inputs, output folder); nothing was written."""


@dataclass(frozen=True)
class Job:
    """One input file and where its outputs go.

    Attributes:
        source: the input image.
        target: output path without suffix, e.g. ``<out>/sub/tile_0001`` for
            ``<input folder>/sub/tile_0001.jpg``.
    """

    source: Path
    target: Path

    def output_path(self, fmt: str) -> Path:
        return self.target.with_name(self.target.name + SUFFIXES[fmt])

    @property
    def overlay_path(self) -> Path:
        return self.target.with_name(self.target.name + OVERLAY_SUFFIX + ".png")

    def possible_outputs(self, fmt: str | None, overlays: bool) -> list[Path]:
        """Every path this job may write (without ``fmt``, png or cog, known after opening)."""
        formats = [fmt] if fmt else ["png", "cog"]
        paths = [self.output_path(f) for f in formats]
        if overlays:
            paths.append(self.overlay_path)
        return paths


@dataclass(frozen=True)
class ReadOptions:
    """How input files are decoded (see :mod:`shared.geotiff` for ``bands`` and ``scale``,
    :mod:`shared.bands` for ``nodata``).

    Attributes:
        model: the bands a multi-band model reads (:func:`for_model`); None for an RGB model.
        fill: the values nodata pixels take for a multi-band model (its training means).
        gsd_m: the training data's pixel size, for the scale warning; None when unknown.
    """

    bands: tuple[int, ...] | None = None
    scale: Scale | str = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS
    nodata: NodataRule = "auto"
    model: BandSpec | None = None
    fill: tuple[float, ...] | None = None
    gsd_m: float | None = None


def for_model(read: ReadOptions, predictor: Predictor) -> ReadOptions:
    """``read`` for ``predictor``'s band spec: RGB models take 1 or 3 ``bands``, others their
    own band count, read as values with nodata at the training means.

    Raises:
        RasterOptionError: ``bands`` that an RGB model cannot take.
    """
    spec = bands_from_checkpoint(predictor.metadata)
    gsd_m = gsd_from_checkpoint(predictor.metadata)
    if spec.reads_pictures():
        return replace(read, bands=parse_bands(read.bands), gsd_m=gsd_m)
    norm = predictor.normalization
    fill = tuple(m * norm.scale for m in norm.mean)
    return replace(read, model=spec, fill=fill, gsd_m=gsd_m)


@dataclass(frozen=True)
class WriteOptions:
    """What is written (see the module docstring).

    Attributes:
        format: "png", "cog", "probabilities" or "geojson"; None: cog for georeferenced
            rasters, png for the rest.
        overlays: also write ``<stem>_overlay.png``.
        alpha: class-colour weight of the overlays.
        crs: GeoJSON coordinates: "raster" or "EPSG:4326".
        min_area: GeoJSON polygons below this many pixels are dropped.
        simplify: GeoJSON simplification tolerance in pixels.
    """

    format: str | None = None
    overlays: bool = False
    alpha: float = 0.5
    crs: str = "raster"
    min_area: float = 0.0
    simplify: float = 0.0

    def __post_init__(self) -> None:
        if self.format is not None and self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {self.format!r}")
        if self.crs not in GEOJSON_CRS:
            raise ValueError(f"crs must be one of {', '.join(GEOJSON_CRS)}; got {self.crs!r}")
        if self.min_area < 0 or self.simplify < 0:
            raise ValueError("--min-area and --simplify must be >= 0")


@dataclass
class Report:
    """What a run did: files written and files skipped, with the reason."""

    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)


class SceneHeader(Protocol):
    """What the writers need of an input besides its pixels (a :class:`RasterSource` has it)."""

    height: int
    width: int
    georef: Georef
    # Whether any pixel may be nodata: the outputs then declare the ignore index as nodata.
    has_nodata: bool


@dataclass
class _Loaded:
    job: Job
    source: RasterSource | None = None
    error: str | None = None

    @property
    def small(self) -> bool:
        return isinstance(self.source, ArrayRaster)


def collect_jobs(inputs: Sequence[str | Path], out_dir: str | Path) -> list[Job]:
    """Expand files and folders (recursively, by image extension) into jobs writing to ``out_dir``.

    A file given by name is taken whatever its extension; folder contents are filtered by
    extension (``trainer.dataset_layout.IMAGE_EXTENSIONS``). Jobs come in a stable order.

    Raises:
        PredictError: a missing input, no image found, an output folder that is or lies inside an
            input folder, or outputs that would overwrite an input or collide with each other.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PredictError(f"--out exists and is not a folder: {out}")
    out_resolved = out.resolve()
    jobs: list[Job] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            folder = path.resolve()
            if out_resolved == folder or out_resolved.is_relative_to(folder):
                raise PredictError(
                    f"--out {out} is inside the input folder {path}; choose a folder outside it "
                    "so that outputs can never replace or be mistaken for inputs"
                )
            for file in sorted(p for p in path.rglob("*") if _is_image_file(p)):
                relative = file.relative_to(path)
                jobs.append(Job(file, out / relative.parent / file.stem))
        elif path.is_file():
            jobs.append(Job(path, out / path.stem))
        else:
            raise PredictError(f"input not found: {path}")
    if not jobs:
        raise PredictError(
            f"no images found in {', '.join(map(str, inputs))} "
            f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    _check_outputs(jobs, None, overlays=True)
    return jobs


def predict_files(
    predictor: Predictor,
    jobs: Sequence[Job],
    *,
    read: ReadOptions | None = None,
    write: WriteOptions | None = None,
    batch: int = 4,
    skip_existing: bool = False,
    workers: int = 2,
    progress: bool | None = None,
) -> Report:
    """Segment every job's image and write its outputs.

    Args:
        predictor: the model on its device.
        jobs: from :func:`collect_jobs`.
        read: decoding options.
        write: output format and options.
        batch: same-sized small images per forward pass.
        skip_existing: leave jobs whose output already exists untouched.
        workers: decoding threads.
        progress: a tqdm bar; None shows it only on a terminal.

    Returns:
        The files written and the inputs skipped (unreadable, or failed to segment or write).
    """
    read = read or ReadOptions()
    write = write or WriteOptions()
    report = Report()
    _check_outputs(jobs, write.format, write.overlays)
    todo = []
    for job in jobs:
        if skip_existing and any(p.exists() for p in job.possible_outputs(write.format, False)):
            report.kept.append(job.source)
        else:
            todo.append(job)

    bar = tqdm(total=len(todo), unit="img", desc="predict", disable=bar_disabled(progress))
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="decode") as pool:
        depth = batch + max(1, workers)  # decoded images waiting: bounds host memory
        for chunk in _chunks(_prefetch(pool, todo, read, depth=depth), batch):
            for item in chunk:
                if item.error is not None:
                    _skip(report, item.job.source, item.error)
            good = [item for item in chunk if item.error is None]
            try:
                _segment(predictor, good, write, report)
            finally:
                for item in good:
                    if item.source is not None:
                        close_source(item.source)
            bar.update(len(chunk))
    bar.close()
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 files skipped, 2 usage/checkpoint errors)."""
    args = build_parser().parse_args(argv)
    try:
        read, write = _read_write_options(args)
        jobs = collect_jobs(args.inputs, args.out)
        options = InferenceOptions(
            device=args.device,
            precision=args.precision,
            tile=args.tile,
            overlap=args.overlap,
            tile_batch=args.batch,
            flips=args.flips,
        )
        if args.ray:
            return _main_on_ray(args, jobs, read=read, write=write, options=options)
        predictor = Predictor.from_checkpoint(args.checkpoint, options)
        read = for_model(read, predictor)
    except (PredictError, RasterOptionError, CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"{len(jobs)} image(s) -> {args.out} on {predictor.device} ({predictor.precision})",
        file=sys.stderr,
    )
    try:
        report = predict_files(
            predictor,
            jobs,
            read=read,
            write=write,
            batch=args.batch,
            skip_existing=args.skip_existing,
            workers=args.workers,
        )
    except KeyboardInterrupt:
        # Outputs are written atomically, so every file already there is complete.
        print("interrupted; continue with --skip-existing", file=sys.stderr)
        return 130
    return print_report(jobs, report)


def _read_write_options(args: argparse.Namespace) -> tuple[ReadOptions, WriteOptions]:
    """How inputs are read and outputs written, from the command line."""
    read = ReadOptions(
        bands=parse_band_list(args.bands),
        scale=parse_scale(args.scale),
        max_pixels=args.max_pixels,
        nodata=parse_nodata(args.nodata),
    )
    write = WriteOptions(
        format=args.format,
        overlays=args.overlay,
        alpha=args.alpha,
        crs=args.crs,
        min_area=args.min_area,
        simplify=args.simplify,
    )
    return read, write


def _main_on_ray(
    args: argparse.Namespace,
    jobs: Sequence[Job],
    *,
    read: ReadOptions,
    write: WriteOptions,
    options: InferenceOptions,
) -> int:
    """``--ray``: for 8-bit RGB models, the run handed to :mod:`trainer.ray_predict`."""
    from trainer.ray_predict import main_on_ray

    spec = bands_from_checkpoint(load_checkpoint(args.checkpoint))
    if not spec.reads_pictures():
        raise PredictError(
            f"--ray runs 8-bit RGB models; {args.checkpoint} reads {spec.count} bands "
            f"({', '.join(spec.names)}, {spec.dtype}): run without --ray"
        )
    read = replace(read, bands=parse_bands(read.bands))
    return main_on_ray(args, jobs, read=read, write=write, options=options)


def print_report(jobs: Sequence[Job], report: Report) -> int:
    """Say on stderr what a run wrote and skipped; the exit code (EXIT_SKIPPED if it skipped)."""
    done = len(jobs) - len(report.skipped) - len(report.kept)
    kept = f", {len(report.kept)} already done" if report.kept else ""
    print(f"segmented {done} image(s), wrote {len(report.written)} file(s){kept}", file=sys.stderr)
    if report.skipped:
        print(f"skipped {len(report.skipped)} file(s):", file=sys.stderr)
        for path, reason in report.skipped:
            print(f"  {path}: {reason}", file=sys.stderr)
        return EXIT_SKIPPED
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders")
    parser.add_argument("--checkpoint", required=True, help="checkpoint written by trainer.fit")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="output: png, cog, probabilities or geojson (default: cog for georeferenced "
        "rasters, png otherwise)",
    )
    parser.add_argument("--crs", default="raster", choices=GEOJSON_CRS, help="GeoJSON coordinates")
    parser.add_argument(
        "--min-area", type=float, default=0.0, help="GeoJSON: drop polygons under N pixels"
    )
    parser.add_argument(
        "--simplify", type=float, default=0.0, help="GeoJSON: simplify tolerance in pixels"
    )
    parser.add_argument("--overlay", action="store_true", help="also write <stem>_overlay.png")
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay colour weight, 0..1")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--precision", default="auto", choices=INFERENCE_PRECISIONS)
    defaults = InferenceOptions()
    parser.add_argument("--tile", type=int, default=defaults.tile, help="tile side (x32)")
    parser.add_argument("--overlap", type=int, default=defaults.overlap, help="tile overlap")
    parser.add_argument(
        "--batch",
        type=int,
        default=defaults.tile_batch,
        help="images (same size, up to one tile) or tiles per forward pass",
    )
    parser.add_argument(
        "--flips", action="store_true", help="average each tile over its flips (4x the time)"
    )
    parser.add_argument(
        "--bands",
        default=None,
        help="TIFF bands in the model's order, 1-based: R,G,B for an RGB model (4,3,2); one per "
        "band for a multi-band model (default: the file's bands)",
    )
    parser.add_argument(
        "--nodata",
        default="auto",
        help="nodata pixels (written 255): auto (tag, alpha, mask, and the all-zero collar "
        "connected to the scene edge), none, or a value held by every band",
    )
    parser.add_argument(
        "--scale",
        default="auto",
        help="TIFF value scaling: auto, minmax, percentile:LOW,HIGH or LOW,HIGH (e.g. 0,3000)",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="cap for pictures decoded whole (PNG, JPEG, WebP, plain TIFF); GDAL rasters are "
        "streamed and have none",
    )
    parser.add_argument("--skip-existing", action="store_true", help="keep masks already written")
    parser.add_argument("--workers", type=int, default=2, help="decoding threads")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_ray_arguments(parser)
    return parser


# -- internals ---------------------------------------------------------------------------------


def _is_image_file(path: Path) -> bool:
    # Hidden files are skipped: "._x.jpg" is macOS metadata, not an image.
    return (
        path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file() and not path.name.startswith(".")
    )


def _check_outputs(jobs: Sequence[Job], fmt: str | None, overlays: bool) -> None:
    """Refuse plans where an output is an input, or two inputs share an output."""
    inputs = {job.source.resolve(): job.source for job in jobs}
    owners: dict[Path, Path] = {}
    for job in jobs:
        for path in job.possible_outputs(fmt, overlays):
            resolved = path.resolve()
            if resolved in inputs:
                raise PredictError(
                    f"refusing to overwrite input {inputs[resolved]} with the output of "
                    f"{job.source}; choose another --out"
                )
            other = owners.setdefault(resolved, job.source)
            if other != job.source:
                raise PredictError(
                    f"{other} and {job.source} would both write {path}; "
                    "segment them into different --out folders"
                )


def _load(job: Job, read: ReadOptions) -> _Loaded:
    # Pictures are decoded here, in a background thread; GDAL rasters are only opened.
    try:
        if read.model is not None:
            source: RasterSource = open_for_model(
                job.source,
                read.model,
                fill=read.fill,
                bands=read.bands,
                scale=read.scale,
                nodata=read.nodata,
                max_pixels=None,
            )
        else:
            source = open_file(
                job.source,
                bands=read.bands,
                scale=read.scale,
                max_pixels=read.max_pixels,
                nodata=read.nodata,
            )
        gsd = ground_sample_distance(source.georef, source.height, source.width)
        warning = scale_warning(read.gsd_m, gsd)
        if warning is not None:
            print(f"warning: {job.source}: {warning}", file=sys.stderr)
        return _Loaded(job, source=source)
    except ImageError as err:
        return _Loaded(job, error=f"{err.code}: {err}")
    except OSError as err:
        return _Loaded(job, error=f"cannot read: {err.strerror or err}")


def _prefetch(
    pool: ThreadPoolExecutor, jobs: Sequence[Job], read: ReadOptions, depth: int
) -> Iterator[_Loaded]:
    """Decode ahead in ``pool``, at most ``depth`` images in flight, results in job order."""
    pending: deque[Future[_Loaded]] = deque()
    queue = iter(jobs)
    for job in queue:
        pending.append(pool.submit(_load, job, read))
        if len(pending) >= depth:
            break
    while pending:
        item = pending.popleft().result()
        next_job = next(queue, None)
        if next_job is not None:
            pending.append(pool.submit(_load, next_job, read))
        yield item


def _chunks(items: Iterable[_Loaded], size: int) -> Iterator[list[_Loaded]]:
    chunk: list[_Loaded] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _segment(
    predictor: Predictor, items: list[_Loaded], write: WriteOptions, report: Report
) -> None:
    """Segment and write ``items``: same-sized pictures up to one tile share a forward pass;
    the rest are streamed one at a time. A failure skips only the images it concerns."""
    tile = predictor.options.tile
    small: dict[tuple[int, int], list[_Loaded]] = {}
    for item in items:
        source = item.source
        assert source is not None
        # Probabilities need each image's own softmax: those are streamed one by one.
        stackable = item.small and write.format != "probabilities"
        if stackable and source.height <= tile and source.width <= tile:
            small.setdefault((source.height, source.width), []).append(item)
        else:
            _guarded(
                predictor, [item], report, lambda item=item: _stream_one(predictor, item, write)
            )
    for group in small.values():
        _guarded(predictor, group, report, partial(_stack, predictor, group, write))


def _guarded(
    predictor: Predictor, items: list[_Loaded], report: Report, work: Callable[[], list[Path]]
) -> None:
    try:
        report.written.extend(work())
    except OSError as err:
        for item in items:
            _skip(report, item.job.source, f"cannot write: {err}")
    except (RuntimeError, ValueError, ImageError) as err:
        # e.g. CUDA out of memory on a huge scene: skip it, keep going with the others.
        if predictor.device.type == "cuda":
            torch.cuda.empty_cache()
        for item in items:
            _skip(report, item.job.source, f"inference failed: {first_line(err)}")


def _stack(predictor: Predictor, items: list[_Loaded], write: WriteOptions) -> list[Path]:
    """Same-sized pictures no larger than a tile: one forward pass, then each one's outputs."""
    images = [item.source.rgb for item in items]  # type: ignore[union-attr]
    stacked = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # (N, 3, H, W) uint8 view
    result = predictor.predict_batch(stacked)
    written: list[Path] = []
    for item, mask in zip(items, result.masks, strict=True):
        assert item.source is not None
        band = Band(0, mask, None, item.source.rgb)
        written.extend(write_outputs(predictor.label_map, item.job, item.source, [band], write))
    return written


def _stream_one(predictor: Predictor, item: _Loaded, write: WriteOptions) -> list[Path]:
    source = item.source
    assert source is not None
    with torch.inference_mode():
        bands = stream(
            source,
            predictor.run_batch,
            num_classes=predictor.num_classes,
            tiling=predictor.tiling,
            probabilities=write.format == "probabilities",
            ignore_index=predictor.label_map.ignore_index,
        )
        return write_outputs(predictor.label_map, item.job, source, bands, write)


def write_outputs(
    label_map: LabelMap,
    job: Job,
    source: SceneHeader,
    bands: Iterable[Band],
    write: WriteOptions,
) -> list[Path]:
    """Feed the bands of one scene (``source``'s size and georeference; bands in row order)
    to the writers of ``write.format``; returns the paths, each written whole or not at all."""
    fmt = write.format or ("cog" if source.georef.georeferenced else "png")
    target = job.output_path(fmt)
    target.parent.mkdir(parents=True, exist_ok=True)
    shape = (source.height, source.width)
    nodata = label_map.ignore_index if source.has_nodata else None
    writer: Any
    if fmt == "cog":
        writer = CogWriter(target, shape, source.georef, label_map, nodata=nodata)
    elif fmt == "probabilities":
        writer = CogWriter(target, shape, source.georef, label_map, kind="probabilities")
    elif fmt == "geojson":
        writer = PolygonWriter(
            source.georef,
            label_map,
            crs=write.crs,
            min_area=write.min_area,
            simplify=write.simplify,
        )
    else:
        writer = WholeScene(*shape)
    picture = WholeScene(*shape, rgb=True) if write.overlays else None
    try:
        for band in bands:
            writer.write(band)
            if picture is not None:
                picture.write(band)
            del band  # not held while the next band is computed
    except BaseException:
        if isinstance(writer, CogWriter):
            writer.abort()
        raise
    written = []
    if isinstance(writer, CogWriter):
        written.append(writer.close())
    elif isinstance(writer, PolygonWriter):
        text = json.dumps(writer.close(), separators=(",", ":"))
        written.append(_atomic_write(target, text.encode("utf-8")))
    else:
        written.append(_atomic_write(target, mask_to_png(writer.mask, label_map)))
    if picture is not None:
        assert picture.rgb is not None
        blended = overlay(picture.rgb, picture.mask, label_map, alpha=write.alpha)
        written.append(_atomic_write(job.overlay_path, encode_png(blended)))
    return written


def _atomic_write(path: Path, data: bytes) -> Path:
    # A run stopped half-way leaves whole files only, so --skip-existing can trust them.
    return atomic_write_bytes(path, data)


def _skip(report: Report, path: Path, reason: str) -> None:
    report.skipped.append((path, reason))
    tqdm.write(f"skipped {path}: {reason}", file=sys.stderr)


def bar_disabled(progress: bool | None) -> bool | None:
    """tqdm's ``disable`` for a ``progress`` choice: None hides the bar when stderr is not a
    terminal."""
    return None if progress is None else not progress


if __name__ == "__main__":
    sys.exit(main())
