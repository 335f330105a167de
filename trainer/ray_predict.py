"""``trainer.predict --ray ADDRESS``: the same prediction, spread over a Ray cluster with Ray Data
(commands, addresses, cluster set-up and resuming: the README's "Scaling out on Ray").

Work units are whole images, and blocks of GDAL rasters larger than ``--block-size``
(:mod:`shared.blocks`: whole tiles plus the tiles straddling their edges, so blocks join without
seams). They stream through Ray Data::

    units --read (CPU tasks: shared.raster windows)--> pixels
          --Segmenter (actor pool: checkpoint loaded once per actor)--> masks
          --write (CPU tasks)--> the outputs of whole images; a part file per block

Part files, their assembly and the manifest: docs/inference-path.md, "On Ray".
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
import warnings
import zlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window as RioWindow
from tqdm import tqdm

from shared.bands import Collar
from shared.blocks import Block, plan_blocks, segment_block
from shared.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from shared.datasets import PICTURE_EXTENSIONS
from shared.files import atomic_path, atomic_writer
from shared.imaging import ImageError
from shared.inference import InferenceOptions, Predictor
from shared.labels import LabelMap
from shared.messages import first_line
from shared.pipeline import Band, Tiling, predict
from shared.raster import (
    ArrayRaster,
    GdalRaster,
    Georef,
    RasterSource,
    Rows,
    SceneStatistics,
    close_source,
    open_file,
    read_all,
)
from trainer.predict import (
    EXIT_USAGE,
    Job,
    ReadOptions,
    Report,
    WriteOptions,
    bar_disabled,
    print_report,
    write_outputs,
)
from trainer.ray_options import DEFAULT_BLOCK_SIZE

STATE_DIR = ".satseg-ray"
# Set to "0", Ray runs single-machine clusters on the loopback interface alone.
LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
MANIFEST_VERSION = 1
# Reading and writing are light beside the model: two of them share a CPU.
IO_CPUS = 0.5
# Rows of a scene assembled at a time from its part files.
STRIP_ROWS = 512
MANIFEST_SAVE_SECONDS = 1.0


@dataclass(frozen=True)
class PackedStatistics:
    """A scene's :class:`shared.raster.SceneStatistics`, the collar bit-packed and deflated
    (kilobytes for a typical collar, where the traced array holds a byte per pixel up to 16 MP),
    so that every block carries it and no read task traces the collar of the whole scene again.

    Attributes:
        stretch: per band, the ``(low, high)`` mapped to 0..255.
        collar: ``(cells rows, cells columns, scene height, scene width)``; None without a
            traced collar.
        cells: the collar's cells, ``np.packbits`` then deflated.
    """

    stretch: tuple[tuple[float, float], ...]
    collar: tuple[int, int, int, int] | None = None
    cells: bytes = b""

    @classmethod
    def pack(cls, statistics: SceneStatistics) -> PackedStatistics:
        collar = statistics.collar
        if collar is None:
            return cls(statistics.stretch)
        rows, cols = collar.cells.shape
        cells = zlib.compress(np.packbits(collar.cells).tobytes(), 1)
        return cls(statistics.stretch, (rows, cols, collar.height, collar.width), cells)

    def unpack(self) -> SceneStatistics:
        if self.collar is None:
            return SceneStatistics(None, self.stretch)
        rows, cols, height, width = self.collar
        bits = np.frombuffer(zlib.decompress(self.cells), dtype=np.uint8)
        grid = np.unpackbits(bits, count=rows * cols).astype(bool).reshape(rows, cols)
        return SceneStatistics(Collar(grid, height, width), self.stretch)


@dataclass(frozen=True)
class Scene:
    """What the writers need of an input besides its pixels (a ``trainer.predict.SceneHeader``),
    and what its blocks' reads need of the whole scene."""

    height: int
    width: int
    georef: Georef
    has_nodata: bool
    statistics: PackedStatistics | None = None


@dataclass(frozen=True)
class Unit:
    """One piece of work: a whole image (``block`` None) or a block of a scene."""

    job: Job
    block: Block | None = None
    scene: Scene | None = None

    @property
    def key(self) -> str:
        source = str(self.job.source)
        return source if self.block is None else f"{source}#{self.block.index}"


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a run goes.

    Attributes:
        address: "local", "auto" or a cluster address.
        actors: model replicas; None: one per GPU of the cluster, else one per ``threads``
            CPUs, keeping one CPU for reading and writing.
        threads: torch threads of a CPU actor (and the CPUs it reserves).
        block_size: scenes larger than this many pixels a side are cut into blocks.
    """

    address: str
    actors: int | None = None
    threads: int = 1
    block_size: int = DEFAULT_BLOCK_SIZE


@dataclass
class RunSummary:
    """Units of a run: how many there were, computed now, taken from the manifest, failed."""

    total: int = 0
    computed: int = 0
    reused: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    pixels: int = 0
    seconds: float = 0.0

    def rate(self, seconds: float) -> str:
        """The pixels computed so far over ``seconds``, as "N.NN Mpx/s"."""
        return f"{self.pixels / 1e6 / max(seconds, 1e-9):.2f} Mpx/s"


def main_on_ray(
    args: argparse.Namespace,
    jobs: Sequence[Job],
    *,
    read: ReadOptions,
    write: WriteOptions,
    options: InferenceOptions,
) -> int:
    """``trainer.predict`` with ``--ray``: returns its exit code."""
    problem = _prepare_ray(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        checkpoint = load_checkpoint(args.checkpoint)
        _, label_map, _ = model_from_checkpoint(checkpoint, device="cpu")
    except CheckpointError as err:
        print(f"error: {args.checkpoint}: {err}", file=sys.stderr)
        return EXIT_USAGE
    ray_options = RayOptions(
        address=args.ray,
        actors=args.ray_actors,
        threads=args.threads or 1,
        block_size=args.block_size,
    )
    fingerprint = _fingerprint(Path(args.checkpoint), options, read, write, ray_options)
    try:
        report, summary = predict_on_ray(
            checkpoint,
            label_map,
            jobs,
            out=Path(args.out),
            options=options,
            read=read,
            write=write,
            ray_options=ray_options,
            fingerprint=fingerprint,
            skip_existing=args.skip_existing,
        )
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(
        f"ray: {summary.total} unit(s): {summary.computed} computed, {summary.reused} reused "
        f"from the manifest, {len(summary.failed)} failed; {summary.seconds:.1f} s, "
        f"{summary.rate(summary.seconds)}",
        file=sys.stderr,
    )
    return print_report(jobs, report)


def _prepare_ray(args: argparse.Namespace) -> str | None:
    """Check the ``--ray`` arguments and import Ray; what is wrong, or None."""
    if args.ray_actors is not None and args.ray_actors < 1:
        return "--ray-actors must be at least 1"
    if args.block_size < 1:
        return "--block-size must be positive"
    if args.ray == "local" and "ray" not in sys.modules:
        # A one-machine cluster: Ray then advertises and binds 127.0.0.1 only (its switch for
        # single-machine use); otherwise it listens on every interface of the host.
        os.environ.setdefault(LOOPBACK_ONLY_ENV, "0")
    try:
        import ray  # noqa: F401
    except ImportError:
        return "--ray needs Ray: pip install 'satseg[ray]'"
    return None


def predict_on_ray(
    checkpoint: dict,
    label_map: LabelMap,
    jobs: Sequence[Job],
    *,
    out: Path,
    options: InferenceOptions,
    read: ReadOptions,
    write: WriteOptions,
    ray_options: RayOptions,
    fingerprint: dict[str, Any],
    skip_existing: bool = False,
    progress: bool | None = None,
) -> tuple[Report, RunSummary]:
    """Segment ``jobs`` on Ray (see the module docstring); the files written, the inputs
    skipped, and the run's unit counts."""
    import ray

    report = Report()
    summary = RunSummary()
    if skip_existing:
        jobs = _unwritten(jobs, write, report)
    tiling = Tiling(options.tile, options.overlap, options.tile_batch)
    units, failures = plan_units(jobs, read, tiling, ray_options.block_size)
    for source, reason in failures:
        _skip(report, summary, source, reason)
    state = out / STATE_DIR
    manifest = Manifest.load(state / "manifest.json", fingerprint)
    todo = _not_done(units, manifest, report, summary)
    summary.total = len(units)

    started = _connect(ray_options)
    try:
        assembly = Assembly(ray, units, manifest, state / "parts", label_map, write)
        return _run(
            ray,
            checkpoint,
            todo,
            assembly,
            options=options,
            read=read,
            ray_options=ray_options,
            report=report,
            summary=summary,
            progress=progress,
        )
    finally:
        manifest.save()
        if started:
            ray.shutdown()


def _unwritten(jobs: Sequence[Job], write: WriteOptions, report: Report) -> list[Job]:
    """``--skip-existing``: the jobs with no output yet; the others join ``report.kept``."""
    todo: list[Job] = []
    for job in jobs:
        if any(p.exists() for p in job.possible_outputs(write.format, False)):
            report.kept.append(job.source)
        else:
            todo.append(job)
    return todo


def _not_done(
    units: Sequence[Unit], manifest: Manifest, report: Report, summary: RunSummary
) -> list[Unit]:
    """The units a stopped run left to do; the outputs it finished join ``report``."""
    todo: list[Unit] = []
    for unit in units:
        source = str(unit.job.source)
        if manifest.has(source):  # an image written, or a scene already assembled
            if unit.block is None or unit.block.index == 0:
                report.written.extend(Path(p) for p in manifest.outputs[source])
            summary.reused += 1
        elif manifest.has(unit.key):
            summary.reused += 1
        else:
            todo.append(unit)
    return todo


def plan_units(
    jobs: Sequence[Job], read: ReadOptions, tiling: Tiling, block_size: int
) -> tuple[list[Unit], list[tuple[Path, str]]]:
    """Whole images and blocks of large GDAL rasters; and the inputs that cannot be opened.

    Only rasters GDAL reads window by window are opened here (their header and stretch);
    pictures are decoded by the read tasks alone.
    """
    units: list[Unit] = []
    failures: list[tuple[Path, str]] = []
    for job in jobs:
        # Decoded whole wherever they are read; only GDAL rasters are cut into blocks.
        if job.source.suffix.lower() in PICTURE_EXTENSIONS:
            units.append(Unit(job))
            continue
        try:
            source = open_input(job.source, read)
        except ImageError as err:
            failures.append((job.source, f"{err.code}: {err}"))
            continue
        except OSError as err:
            failures.append((job.source, f"cannot read: {err.strerror or err}"))
            continue
        try:
            blocks = plan_blocks(source.height, source.width, tiling, block_size)
            if not isinstance(source, GdalRaster) or len(blocks) == 1:
                units.append(Unit(job))
                continue
            statistics = PackedStatistics.pack(source.statistics)
            scene = Scene(source.height, source.width, source.georef, source.has_nodata, statistics)
            units.extend(Unit(job, block, scene) for block in blocks)
        finally:
            close_source(source)
    return units, failures


def open_input(
    path: Path, read: ReadOptions, statistics: SceneStatistics | None = None
) -> RasterSource:
    """An input opened as ``trainer.predict`` opens it (8-bit RGB models: ``--ray`` refuses
    others); ``statistics``, the scene's, spare a block's read the whole-scene reads."""
    return open_file(
        path,
        bands=read.bands,
        scale=read.scale,
        max_pixels=read.max_pixels,
        nodata=read.nodata,
        statistics=statistics,
    )


# -- the stages --------------------------------------------------------------------------------


def read_unit(row: dict[str, Any], read: ReadOptions) -> dict[str, Any]:
    """Ray Data map: a unit -> its pixels (a block's read window, or the whole image)."""
    unit: Unit = row["unit"]
    empty = {"rgb": np.zeros((0, 0, 3), np.uint8), "valid": np.zeros((0, 0), bool)}
    statistics = None
    if unit.scene is not None and unit.scene.statistics is not None:
        statistics = unit.scene.statistics.unpack()
    try:
        source = open_input(unit.job.source, read, statistics)
        try:
            if unit.block is None:
                rows = read_all(source)
                scene = Scene(source.height, source.width, source.georef, source.has_nodata)
                unit = replace(unit, scene=scene)
            elif isinstance(source, GdalRaster):
                w = unit.block.read
                rows = source.read_window(w.row, w.col, w.height, w.width)
            else:
                raise ImageError("the raster is no longer readable window by window")
        finally:
            close_source(source)
    except ImageError as err:
        return {"unit": unit, **empty, "nodata": False, "error": f"{err.code}: {err}"}
    except OSError as err:
        return {"unit": unit, **empty, "nodata": False, "error": f"cannot read: {err}"}
    # Ray Data columns hold arrays; "all valid" travels as a flag beside a full mask.
    valid = rows.valid if rows.valid is not None else np.ones(rows.rgb.shape[:2], bool)
    return {
        "unit": unit,
        "rgb": rows.rgb,
        "valid": valid,
        "nodata": rows.valid is not None,
        "error": "",
    }


class Segmenter:
    """Ray Data actor: the model, loaded once, segmenting one unit per call."""

    def __init__(
        self,
        checkpoint: Any,
        options: InferenceOptions,
        threads: int,
        probabilities: bool,
        overlays: bool,
    ) -> None:
        import ray

        if isinstance(checkpoint, ray.ObjectRef):
            checkpoint = ray.get(checkpoint)
        if options.device == "auto" or options.device.startswith("cpu"):
            torch.set_num_threads(threads)
        self.predictor = Predictor.from_checkpoint(checkpoint, options)
        self.probabilities = probabilities
        self.overlays = overlays

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        unit: Unit = batch["unit"][0]
        error = str(batch["error"][0])
        mask = np.zeros((0, 0), np.uint8)
        probs = np.zeros((0, 0, 0), np.uint8)
        rgb = np.zeros((0, 0, 3), np.uint8)
        if not error:
            image = batch["rgb"][0]
            rows = Rows(image, batch["valid"][0] if batch["nodata"][0] else None)
            try:
                prediction = self._predict(unit, rows)
            except (RuntimeError, ValueError) as err:
                error = f"inference failed: {first_line(err)}"
            else:
                mask = prediction.mask
                if prediction.probabilities is not None:
                    probs = prediction.probabilities
                if self.overlays:
                    core = unit.block.core if unit.block is not None else None
                    rgb = image if core is None else _crop(image, unit.block)
        return {
            "unit": np.array([unit], dtype=object),
            "mask": mask[None],
            "probabilities": probs[None],
            "rgb": rgb[None],
            "error": np.array([error]),
        }

    def _predict(self, unit: Unit, rows: Rows) -> Any:
        p = self.predictor
        kw = {
            "num_classes": p.num_classes,
            "tiling": p.tiling,
            "probabilities": self.probabilities,
            "ignore_index": p.label_map.ignore_index,
        }
        with torch.inference_mode():
            if unit.block is None:
                return predict(ArrayRaster(rows.rgb, rows.valid), p.run_batch, **kw)
            return segment_block(rows, unit.block, p.run_batch, **kw)


def write_unit(
    row: dict[str, Any], label_map: LabelMap, write: WriteOptions, parts: Path
) -> dict[str, Any]:
    """Ray Data map: a whole image's outputs, or a block's part file."""
    unit: Unit = row["unit"]
    error = str(row["error"])
    paths: list[str] = []
    if not error:
        mask = row["mask"]
        probs = row["probabilities"] if row["probabilities"].size else None
        rgb = row["rgb"] if row["rgb"].size else np.zeros((0, 0, 3), np.uint8)
        try:
            if unit.block is None:
                assert unit.scene is not None
                band = Band(0, mask, probs, rgb)
                paths = [
                    str(p) for p in write_outputs(label_map, unit.job, unit.scene, [band], write)
                ]
            else:
                path = part_path(parts, unit)
                paths = [str(write_part(path, mask, probs, rgb if rgb.size else None))]
        except OSError as err:
            error = f"cannot write: {err}"
        except (RuntimeError, ValueError) as err:
            error = f"cannot write: {first_line(err)}"
    pixels = int(mask.size) if not error else 0
    return {"key": unit.key, "paths": paths, "error": error, "pixels": pixels}


def part_path(parts: Path, unit: Unit) -> Path:
    """Where a block's part file goes: one folder per scene, one file per block."""
    assert unit.block is not None
    digest = hashlib.sha1(str(unit.job.source.resolve()).encode()).hexdigest()[:16]
    return parts / f"{unit.job.source.stem}-{digest}" / f"{unit.block.index:06d}.tif"


def write_part(
    path: Path, mask: np.ndarray, probs: np.ndarray | None, rgb: np.ndarray | None
) -> Path:
    """A block's mask (then its probabilities, then its RGB for overlays) as the bands of one
    GeoTIFF, renamed into place when complete."""
    planes = [mask[None]]
    if probs is not None:
        planes.append(probs)
    if rgb is not None:
        planes.append(np.moveaxis(rgb, -1, 0))
    data = np.concatenate(planes)
    profile = {
        "driver": "GTiff",
        "width": data.shape[2],
        "height": data.shape[1],
        "count": data.shape[0],
        "dtype": "uint8",
        "compress": "deflate",
        "ZLEVEL": 1,
    }
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(data)
    return path


def assemble_scene(
    job: Job,
    scene: Scene,
    blocks: Sequence[tuple[Block, Path]],
    label_map: LabelMap,
    write: WriteOptions,
) -> list[str]:
    """A scene's part files -> its outputs, :data:`STRIP_ROWS` rows at a time."""
    bands = scene_bands(blocks, probabilities=write.format == "probabilities", classes=label_map)
    return [str(p) for p in write_outputs(label_map, job, scene, bands, write)]


def scene_bands(
    blocks: Sequence[tuple[Block, Path]], *, probabilities: bool, classes: LabelMap
) -> Iterator[Band]:
    """Full-width bands of rows read back from the part files of a scene's blocks."""
    rows: dict[int, list[tuple[Block, Path]]] = defaultdict(list)
    for block, path in blocks:
        rows[block.core.row].append((block, path))
    count = classes.num_classes
    for row in sorted(rows):
        group = sorted(rows[row], key=lambda item: item[0].core.col)
        height = group[0][0].core.height
        with contextlib.ExitStack() as stack, warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            files = [stack.enter_context(rasterio.open(path)) for _, path in group]
            for top in range(0, height, STRIP_ROWS):
                n = min(STRIP_ROWS, height - top)
                data = np.concatenate(
                    [f.read(window=RioWindow(0, top, f.width, n)) for f in files], axis=2
                )
                probs = data[1 : 1 + count] if probabilities else None
                has_rgb = data.shape[0] - 1 - (count if probabilities else 0) == 3
                rgb = np.moveaxis(data[-3:], 0, -1) if has_rgb else np.zeros((0, 0, 3), np.uint8)
                yield Band(row + top, np.ascontiguousarray(data[0]), probs, rgb)


# -- the driver --------------------------------------------------------------------------------


class Manifest:
    """Finished units and outputs of a run, rewritten atomically as they come.

    ``units``: unit key -> its files; ``outputs``: input path -> the outputs written for it.
    An entry whose files are gone counts as not done.
    """

    def __init__(self, path: Path, fingerprint: dict[str, Any]) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self.units: dict[str, list[str]] = {}
        self.outputs: dict[str, list[str]] = {}
        self._saved = 0.0
        self._dirty = False

    @classmethod
    def load(cls, path: Path, fingerprint: dict[str, Any]) -> Manifest:
        manifest = cls(path, fingerprint)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return manifest
        if data.get("version") == MANIFEST_VERSION and data.get("fingerprint") == fingerprint:
            manifest.units = dict(data.get("units", {}))
            manifest.outputs = dict(data.get("outputs", {}))
        return manifest

    def has(self, key: str) -> bool:
        paths = self.outputs.get(key) if key in self.outputs else self.units.get(key)
        return paths is not None and all(Path(p).exists() for p in paths)

    def mark_unit(self, key: str, paths: Sequence[str]) -> None:
        self.units[key] = list(paths)
        self._changed()

    def mark_output(self, source: str, paths: Sequence[str], unit_keys: Sequence[str]) -> None:
        self.outputs[source] = list(paths)
        for key in unit_keys:
            self.units.pop(key, None)
        self._changed()

    def save(self, *, force: bool = True) -> None:
        if not self._dirty or (
            not force and time.monotonic() - self._saved < MANIFEST_SAVE_SECONDS
        ):
            return
        data = {
            "version": MANIFEST_VERSION,
            "fingerprint": self.fingerprint,
            "units": self.units,
            "outputs": self.outputs,
        }
        # Durable: the record a resumed run trusts; a driver killed mid-write leaves the old one.
        with atomic_writer(self.path, durable=True) as f:
            f.write(json.dumps(data, indent=1).encode())
        self._saved, self._dirty = time.monotonic(), False

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        self._dirty = False

    def _changed(self) -> None:
        self._dirty = True
        self.save(force=False)


class Assembly:
    """The scenes cut into blocks, each assembled by a Ray task once all its blocks are done."""

    def __init__(
        self,
        ray: Any,
        units: Sequence[Unit],
        manifest: Manifest,
        parts: Path,
        label_map: LabelMap,
        write: WriteOptions,
    ) -> None:
        self.ray = ray
        self.manifest = manifest
        self.parts = parts
        self.label_map = label_map
        self.write = write
        self.scenes: dict[Path, list[Unit]] = defaultdict(list)
        for unit in units:
            if unit.block is not None:
                self.scenes[unit.job.source].append(unit)
        self.failed: set[Path] = set()  # scenes with a failed block: never assembled
        self._task = ray.remote(num_cpus=IO_CPUS, max_retries=3)(assemble_scene)
        self._running: dict[Any, Path] = {}

    def ready(self, source: Path) -> bool:
        return source not in self.failed and all(
            self.manifest.has(u.key) for u in self.scenes[source]
        )

    def start(self, source: Path) -> None:
        units = self.scenes[source]
        blocks = [(u.block, part_path(self.parts, u)) for u in units]
        ref = self._task.remote(units[0].job, units[0].scene, blocks, self.label_map, self.write)
        self._running[ref] = source

    def start_resumed(self) -> None:
        """Scenes whose blocks were all done before a stop need only their assembly."""
        for source in self.scenes:
            if not self.manifest.has(str(source)) and self.ready(source):
                self.start(source)

    def collect(self, report: Report, summary: RunSummary) -> None:
        """Wait for every assembly started; book its outputs or its failure."""
        for ref, source in self._running.items():
            _collect_scene(
                self.ray, ref, self.scenes[source], source, self.manifest, report, summary
            )


def _run(
    ray: Any,
    checkpoint: dict,
    todo: list[Unit],
    assembly: Assembly,
    *,
    options: InferenceOptions,
    read: ReadOptions,
    ray_options: RayOptions,
    report: Report,
    summary: RunSummary,
    progress: bool | None,
) -> tuple[Report, RunSummary]:
    from ray.data import DataContext

    started = time.perf_counter()
    context = DataContext.get_current()
    context.enable_progress_bars = False  # the driver's own bar counts units
    context.print_on_execution_start = False

    assembly.start_resumed()
    bar = tqdm(
        total=summary.total,
        initial=summary.reused,
        unit="unit",
        desc="predict (ray)",
        disable=bar_disabled(progress),
    )
    if todo:
        # Held for the whole run: a restarted actor reads the checkpoint from it again.
        checkpoint_ref = ray.put(checkpoint)
        dataset = _dataset(ray, todo, checkpoint_ref, assembly, options, read, ray_options)
        by_key = {u.key: u for u in todo}
        for row in dataset.iter_rows():
            unit = by_key[row["key"]]
            block_done = _record(row, unit, assembly.manifest, report, summary, assembly.failed)
            if block_done and assembly.ready(unit.job.source):
                assembly.start(unit.job.source)
            bar.update(1)
            bar.set_postfix_str(summary.rate(time.perf_counter() - started))
    bar.close()
    assembly.collect(report, summary)
    summary.seconds = time.perf_counter() - started
    if not report.skipped:
        # Finished: a later run with the same arguments computes afresh, like trainer.predict.
        assembly.manifest.remove()
        with contextlib.suppress(OSError):
            _remove_empty(assembly.parts)
    return report, summary


def _dataset(
    ray: Any,
    todo: list[Unit],
    checkpoint_ref: Any,
    assembly: Assembly,
    options: InferenceOptions,
    read: ReadOptions,
    ray_options: RayOptions,
) -> Any:
    """The units through Ray Data: read (CPU tasks) -> Segmenter (actor pool) -> write."""
    actors, resources = _actor_pool(ray, options, ray_options)
    write, label_map, parts = assembly.write, assembly.label_map, assembly.parts
    return (
        ray.data.from_items([{"unit": u} for u in todo], override_num_blocks=len(todo))
        .map(read_unit, fn_kwargs={"read": read}, num_cpus=IO_CPUS)
        .map_batches(
            Segmenter,
            fn_constructor_kwargs={
                "checkpoint": checkpoint_ref,
                "options": options,
                "threads": ray_options.threads,
                "probabilities": write.format == "probabilities",
                "overlays": write.overlays,
            },
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            **resources,
        )
        .map(
            write_unit,
            fn_kwargs={"label_map": label_map, "write": write, "parts": parts},
            num_cpus=IO_CPUS,
        )
    )


def _record(
    row: dict[str, Any],
    unit: Unit,
    manifest: Manifest,
    report: Report,
    summary: RunSummary,
    failed_scenes: set[Path],
) -> bool:
    """Book one unit's result (a scene's first failure is reported); True for a finished block."""
    source = unit.job.source
    paths = [str(p) for p in row["paths"]]
    error = str(row["error"])
    if error:
        summary.failed[unit.key] = error
        if source not in failed_scenes:
            reason = error if unit.block is None else f"block {unit.block.index}: {error}"
            _skip(report, summary, source, reason, count=False)
            failed_scenes.add(source)
        return False
    summary.computed += 1
    summary.pixels += int(row["pixels"])
    if unit.block is None:
        report.written.extend(Path(p) for p in paths)
        manifest.mark_output(str(source), paths, [])
        return False
    manifest.mark_unit(unit.key, paths)
    return True


def _collect_scene(
    ray: Any,
    ref: Any,
    units: list[Unit],
    source: Path,
    manifest: Manifest,
    report: Report,
    summary: RunSummary,
) -> None:
    """Wait for a scene's assembly; on success drop its part files and record its outputs."""
    try:
        written = ray.get(ref)
    except Exception as err:  # a Ray task error wraps whatever the writer raised
        _skip(report, summary, source, f"cannot assemble: {first_line(err)}")
        return
    report.written.extend(Path(p) for p in written)
    keys = [u.key for u in units]
    for key in keys:
        for part in manifest.units.get(key, []):
            Path(part).unlink(missing_ok=True)
    manifest.mark_output(str(source), written, keys)


def _actor_pool(ray: Any, options: InferenceOptions, ray_options: RayOptions) -> tuple[int, dict]:
    """How many model actors, and what each reserves."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    use_gpu = gpus > 0 and not options.device.startswith("cpu")
    if use_gpu:
        return ray_options.actors or gpus, {"num_gpus": 1}
    cpus = int(resources.get("CPU", 1))
    default = max(1, (cpus - 1) // ray_options.threads)
    return ray_options.actors or default, {"num_cpus": ray_options.threads}


def _connect(ray_options: RayOptions) -> bool:
    """Join or start the cluster; True when this call started Ray (and must stop it)."""
    import ray

    if ray.is_initialized():
        return False
    if ray_options.address == "local":
        # Model actors and a spare CPU for the reading and writing tasks.
        wanted = (ray_options.actors or 1) * ray_options.threads + 1
        cpus = max(os.cpu_count() or 1, wanted)
        ray.init(
            num_cpus=cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
        )
    else:
        ray.init(address=ray_options.address, log_to_driver=False)
    return True


def _fingerprint(
    checkpoint: Path,
    options: InferenceOptions,
    read: ReadOptions,
    write: WriteOptions,
    ray_options: RayOptions,
) -> dict[str, Any]:
    """What decides a run's outputs: a manifest from a run with another fingerprint is void."""
    stat = checkpoint.stat()
    return json.loads(
        json.dumps(
            {
                "checkpoint": [str(checkpoint.resolve()), stat.st_size, stat.st_mtime_ns],
                "inference": asdict(options),
                "read": asdict(read),
                "write": asdict(write),
                "block_size": ray_options.block_size,
            },
            default=str,
        )
    )


def _crop(image: np.ndarray, block: Block) -> np.ndarray:
    core, read = block.core, block.read
    r, c = core.row - read.row, core.col - read.col
    return np.ascontiguousarray(image[r : r + core.height, c : c + core.width])


def _skip(
    report: Report, summary: RunSummary, source: Path, reason: str, *, count: bool = True
) -> None:
    report.skipped.append((source, reason))
    if count:
        summary.failed[str(source)] = reason
    tqdm.write(f"skipped {source}: {reason}", file=sys.stderr)


def _remove_empty(folder: Path) -> None:
    for child in sorted(folder.rglob("*"), reverse=True):
        if child.is_dir():
            child.rmdir()
    folder.rmdir()
    folder.parent.rmdir()
