"""Inference benchmark: plain torchvision against the project's engine and the running service.

    python -m benchmarks.inference [--quick] [--json PATH] [--checkpoint PATH]

One run, the same real inputs (512x512 crops of the Blue Marble mosaic from the bundled test
band, 100E..180E) and the same checkpoint:

1. **baseline**: torchvision DeepLabV3 (the checkpoint's backbone) in eager fp32, batch 1,
   under ``torch.inference_mode()`` -- what a user gets by default;
2. **candidates**: each optimisation of :mod:`shared.acceleration` on its own (batch 1) with
   its agreement against fp32: pixels, and each class's IoU, on the test band's tiles and one
   tile from each of :data:`AGREEMENT_REGIONS`;
3. **engine**: :class:`shared.inference.Predictor` built exactly as the service builds it
   (its ``SATSEG_*`` settings), at batch 1, 4 and 8; then the **peers** of
   :mod:`benchmarks.peers` (ONNX Runtime, OpenVINO, NNCF int8) beside it, when installed;
4. **scaling**: ``Predictor.segment`` on 512x512 up to 5400x2700 scenes (time per megapixel),
   and the peak memory of a 5400x2700 scene in a fresh subprocess;
5. **service**: ``python -m service`` as a subprocess, over HTTP on loopback, 1 and 4 concurrent
   clients, PNG and RLE answers: images/s and p50/p95 latency.
6. **cuda** (when a GPU is present): the engine on the GPU, batch 1..32, with and without
   ``torch.compile`` (CUDA graphs) at a static tile shape.

The JSON holds ``engine_over_baseline`` (images/s at batch 1), ``service_over_engine`` and
``service_over_engine_rle`` (4 clients, PNG or RLE, against the engine at the service's tile
batch), ``pixel_agreement``, ``class_iou`` and ``worst_class_iou`` (engine against fp32) and
``machine``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from benchmarks.common import (
    REPO,
    Timing,
    describe,
    machine,
    markdown_table,
    peak_rss_mib,
    percentile,
    time_calls,
    time_interleaved,
    write_json,
)
from shared.acceleration import (
    TEST_REGION,
    Agreement,
    QuantizationError,
    bluemarble_centred_crops,
    bluemarble_crops,
    bluemarble_path,
    calibration_set,
    configure_threads,
    optimize,
)
from shared.checkpoint import (
    build_checkpoint,
    load_checkpoint,
    logit_offsets_from_checkpoint,
    save_checkpoint,
)
from shared.inference import INT8_GATE, InferenceOptions, Predictor
from shared.labels import LabelMap
from shared.model import build_model
from shared.precision import INFERENCE_PRECISIONS
from shared.preprocess import Normalization, image_to_tensor, normalize
from shared.tiling import tile_origins

DEFAULT_CHECKPOINT = REPO / "runs" / "quickstart" / "best.pt"
# uint8 (N, 3, H, W) batch -> (N, H, W) class ids.
Run = Callable[[torch.Tensor], torch.Tensor]
TARGETS = {
    "engine_over_baseline": 3.0,
    "service_over_engine": 0.9,
    "service_over_engine_rle": 0.9,
    "pixel_agreement": INT8_GATE.min_pixel,
    # Each class's IoU between the engine's and fp32's predictions: the serving gate's bound.
    "worst_class_iou": INT8_GATE.min_class_iou,
}
# Lake districts (lon, lat) whose 512x512 tiles join the test band's in the agreement check:
# lakes are rare in random tiles, and a precision that costs them shows only where they are.
# Baikal lies in the test band; the others are lake-rich windows of the GSHHG mask west of it,
# apart from the ones the int8 gate checks on (shared.acceleration.LAKE_DISTRICTS).
AGREEMENT_REGIONS: dict[str, tuple[float, float]] = {
    "Baikal": (108.0, 53.5),
    "Great Slave Lake": (-122.4, 60.4),
    "Quebec": (-68.0, 51.9),
    "Balkhash": (76.0, 48.7),
}


# ----- inputs ------------------------------------------------------------------------------


def tiles(count: int, size: int, seed: int = 1) -> list[np.ndarray]:
    """Real ``(size, size, 3)`` uint8 inputs from the test band of the Blue Marble mosaic."""
    return bluemarble_crops(count, size, seed=seed, region=TEST_REGION)


def stack(images: list[np.ndarray]) -> torch.Tensor:
    """``(H, W, 3)`` uint8 arrays -> ``(N, 3, H, W)`` uint8 tensor."""
    return torch.stack([image_to_tensor(i) for i in images])


def scene(width: int, height: int) -> np.ndarray:
    """A ``(height, width, 3)`` crop of the 5400x2700 mosaic (the whole of it at full size)."""
    with Image.open(bluemarble_path()) as img:
        mosaic = np.asarray(img.convert("RGB"))
    if height > mosaic.shape[0] or width > mosaic.shape[1]:
        raise ValueError(f"scene {width}x{height} is larger than the mosaic")
    top = (mosaic.shape[0] - height) // 2
    return np.ascontiguousarray(mosaic[top : top + height, :width])


def jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    """Encode like the bundled dataset's tiles (JPEG, quality 95)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# ----- the model -----------------------------------------------------------------------------


def load_or_make_checkpoint(path: Path | None, backbone: str, workdir: Path) -> tuple[Path, bool]:
    """The checkpoint to benchmark, and whether it is a random-initialised stand-in.

    Without one, a random-initialised model of ``backbone`` is written to ``workdir`` so every
    section still runs (its pixel agreement says little: untrained logits are nearly tied).
    """
    if path is not None and path.is_file():
        return path, True
    if path is not None and path != DEFAULT_CHECKPOINT:
        raise SystemExit(f"checkpoint {path} does not exist")
    warnings.warn(
        f"no checkpoint at {DEFAULT_CHECKPOINT}: benchmarking a random-initialised {backbone} "
        "(timings hold; pixel agreement needs trained weights)",
        stacklevel=2,
    )
    torch.manual_seed(0)
    model = build_model(backbone, num_classes=3, weights="none")
    payload = build_checkpoint(
        model,
        backbone=backbone,
        aux_loss=False,
        label_map=LabelMap.load(),
        normalization=Normalization(),
        config={"benchmark": "random init"},
    )
    out = workdir / f"random_{backbone}.pt"
    save_checkpoint(payload, out)
    return out, False


def torchvision_baseline(ckpt: dict) -> nn.Module:
    """The checkpoint's weights in a plain eager DeepLabV3 (torchvision's builder where it ships the
    backbone, else shared.model's), eval mode, fp32, NCHW. The checkpoint's logit offsets, if
    any, go into the head's bias, so the baseline decides as the Predictor does."""
    from torchvision.models import segmentation

    arch = ckpt["arch"]
    builder = getattr(segmentation, f"deeplabv3_{arch['backbone']}", None)
    if builder is None:  # a backbone of shared.model that torchvision does not ship
        model = build_model(arch["backbone"], num_classes=arch["num_classes"])
    else:
        model = builder(weights=None, weights_backbone=None, num_classes=arch["num_classes"])
    state = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("aux_classifier.")}
    model.load_state_dict(state, strict=True)
    offsets = logit_offsets_from_checkpoint(ckpt)
    if offsets is not None:
        with torch.no_grad():
            model.classifier[4].bias += torch.tensor(offsets)
    return model.eval()


def service_options(precision: str | None = None, optimize: bool | None = None) -> InferenceOptions:
    """The options the service's engine builds its Predictor with (``SATSEG_*`` settings),
    with ``precision`` and ``optimize`` replaced where given."""
    from service.engine import Engine
    from service.settings import Settings

    engine = Engine(Settings())
    try:
        options = engine.options
    finally:
        engine.stop()
    if precision is not None:
        options = replace(options, precision=precision)
    if optimize is not None:
        options = replace(options, optimize=optimize)
    return options


def service_env(
    precision: str | None, optimize: bool | None, threads: int | None = None
) -> dict[str, str]:
    """Environment variables that give the service subprocess the same overrides."""
    env = {} if threads is None else {"OMP_NUM_THREADS": str(threads)}
    if precision is not None:
        env["SATSEG_PRECISION"] = precision
    if optimize is not None:
        env["SATSEG_OPTIMIZE"] = "true" if optimize else "false"
    return env


def baseline_run(model: nn.Module, norm: Normalization) -> Run:
    """``(N, 3, H, W)`` uint8 -> ``(N, H, W)`` class ids, the way a user writes it."""

    def run(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(normalize(batch, norm))["out"].argmax(dim=1)

    return run


def engine_run(predictor: Predictor) -> Run:
    """``(N, 3, H, W)`` uint8 -> ``(N, H, W)`` uint8 class ids on the host, via the Predictor."""

    def run(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return predictor.run_batch(batch).argmax(dim=1).to(torch.uint8).cpu()

    return run


def predict(run: Run, images: torch.Tensor, batch: int = 4) -> torch.Tensor:
    """``(N, H, W)`` class ids of ``images`` on the host, ``batch`` images at a time."""
    return torch.cat([run(images[i : i + batch]).cpu() for i in range(0, images.shape[0], batch)])


def agreement(reference: torch.Tensor, candidate: Run, images: torch.Tensor) -> float:
    """Share of pixels where ``candidate`` predicts the class in ``reference`` (the fp32
    baseline's ``(N, H, W)`` class ids of ``images``)."""
    return float((predict(candidate, images) == reference).double().mean())


def class_agreement(
    reference: torch.Tensor, candidate: Run, images: torch.Tensor, num_classes: int
) -> Agreement:
    """Pixel share and each class's IoU between ``candidate``'s and the fp32 ``reference``
    class ids of ``images`` (all tiles pooled)."""
    return Agreement.measure([reference], [predict(candidate, images)], num_classes)


def agreement_tiles(test_tiles: torch.Tensor, size: int) -> tuple[torch.Tensor, list[str]]:
    """The test band's tiles followed by one tile per :data:`AGREEMENT_REGIONS`, and where each
    comes from."""
    regional = stack(bluemarble_centred_crops(list(AGREEMENT_REGIONS.values()), size))
    names = ["test band"] * test_tiles.shape[0] + list(AGREEMENT_REGIONS)
    return torch.cat([test_tiles, regional]), names


def agreement_fields(
    reference: torch.Tensor, candidate: Run, images: torch.Tensor, class_names: list[str]
) -> dict[str, Any]:
    """``pixel_agreement``, ``class_iou`` (per class name) and ``worst_class_iou`` of
    ``candidate`` against the fp32 ``reference`` class ids of ``images``."""
    measured = class_agreement(reference, candidate, images, len(class_names))
    return {
        "pixel_agreement": measured.pixel,
        "class_iou": measured.to_dict(class_names)["class_iou"],
        "worst_class_iou": measured.worst_class_iou,
    }


# ----- sections ------------------------------------------------------------------------------


def run_candidates(
    model: nn.Module,
    norm: Normalization,
    images: torch.Tensor,
    reference: Run,
    reference_masks: torch.Tensor,
    *,
    repeat: int,
    calibration: list[torch.Tensor],
    class_names: list[str],
) -> list[dict[str, Any]]:
    """Each optimisation on its own: batch-1 time, speed-up and agreement against fp32
    (``images`` are the agreement tiles; the first is timed)."""
    variants: list[tuple[str, dict[str, Any]]] = [
        ("fp32 channels_last", {"precision": "fp32", "fold_batchnorm": False}),
        ("fp32 channels_last, BN folded", {"precision": "fp32"}),
        (
            "bf16 autocast, channels_last",
            {"precision": "bf16", "fold_batchnorm": False, "cast_weights": False},
        ),
        ("bf16 autocast, channels_last, BN folded", {"precision": "bf16", "cast_weights": False}),
        ("bf16 weights, channels_last, BN folded", {"precision": "bf16"}),
        (
            "int8 static (calibrated), channels_last",
            {"quantize": "int8", "calibration": calibration},
        ),
    ]
    one = images[:1]
    rows: list[dict[str, Any]] = []
    base_seconds: list[float] = []
    for name, kwargs in variants:
        start = time.perf_counter()
        try:
            forward = optimize(model, device="cpu", **kwargs)
        except (QuantizationError, ValueError) as exc:
            rows.append({"variant": name, "error": str(exc)})
            continue
        build = time.perf_counter() - start

        def run(batch: torch.Tensor, forward: nn.Module = forward) -> torch.Tensor:
            return forward(normalize(batch, norm)).argmax(dim=1)

        # In turns with the baseline: the speed-up holds even on a busy machine.
        timings = time_interleaved(
            {"base": lambda: reference(one), "variant": lambda run=run: run(one)}, repeat=repeat
        )
        base_seconds += timings["base"].seconds
        timing = timings["variant"]
        rows.append(
            {
                "variant": name,
                "batch1_s": timing.median,
                "speedup": timings["base"].median / timing.median,
                **agreement_fields(reference_masks, run, images, class_names),
                "build_s": build,
            }
        )
        del forward
    base = {
        "variant": "eager fp32 NCHW (torchvision)",
        "batch1_s": statistics.median(base_seconds) if base_seconds else None,
        "speedup": 1.0,
        "pixel_agreement": 1.0,
        "class_iou": dict.fromkeys(class_names, 1.0),
        "worst_class_iou": 1.0,
        "build_s": 0.0,
    }
    return [base, *rows]


def run_engine(
    predictor: Predictor,
    reference: Run,
    images: torch.Tensor,
    batches: list[int],
    repeat: int,
) -> tuple[Timing, list[dict[str, Any]]]:
    """The baseline and the engine at batch 1 in turns, then the engine at larger batches.

    Returns the baseline's timing and one row per engine batch size.
    """
    run = engine_run(predictor)
    one = images[:1]
    pair = time_interleaved(
        {"base": lambda: reference(one), "engine": lambda: run(one)},
        repeat=repeat,
        device=predictor.device,
    )
    rows = []
    for n in batches:
        batch = images[torch.arange(n) % images.shape[0]]
        timing = (
            pair["engine"]
            if n == 1
            else time_calls(lambda batch=batch: run(batch), repeat=repeat, device=predictor.device)
        )
        rows.append(
            {
                "batch": n,
                "images_per_s": n / timing.median,
                "batch_s": timing.median,
                **timing.to_dict(),
            }
        )
    return pair["base"], rows


def run_scaling(
    predictor: Predictor, sizes: list[tuple[int, int]], repeat: int
) -> list[dict[str, Any]]:
    rows = []
    tile, overlap = predictor.options.tile, predictor.options.overlap
    for width, height in sizes:
        image = scene(width, height)
        timing = time_calls(lambda image=image: predictor.segment(image), repeat=repeat, warmup=1)
        megapixels = width * height / 1e6
        # The work is one forward per tile; overlaps make tiles cover more than the image.
        tiles = len(tile_origins(max(height, tile), tile, overlap)) * len(
            tile_origins(max(width, tile), tile, overlap)
        )
        rows.append(
            {
                "size": f"{width}x{height}",
                "megapixels": megapixels,
                "tiles": tiles,
                "seconds": timing.median,
                "s_per_megapixel": timing.median / megapixels,
                "s_per_tile": timing.median / tiles,
            }
        )
    return rows


def scene_memory(checkpoint: Path, width: int, height: int, overrides: list[str]) -> dict[str, Any]:
    """Peak RSS of a fresh process that loads the engine and segments one scene."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.inference",
        "--scene-worker",
        "--checkpoint",
        str(checkpoint),
        "--scene",
        f"{width}x{height}",
        *overrides,
    ]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def scene_worker(checkpoint: Path, width: int, height: int, options: InferenceOptions) -> None:
    """Child side of :func:`scene_memory`: prints one JSON line."""
    predictor = Predictor.from_checkpoint(checkpoint, options)
    predictor.warmup()
    load_peak = peak_rss_mib()
    image = scene(width, height)
    ready = _current_rss_mib()
    # From here on the kernel's high-water mark (VmHWM) counts the scene alone.
    reset = _reset_peak_rss()
    start = time.perf_counter()
    mask = predictor.segment(image)
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "size": f"{width}x{height}",
                "seconds": seconds,
                "rss_before_mib": ready,
                "peak_rss_mib": _status_mib("VmHWM") if reset else peak_rss_mib(),
                "peak_rss_scene_only": reset,
                "load_peak_rss_mib": load_peak,
                "mask_shape": list(mask.shape),
                "precision": predictor.precision,
            }
        )
    )


def run_service(
    checkpoint: Path,
    images: list[np.ndarray],
    clients: list[int],
    requests: int,
    scene_bytes: bytes | None,
    ready_timeout: float,
    extra_env: dict[str, str],
) -> dict[str, Any]:
    """Start ``python -m service`` and load it from 1..N concurrent httpx clients."""
    import httpx

    port = _free_port()
    env = _service_env(checkpoint, port, **extra_env)
    bodies = [jpeg(i) for i in images]
    base = f"http://127.0.0.1:{port}"
    with _server(env) as proc:
        startup = _wait_ready(base, proc, ready_timeout)
        rows = []
        with httpx.Client(base_url=base, timeout=600) as warm:
            info = warm.get("/model").json()
            for body in bodies[:2]:
                _post(warm, body, "png")
        for fmt in ("png", "rle"):
            for n in clients:
                rows.append(_load(base, bodies, fmt, n, requests))
        result: dict[str, Any] = {
            "startup_s": startup,
            "device": info.get("device"),
            "precision": info.get("precision"),
            "rows": rows,
        }
        if scene_bytes is not None:
            with httpx.Client(base_url=base, timeout=600) as client:
                start = time.perf_counter()
                answer = _post(client, scene_bytes, "png")
                result["scene"] = {
                    "seconds": time.perf_counter() - start,
                    "status": answer.status_code,
                    "server_timing": answer.headers.get("server-timing"),
                }
        result["peak_rss_mib"] = _process_peak_rss_mib(proc.pid)
    return result


def run_cuda(
    predictor_options: InferenceOptions,
    checkpoint: Path,
    images: torch.Tensor,
    reference_masks: torch.Tensor,
    batches: list[int],
    repeat: int,
) -> dict[str, Any]:
    """The engine on the GPU: uint8 upload (pinned, non-blocking), autocast, channels_last,
    argmax on the device; then the same with torch.compile and CUDA graphs at a static shape."""
    options = replace(predictor_options, device="cuda", precision="auto")
    predictor = Predictor.from_checkpoint(checkpoint, options)
    predictor.warmup()
    run = engine_run(predictor)
    device = predictor.device
    rows = []
    torch.cuda.reset_peak_memory_stats(device)
    for n in batches:
        batch = images[torch.arange(n) % images.shape[0]].pin_memory()
        timing = time_calls(lambda batch=batch: run(batch), repeat=repeat, warmup=2, device=device)
        rows.append({"batch": n, "images_per_s": n / timing.median, **timing.to_dict()})
    eager_peak = torch.cuda.max_memory_allocated(device) / 2**20
    result: dict[str, Any] = {
        "precision": predictor.precision,
        "rows": rows,
        "pixel_agreement": agreement(reference_masks, run, images),
        "peak_memory_mib": eager_peak,
    }
    # Static shapes: one tile shape per batch size, so CUDA graphs can be replayed.
    try:
        compiled = optimize(
            predictor.model,
            device=device,
            precision=predictor.precision,
            compile_mode="reduce-overhead",
        )
        predictor.forward = compiled
        compiled_rows = []
        for n in batches:
            batch = images[torch.arange(n) % images.shape[0]].pin_memory()
            timing = time_calls(
                lambda batch=batch: run(batch), repeat=repeat, warmup=3, device=device
            )
            compiled_rows.append(
                {"batch": n, "images_per_s": n / timing.median, **timing.to_dict()}
            )
        result["compiled"] = {
            "mode": "reduce-overhead",
            "rows": compiled_rows,
            "pixel_agreement": agreement(reference_masks, run, images),
        }
    except Exception as exc:  # compilation needs a toolchain; report rather than abort
        result["compiled"] = {"error": f"{type(exc).__name__}: {exc}"}
    return result


def run_peers(
    model: nn.Module,
    norm: Normalization,
    calibration: list[torch.Tensor],
    images: torch.Tensor,
    reference: Run,
    reference_masks: torch.Tensor,
    class_names: list[str],
    *,
    workdir: Path,
    repeat: int,
) -> list[dict[str, Any]]:
    """The peer runtimes of :mod:`benchmarks.peers` at batch 1, each timed in turns with the
    baseline, with their agreement on ``images`` (the first is timed); a runtime that is not
    installed or fails is a row with the reason."""
    from benchmarks.peers import peer_runs

    threads = torch.get_num_threads()
    size = int(images.shape[-1])
    one = images[:1]
    rows: list[dict[str, Any]] = []
    for name, run in peer_runs(
        model, norm, calibration, workdir, size=size, threads=threads
    ).items():
        if isinstance(run, str):
            rows.append({"runtime": name, "skipped": run})
            continue
        timings = time_interleaved(
            {"base": lambda: reference(one), "peer": lambda run=run: run(one)}, repeat=repeat
        )
        rows.append(
            {
                "runtime": name,
                "threads": threads,
                "batch1_s": timings["peer"].median,
                "speedup": timings["base"].median / timings["peer"].median,
                **agreement_fields(reference_masks, run, images, class_names),
            }
        )
        del run
    return rows


def profile_engine(predictor: Predictor, image: torch.Tensor, rows: int = 15) -> str:
    """``torch.profiler`` table of the engine at batch 1: where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    run = engine_run(predictor)
    run(image)
    activities = [ProfilerActivity.CPU]
    if predictor.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(2):
            run(image)
    sort = "self_cuda_time_total" if predictor.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


# ----- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        configure_threads(args.threads)
    if args.scene_worker:
        width, height = _size(args.scene)
        options = service_options(args.precision, args.optimize)
        scene_worker(args.checkpoint, width, height, options)
        return 0
    with tempfile.TemporaryDirectory(prefix="satseg-bench-") as workdir:
        return benchmark(args, Path(workdir))


def benchmark(args: argparse.Namespace, workdir: Path) -> int:
    """All sections; ``workdir`` holds the random-initialised checkpoint, if one is needed."""
    overrides = [] if args.threads is None else ["--threads", str(args.threads)]
    if args.precision is not None:
        overrides += ["--precision", args.precision]
    if args.optimize is not None:
        overrides.append("--optimize" if args.optimize else "--no-optimize")

    quick = args.quick
    size = args.size
    repeat = args.repeat or (2 if quick else 5)
    batches = [1, 4] if quick else [1, 4, 8]  # batch 1 first: it is timed with the baseline
    clients = [1, 4]
    n_agree = args.agreement_tiles or (4 if quick else 16)
    scales = (
        [(size, size), (2 * size, 2 * size)]
        if quick
        else [(512, 512), (1024, 1024), (2048, 2048), (5400, 2700)]
    )
    scene_size = _size(args.scene) if args.scene else ((1024, 512) if quick else (5400, 2700))

    info = machine()
    print(f"# inference benchmark ({'quick' if quick else 'full'})\n{describe(info)}\n", flush=True)
    checkpoint, given = load_or_make_checkpoint(args.checkpoint, args.backbone, workdir)
    ckpt = load_checkpoint(checkpoint)
    norm = Normalization.from_dict(ckpt["normalization"])
    images = stack(tiles(max(n_agree, max(batches)), size))
    agree_images, agree_sources = agreement_tiles(images[:n_agree], size)
    class_names = [c["name"] for c in ckpt["label_map"]["classes"]]
    # The engine's own calibration crops, for the int8 candidate and NNCF alike.
    calibration, _ = calibration_set(norm)

    baseline = torchvision_baseline(ckpt)
    reference = baseline_run(baseline, norm)
    reference_masks = predict(reference, agree_images)
    result: dict[str, Any] = {
        "machine": info,
        "quick": quick,
        "checkpoint": str(checkpoint),
        "random_init": not given,
        # The checkpoint's own validation scores say how trained its weights are.
        "checkpoint_metrics": ckpt.get("metrics", {}),
        "arch": ckpt["arch"],
        "input": f"{size}x{size} Blue Marble crops from the test band (100E..180E), uint8",
        "agreement_tiles": agree_sources,
        "timing": "median of --repeat calls after a warm-up; ratios from calls taken in turns",
        "targets": TARGETS,
    }

    if not args.skip_candidates:
        result["candidates"] = run_candidates(
            baseline,
            norm,
            agree_images,
            reference,
            reference_masks,
            repeat=repeat,
            calibration=calibration,
            class_names=class_names,
        )
        print(_candidates_table(result["candidates"]) + "\n", flush=True)

    options = service_options(args.precision, args.optimize)
    start = time.perf_counter()
    predictor = Predictor.from_checkpoint(checkpoint, options)
    predictor.warmup()
    loaded = time.perf_counter() - start
    base_t, engine_rows = run_engine(predictor, reference, images, batches, repeat)
    engine_agreement = agreement_fields(
        reference_masks, engine_run(predictor), agree_images, class_names
    )
    result["baseline"] = {
        "what": f"torchvision deeplabv3_{ckpt['arch']['backbone']}, eager fp32, NCHW, "
        "batch 1, inference_mode",
        "images_per_s": 1 / base_t.median,
        **base_t.to_dict(),
    }
    result["engine"] = {
        "options": vars(options),
        "options_overridden": {"precision": args.precision, "optimize": args.optimize},
        "device": str(predictor.device),
        "precision": predictor.precision,
        "precision_reason": predictor.precision_reason,
        "forward": repr(getattr(predictor.forward, "description", predictor.forward)),
        "load_and_warmup_s": loaded,
        "rows": engine_rows,
    }
    result.update(engine_agreement)
    result["pixel_agreement_tiles"] = len(agree_sources)
    result["engine_over_baseline"] = base_t.median / engine_rows[0]["batch_s"]
    print(_engine_table(result), flush=True)

    if not args.skip_peers:
        result["peers"] = run_peers(
            baseline,
            norm,
            calibration,
            agree_images,
            reference,
            reference_masks,
            class_names,
            workdir=workdir,
            repeat=repeat,
        )
        print(_peers_table(result), flush=True)

    if not args.skip_scaling:
        result["scaling"] = run_scaling(predictor, scales, repeat=1 if not quick else 1)
        result["scene_memory"] = scene_memory(checkpoint, *scene_size, overrides)
        print(_scaling_table(result), flush=True)

    if result["engine_over_baseline"] < TARGETS["engine_over_baseline"] or args.profile:
        result["profile"] = profile_engine(predictor, images[:1])
        print("engine profile (batch 1):\n" + result["profile"], flush=True)
    del predictor

    if not args.skip_service:
        scene_bytes = None
        if not args.skip_scaling:
            scene_bytes = jpeg(scene(*scene_size))
        try:
            service = run_service(
                checkpoint,
                [np.ascontiguousarray(i.permute(1, 2, 0).numpy()) for i in images],
                clients,
                requests=args.requests or (4 if quick else 24),
                scene_bytes=scene_bytes,
                ready_timeout=args.ready_timeout,
                extra_env=service_env(args.precision, args.optimize, args.threads),
            )
        except RuntimeError as exc:  # the service did not start: say why, keep the rest
            service = {"error": str(exc), "rows": []}
        result["service"] = service
        tile_batch = options.tile_batch
        engine_at = {r["batch"]: r["images_per_s"] for r in engine_rows}
        reference_batch = tile_batch if tile_batch in engine_at else max(engine_at)
        for fmt, key in (("png", "service_over_engine"), ("rle", "service_over_engine_rle")):
            rows = [
                r for r in service["rows"] if r["format"] == fmt and r["clients"] == max(clients)
            ]
            result[key] = rows[0]["images_per_s"] / engine_at[reference_batch] if rows else None
        result["service_over_engine_reference"] = (
            f"service images/s with {max(clients)} clients (PNG; RLE for _rle) / engine images/s "
            f"at batch {reference_batch}"
        )
        print(_service_table(result), flush=True)

    if torch.cuda.is_available() and not args.skip_cuda:
        result["cuda"] = run_cuda(
            options,
            checkpoint,
            agree_images,
            reference_masks,
            args.cuda_batches or ([1, 4, 8] if quick else [1, 4, 8, 16, 32]),
            repeat,
        )
        print(_cuda_table(result["cuda"]), flush=True)

    result["targets_met"] = {
        key: (result.get(key) is not None and result[key] >= target)
        for key, target in TARGETS.items()
    }
    print(_summary(result), flush=True)
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.inference", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller scenes")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=DEFAULT_CHECKPOINT,
        help="checkpoint to benchmark (default runs/quickstart/best.pt; a random-initialised "
        "model of --backbone when that does not exist)",
    )
    parser.add_argument("--backbone", default="resnet50", help="backbone of the random model")
    parser.add_argument(
        "--precision",
        choices=INFERENCE_PRECISIONS,
        help="engine and service precision (default: the service's SATSEG_PRECISION)",
    )
    parser.add_argument(
        "--optimize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="engine and service optimised forward (default: the service's settings)",
    )
    parser.add_argument("--size", type=int, default=512, help="tile side of the inputs")
    parser.add_argument("--repeat", type=int, help="timed calls per measurement")
    parser.add_argument("--requests", type=int, help="requests per client configuration")
    parser.add_argument(
        "--agreement-tiles", type=int, help="test-band tiles for agreement (plus one per region)"
    )
    parser.add_argument("--scene", help="WxH of the memory-measured scene (default 5400x2700)")
    parser.add_argument("--ready-timeout", type=float, default=600, help="service start-up limit")
    parser.add_argument(
        "--threads", type=int, help="torch threads here and in the subprocesses (default: torch's)"
    )
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table")
    parser.add_argument("--skip-candidates", action="store_true")
    parser.add_argument(
        "--skip-peers", action="store_true", help="skip ONNX Runtime / OpenVINO / NNCF int8"
    )
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--skip-service", action="store_true")
    parser.add_argument("--skip-cuda", action="store_true")
    parser.add_argument(
        "--cuda-batches",
        type=_batch_sizes,
        help="batch sizes of the cuda section, each compiled once (default 1,4,8 with --quick, "
        "else 1,4,8,16,32)",
    )
    parser.add_argument("--scene-worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ----- tables ---------------------------------------------------------------------------------


def _class_cells(row: dict[str, Any]) -> list[str]:
    return ["n/a" if iou is None else f"{iou:.4f}" for iou in (row.get("class_iou") or {}).values()]


def _candidates_table(rows: list[dict[str, Any]]) -> str:
    names = list(next((r["class_iou"] for r in rows if "class_iou" in r), {}))
    body = [
        [
            r["variant"],
            r.get("batch1_s"),
            r.get("speedup"),
            f"{r['pixel_agreement']:.5f}",
            *_class_cells(r),
            r.get("build_s"),
        ]
        if "error" not in r
        else [r["variant"], None, None, None, *([None] * len(names)), r["error"]]
        for r in rows
    ]
    headers = [
        "candidate (CPU, batch 1)",
        "s/image",
        "speed-up",
        "pixel agreement",
        *(f"{n} IoU vs fp32" for n in names),
        "build s",
    ]
    return markdown_table(headers, body)


def _peers_table(result: dict[str, Any]) -> str:
    names = list(result.get("class_iou") or {})
    engine = result["engine"]
    base = result["baseline"]
    rows = [
        ["torchvision eager fp32", base["median_s"], 1.0, "1.00000", *(["1.0000"] * len(names))],
        [
            f"SatSeg engine ({engine['precision']})",
            engine["rows"][0]["batch_s"],
            result["engine_over_baseline"],
            f"{result['pixel_agreement']:.5f}",
            *_class_cells(result),
        ],
    ]
    for r in result["peers"]:
        if "skipped" in r:
            rows.append([r["runtime"], None, None, r["skipped"], *([None] * len(names))])
        else:
            rows.append(
                [
                    r["runtime"],
                    r["batch1_s"],
                    r["speedup"],
                    f"{r['pixel_agreement']:.5f}",
                    *_class_cells(r),
                ]
            )
    headers = [
        f"runtime (CPU, batch 1, {torch.get_num_threads()} threads)",
        "s/image",
        "x baseline",
        "pixel agreement",
        *(f"{n} IoU vs fp32" for n in names),
    ]
    return markdown_table(headers, rows) + "\n"


def _engine_table(result: dict[str, Any]) -> str:
    engine = result["engine"]
    base = result["baseline"]
    rows = [["baseline (torchvision eager fp32)", 1, base["images_per_s"], base["median_s"], 1.0]]
    for r in engine["rows"]:
        rows.append(
            [
                f"engine ({engine['precision']}, {engine['device']})",
                r["batch"],
                r["images_per_s"],
                r["batch_s"],
                r["images_per_s"] / base["images_per_s"],
            ]
        )
    table = markdown_table(["path", "batch", "images/s", "s/batch", "x baseline"], rows)
    ious = ", ".join(
        f"{n} {v}" for n, v in zip(result["class_iou"], _class_cells(result), strict=True)
    )
    return (
        f"{table}\n\nengine_over_baseline {result['engine_over_baseline']:.2f}, pixel_agreement "
        f"{result['pixel_agreement']:.5f}, class IoU vs fp32 {ious} "
        f"({result['pixel_agreement_tiles']} tiles: test band and "
        f"{', '.join(AGREEMENT_REGIONS)})\nprecision: {engine['precision_reason']}\n"
    )


def _scaling_table(result: dict[str, Any]) -> str:
    rows = [
        [
            r["size"],
            r["megapixels"],
            r["tiles"],
            r["seconds"],
            r["s_per_megapixel"],
            r["s_per_tile"],
        ]
        for r in result["scaling"]
    ]
    table = markdown_table(["scene", "MP", "tiles", "seconds", "s per MP", "s per tile"], rows)
    memory = result["scene_memory"]
    if "error" in memory:
        return f"{table}\n\nscene memory: {memory['error']}\n"
    return (
        f"{table}\n\n{memory['size']} scene in a fresh process: peak RSS while segmenting "
        f"{memory['peak_rss_mib']:.0f} MiB (engine loaded and warm: {memory['rss_before_mib']:.0f}"
        f" MiB; peak while loading: {memory['load_peak_rss_mib']:.0f} MiB), "
        f"{memory['seconds']:.1f} s\n"
    )


def _service_table(result: dict[str, Any]) -> str:
    service = result["service"]
    if "error" in service:
        return f"service: {service['error']}\n"
    rows = [
        [
            r["format"],
            r["clients"],
            r["requests"],
            r["images_per_s"],
            r["p50_ms"],
            r["p95_ms"],
            r["errors"],
            r.get("forward_busy"),
            r.get("mean_batch_tiles"),
            r.get("forward_s_per_tile"),
        ]
        for r in service["rows"]
    ]
    headers = ["format", "clients", "requests", "images/s", "p50 ms", "p95 ms", "errors"]
    headers += ["model busy", "tiles/batch", "forward s/tile"]
    table = markdown_table(headers, rows)
    ratio = result.get("service_over_engine")
    text = (
        f"{table}\n\nservice ({service['precision']} on {service['device']}) start-up "
        f"{service['startup_s']:.1f} s; service_over_engine "
    )
    text += f"{ratio:.2f} ({result['service_over_engine_reference']})" if ratio else "n/a"
    if "scene" in service:
        text += f"\nscene over HTTP: {service['scene']['seconds']:.1f} s"
    if service.get("peak_rss_mib"):
        text += f"; service peak RSS {service['peak_rss_mib']:.0f} MiB"
    return text + "\n"


def _cuda_table(cuda: dict[str, Any]) -> str:
    rows = [
        ["eager " + cuda["precision"], r["batch"], r["images_per_s"], r["p50_s"]]
        for r in cuda["rows"]
    ]
    compiled = cuda.get("compiled", {})
    for r in compiled.get("rows", []):
        rows.append(["compiled " + compiled["mode"], r["batch"], r["images_per_s"], r["p50_s"]])
    table = markdown_table(["CUDA path", "batch", "images/s", "p50 s"], rows)
    agree, peak = cuda["pixel_agreement"], cuda["peak_memory_mib"]
    return f"{table}\n\npixel agreement {agree:.5f}, peak {peak:.0f} MiB allocated\n"


def _summary(result: dict[str, Any]) -> str:
    lines = ["targets:"]
    for key, target in TARGETS.items():
        value = result.get(key)
        digits = 5 if key == "pixel_agreement" else 3
        shown = "n/a" if value is None else f"{value:.{digits}f}"
        mark = "met" if result["targets_met"][key] else "NOT met"
        lines.append(f"  {key}: {shown} (target >= {target}) {mark}")
    if result["random_init"]:
        lines.append("  (random-initialised weights: pixel agreement is not meaningful)")
    return "\n".join(lines)


# ----- helpers ---------------------------------------------------------------------------------


def _batch_sizes(text: str) -> list[int]:
    """``"1,8"`` -> ``[1, 8]``."""
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected batch sizes like 1,8, got {text!r}") from None
    if min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive, got {text!r}")
    return sizes


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"expected WxH, got {text!r}") from None
    return width, height


def _current_rss_mib() -> float:
    return _status_mib("VmRSS")


def _status_mib(field: str) -> float:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _process_peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _service_env(checkpoint: Path, port: int, **extra: str) -> dict[str, str]:
    """The environment of a ``python -m service`` serving ``checkpoint`` on loopback ``port``."""
    return dict(
        os.environ,
        SATSEG_CHECKPOINT=str(checkpoint),
        SATSEG_HOST="127.0.0.1",
        SATSEG_PORT=str(port),
        SATSEG_LOG_LEVEL="warning",
        **extra,
    )


@contextlib.contextmanager
def _server(env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=REPO, env=env, stdout=log, stderr=log
        )
        try:
            yield proc
        except Exception:
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace")[-4000:])
            raise
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_ready(base: str, proc: subprocess.Popen[bytes], timeout: float) -> float:
    import httpx

    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited with status {proc.returncode} while starting")
        try:
            answer = httpx.get(f"{base}/readyz", timeout=2)
            if answer.status_code == 200:
                return time.perf_counter() - start
            if answer.status_code == 503 and "model_unavailable" in answer.text:
                raise RuntimeError(f"the service cannot load the model: {answer.text}")
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the service was not ready within {timeout:.0f} s")


def _post(client: Any, body: bytes, fmt: str) -> Any:
    answer = client.post(
        "/segment", params={"format": fmt}, files={"image": ("tile.jpg", body, "image/jpeg")}
    )
    return answer


def _load(base: str, bodies: list[bytes], fmt: str, clients: int, requests: int) -> dict[str, Any]:
    """``clients`` threads, each with its own connection, send ``requests`` requests in all."""
    import httpx

    latencies: list[float] = []
    server_ms: list[dict[str, float]] = []
    errors = 0
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        nonlocal errors
        with httpx.Client(base_url=base, timeout=600) as client:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                start = time.perf_counter()
                answer = _post(client, bodies[i % len(bodies)], fmt)
                elapsed = time.perf_counter() - start
                with lock:
                    if answer.status_code != 200:
                        errors += 1
                        continue
                    latencies.append(elapsed)
                    timing = _server_timing(answer, fmt)
                    if timing:
                        server_ms.append(timing)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    before = _forward_counters(base)
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = _forward_counters(base)
    done = len(latencies)
    row: dict[str, Any] = {
        "format": fmt,
        "clients": clients,
        "requests": requests,
        "errors": errors,
        "images_per_s": done / wall if wall > 0 else None,
        "p50_ms": percentile(latencies, 50) * 1000 if latencies else None,
        "p95_ms": percentile(latencies, 95) * 1000 if latencies else None,
    }
    if server_ms:
        row["server_ms_median"] = {
            k: float(np.median([t[k] for t in server_ms if k in t])) for k in server_ms[0]
        }
    if before and after:
        # Where the service's time goes: the share of the wall time the model was computing,
        # how full its batches were, and what one tile cost inside the service's forward passes
        # (compare with the engine's s/batch / batch, measured alone).
        forward_s = after["forward_sum"] - before["forward_sum"]
        tiles = after["tiles_sum"] - before["tiles_sum"]
        batches = after["tiles_count"] - before["tiles_count"]
        row["forward_busy"] = forward_s / wall if wall > 0 else None
        row["mean_batch_tiles"] = tiles / batches if batches else None
        row["forward_s_per_tile"] = forward_s / tiles if tiles else None
    return row


def _forward_counters(base: str) -> dict[str, float]:
    """The service's forward-pass seconds and batch-size counters from ``/metrics`` ({} when
    metrics are off)."""
    import httpx

    wanted = {
        "satseg_forward_seconds_sum": "forward_sum",
        "satseg_batch_tiles_sum": "tiles_sum",
        "satseg_batch_tiles_count": "tiles_count",
    }
    try:
        text = httpx.get(f"{base}/metrics", timeout=30).text
    except httpx.HTTPError:
        return {}
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            out[wanted[name]] = float(value)
    return out if len(out) == len(wanted) else {}


def _server_timing(answer: Any, fmt: str) -> dict[str, float]:
    """The service's own decode/inference/encode split (Server-Timing header or timing_ms)."""
    if fmt == "rle":
        with contextlib.suppress(ValueError, KeyError):
            return {k: float(v) for k, v in answer.json()["timing_ms"].items()}
        return {}
    header = answer.headers.get("server-timing", "")
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        with contextlib.suppress(ValueError):
            out[name] = float(dur)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
