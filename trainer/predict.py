"""Batch prediction: segment image files and folders offline with the service's engine.

    python -m trainer.predict --checkpoint runs/quickstart/best.pt scenes/ extra.jpg --out masks/
    python -m trainer.predict --checkpoint best.pt S2_scene.tif --bands 4,3,2 --scale 0,3000 \
        --out masks/ --overlay

Every image goes through :class:`shared.inference.Predictor`, the engine the service runs:
same normalisation, same padding of small images, same sliding-window tiling of large ones.
Same-sized images up to one tile are stacked ``--batch`` at a time into one forward pass;
larger ones are cut into tiles, ``--batch`` tiles a pass. Decoding runs in background threads
while the model works.

Folders are searched recursively for image files (.jpg, .jpeg, .png, .tif, .tiff, .webp, .bmp;
hidden files skipped); a file named on the command line is taken whatever its extension.

Outputs, under ``--out`` (sub-folders of an input folder are mirrored):

* ``<stem>.png``: single-channel class-id mask with the label colours as its palette;
* ``<stem>.tif`` instead, for georeferenced TIFF input: a single-band uint8 GeoTIFF with the
  input's CRS and geotransform (and colour table), to lay over the scene in a GIS;
* ``<stem>_overlay.png`` with ``--overlay``: the class colours blended over the image.

TIFF input of any band count and type is read as described in :mod:`shared.geotiff` (``--bands``,
``--scale``); its nodata pixels are written as ``ignore_index`` (255), the GeoTIFF's nodata value.

Nothing is ever written over an input: ``--out`` may not be an input folder or lie inside one (a
second run would otherwise read the first run's masks as images), and a planned output that is an
input file, or that two inputs would share (``a.jpg`` and ``a.png``), stops the run before any
work. Earlier outputs in ``--out`` are replaced (``--skip-existing`` keeps them). A file that
cannot be read or segmented is reported by name and skipped; the exit code is then 1.

Exit codes: 0 every file segmented, 1 some files skipped, 2 bad arguments or checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from shared.checkpoint import CheckpointError
from shared.geotiff import (
    GeoImage,
    RasterOptionError,
    Scale,
    decode_raster,
    mask_invalid,
    parse_bands,
    parse_scale,
    write_geotiff_mask,
)
from shared.imaging import DEFAULT_MAX_PIXELS, ImageError, encode_png
from shared.inference import PRECISIONS, InferenceOptions, Predictor
from shared.labels import overlay
from shared.tiling import ALIGN, pad_reflect
from trainer.dataset_layout import IMAGE_EXTENSIONS

EXIT_OK, EXIT_SKIPPED, EXIT_USAGE = 0, 1, 2
_TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
OVERLAY_SUFFIX = "_overlay"


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

    def mask_path(self, geotiff: bool) -> Path:
        return self.target.with_name(self.target.name + (".tif" if geotiff else ".png"))

    @property
    def overlay_path(self) -> Path:
        return self.target.with_name(self.target.name + OVERLAY_SUFFIX + ".png")

    def possible_outputs(self, overlays: bool) -> list[Path]:
        """Every path this job may write (the mask's suffix is known only after reading)."""
        paths = [self.mask_path(False)]
        if self.source.suffix.lower() in _TIFF_SUFFIXES:
            paths.append(self.mask_path(True))
        if overlays:
            paths.append(self.overlay_path)
        return paths


@dataclass(frozen=True)
class ReadOptions:
    """How input files are decoded (see :mod:`shared.geotiff` for ``bands`` and ``scale``)."""

    bands: tuple[int, ...] | None = None
    scale: Scale | str = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass
class Report:
    """What a run did: files written and files skipped, with the reason."""

    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)


@dataclass
class _Loaded:
    job: Job
    rgb: np.ndarray | None = None
    geo: GeoImage | None = None
    error: str | None = None


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
    _check_outputs(jobs, overlays=True)
    return jobs


def predict_files(
    predictor: Predictor,
    jobs: Sequence[Job],
    *,
    read: ReadOptions | None = None,
    overlays: bool = False,
    alpha: float = 0.5,
    batch: int = 4,
    skip_existing: bool = False,
    workers: int = 2,
    progress: bool | None = None,
) -> Report:
    """Segment every job's image and write its mask (and overlay).

    Args:
        predictor: the model on its device.
        jobs: from :func:`collect_jobs`.
        read: decoding options.
        overlays: also write ``<stem>_overlay.png``.
        alpha: class-colour weight of the overlays.
        batch: same-sized small images per forward pass.
        skip_existing: leave jobs whose mask already exists untouched.
        workers: decoding threads.
        progress: a tqdm bar; None shows it only on a terminal.

    Returns:
        The files written and the inputs skipped (unreadable, or failed to segment or write).
    """
    read = read or ReadOptions()
    report = Report()
    _check_outputs(jobs, overlays)
    todo = []
    for job in jobs:
        if skip_existing and any(p.exists() for p in job.possible_outputs(False)):
            report.kept.append(job.source)
        else:
            todo.append(job)

    bar = tqdm(total=len(todo), unit="img", desc="predict", disable=_bar_disabled(progress))
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="decode") as pool:
        depth = batch + max(1, workers)  # decoded images waiting: bounds host memory
        for chunk in _chunks(_prefetch(pool, todo, read, depth=depth), batch):
            for item in chunk:
                if item.error is not None:
                    _skip(report, item.job.source, item.error)
            good = [item for item in chunk if item.error is None]
            for item, mask in _segment(predictor, good, report):
                try:
                    report.written.extend(_write(item, mask, predictor, overlays, alpha))
                except OSError as err:
                    _skip(report, item.job.source, f"cannot write: {err}")
            bar.update(len(chunk))
    bar.close()
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 files skipped, 2 usage/checkpoint errors)."""
    args = build_parser().parse_args(argv)
    try:
        read = ReadOptions(
            bands=parse_bands(args.bands), scale=parse_scale(args.scale), max_pixels=args.max_pixels
        )
        jobs = collect_jobs(args.inputs, args.out)
        options = InferenceOptions(
            device=args.device,
            precision=args.precision,
            tile=args.tile,
            overlap=args.overlap,
            tile_batch=args.batch,
        )
        predictor = Predictor.from_checkpoint(args.checkpoint, options)
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
            overlays=args.overlay,
            alpha=args.alpha,
            batch=args.batch,
            skip_existing=args.skip_existing,
            workers=args.workers,
        )
    except KeyboardInterrupt:
        # Outputs are written atomically, so every file already there is complete.
        print("interrupted; continue with --skip-existing", file=sys.stderr)
        return 130
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
    parser.add_argument("--overlay", action="store_true", help="also write <stem>_overlay.png")
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay colour weight, 0..1")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    defaults = InferenceOptions()
    parser.add_argument("--tile", type=int, default=defaults.tile, help="tile side (x32)")
    parser.add_argument("--overlap", type=int, default=defaults.overlap, help="tile overlap")
    parser.add_argument(
        "--batch",
        type=int,
        default=defaults.tile_batch,
        help="images (same size, up to one tile) or tiles per forward pass",
    )
    parser.add_argument("--bands", default=None, help="TIFF bands for R,G,B, 1-based (4,3,2)")
    parser.add_argument(
        "--scale",
        default="auto",
        help="TIFF value scaling: auto, minmax, percentile:LOW,HIGH or LOW,HIGH (e.g. 0,3000)",
    )
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    parser.add_argument("--skip-existing", action="store_true", help="keep masks already written")
    parser.add_argument("--workers", type=int, default=2, help="decoding threads")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser


# -- internals ---------------------------------------------------------------------------------


def _is_image_file(path: Path) -> bool:
    # Hidden files are skipped: "._x.jpg" is macOS metadata, not an image.
    return (
        path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file() and not path.name.startswith(".")
    )


def _check_outputs(jobs: Sequence[Job], overlays: bool) -> None:
    """Refuse plans where an output is an input, or two inputs share an output."""
    inputs = {job.source.resolve(): job.source for job in jobs}
    owners: dict[Path, Path] = {}
    for job in jobs:
        for path in job.possible_outputs(overlays):
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
    try:
        data = job.source.read_bytes()
        rgb, geo = decode_raster(
            data, bands=read.bands, scale=read.scale, max_pixels=read.max_pixels
        )
        return _Loaded(job, rgb=rgb, geo=geo)
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
    predictor: Predictor, items: list[_Loaded], report: Report
) -> Iterator[tuple[_Loaded, np.ndarray]]:
    """Masks for ``items``: same-sized images up to one tile share a forward pass; larger ones
    are tiled by the predictor. A failure skips only the images of that pass."""
    tile = predictor.options.tile
    runs: list[list[_Loaded]] = []
    small: dict[tuple[int, int], list[_Loaded]] = {}
    for item in items:
        assert item.rgb is not None
        height, width = item.rgb.shape[:2]
        if height <= tile and width <= tile:
            small.setdefault((height, width), []).append(item)
        else:
            runs.append([item])
    runs.extend(small.values())
    for run in runs:
        images = [item.rgb for item in run if item.rgb is not None]
        try:
            if len(images) == 1:
                masks = [predictor.segment(images[0])]
            else:
                masks = _segment_stack(predictor, images)
        except (RuntimeError, ValueError) as err:
            # e.g. CUDA out of memory on a huge scene: skip it, keep going with the others.
            if predictor.device.type == "cuda":
                torch.cuda.empty_cache()
            for item in run:
                _skip(report, item.job.source, f"inference failed: {_first_line(err)}")
            continue
        yield from zip(run, masks, strict=True)


def _segment_stack(predictor: Predictor, images: list[np.ndarray]) -> list[np.ndarray]:
    """Same-sized ``(H, W, 3)`` uint8 images no larger than a tile -> their ``(H, W)`` masks.

    Exactly what ``segment_tiled`` does with one such image (mirror-pad to a multiple of 32, one
    forward pass, argmax of the crop), for ``len(images)`` images in one pass.
    """
    height, width = images[0].shape[:2]
    stacked = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # (N, 3, H, W) uint8 view
    # Only uint8 crosses to the device; the padding happens there.
    batch = pad_reflect(predictor.to_device(stacked), _round_up(height), _round_up(width))
    with torch.inference_mode():
        logits = predictor.run_batch(batch)
        masks = logits[:, :, :height, :width].argmax(dim=1).to(torch.uint8).cpu().numpy()
    return list(masks)


def _write(
    item: _Loaded, mask: np.ndarray, predictor: Predictor, overlays: bool, alpha: float
) -> list[Path]:
    label_map = predictor.label_map
    geo = item.geo
    written: list[Path] = []
    mask = mask_invalid(mask, geo, label_map.ignore_index)
    if geo is not None and geo.georeferenced:
        nodata = label_map.ignore_index if geo.valid is not None else None
        data = write_geotiff_mask(mask, geo.profile, label_map=label_map, nodata=nodata)
        written.append(_atomic_write(item.job.mask_path(True), data))
    else:
        written.append(
            _atomic_write(item.job.mask_path(False), encode_png(mask, label_map.palette()))
        )
    if overlays:
        assert item.rgb is not None
        blended = overlay(item.rgb, mask, label_map, alpha=alpha)
        written.append(_atomic_write(item.job.overlay_path, encode_png(blended)))
    return written


def _atomic_write(path: Path, data: bytes) -> Path:
    # A run stopped half-way leaves whole files only, so --skip-existing can trust them.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _skip(report: Report, path: Path, reason: str) -> None:
    report.skipped.append((path, reason))
    tqdm.write(f"skipped {path}: {reason}", file=sys.stderr)


def _bar_disabled(progress: bool | None) -> bool | None:
    # tqdm: disable=None hides the bar when stderr is not a terminal.
    return None if progress is None else not progress


def _round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
