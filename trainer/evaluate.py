"""Score a checkpoint on a dataset split at full tile resolution, through the service's path.

    python -m trainer.evaluate --checkpoint runs/quickstart/best.pt --data data/bluemarble \
        [--split test] [--json PATH] [--device auto] [--precision auto]

Every image goes through :meth:`shared.inference.Predictor.segment`, that is
:mod:`shared.pipeline` (normalisation on the device, tiles in row bands with blended overlaps,
argmax), the path the service and ``trainer.predict`` segment with. Prints a
per-class table (IoU, Dice, precision, recall, boundary IoU) plus mIoU and pixel accuracy, and
writes the same numbers as JSON. Errors are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shared.bands import BandSpec
from shared.checkpoint import CheckpointError, bands_from_checkpoint
from shared.inference import InferenceOptions, Predictor
from shared.labels import LabelMapError
from shared.messages import one_line
from shared.metrics import BoundaryIoU, ConfusionMatrix, scores
from shared.precision import INFERENCE_PRECISIONS
from shared.raster import ArrayRaster
from trainer.data import DatasetError, collect_pairs, load_sample
from trainer.dataset_layout import DatasetLayoutError

log = logging.getLogger("trainer")

EXIT_OK, EXIT_ERROR = 0, 2


def evaluate_pairs(
    predictor: Predictor,
    pairs: Sequence[tuple[Path, Path]],
    *,
    boundary_width: int = 3,
) -> dict[str, Any]:
    """Segment every image of ``pairs`` with ``predictor`` and score it against its mask.

    Masks are read through the predictor's label map, so a dataset whose labels disagree with
    the model fails with the mask's name. Images are read as the checkpoint's bands, under its
    nodata rule: nodata pixels are ``ignore_index`` in the mask and the prediction and count in
    no metric (the confusion matrix holds the valid pixels only). Returns the
    :func:`shared.metrics.scores` dict plus ``boundary_iou`` per class,
    ``mean_boundary_iou``, ``confusion_matrix``, ``images``, ``seconds`` and
    ``images_per_s``.
    """
    label_map = predictor.label_map
    matrix = ConfusionMatrix(label_map.num_classes, label_map.ignore_index)
    boundary = BoundaryIoU(label_map.num_classes, label_map.ignore_index, width=boundary_width)
    spec = bands_from_checkpoint(predictor.metadata)
    norm = predictor.normalization
    fill = [m * norm.scale for m in norm.mean]
    start = time.perf_counter()
    for image_path, mask_path in pairs:
        image, mask, nodata = load_sample(image_path, mask_path, label_map, spec, fill)
        pred = predictor.predict(model_source(image, nodata, spec)).mask
        if nodata is not None:
            # ignore_index in the prediction as in the mask, where no metric looks; the boundary
            # score wants class ids there (it takes ignored pixels as neutral, whatever they hold).
            pred = np.where(nodata, np.uint8(0), pred)
        matrix.update(pred, mask)
        boundary.update(pred, mask)
    seconds = time.perf_counter() - start
    result = scores(matrix.matrix, label_map.names)
    biou = boundary.compute()
    for entry, value in zip(result["per_class"], biou, strict=True):
        entry["boundary_iou"] = value
    present = [v for v in biou if v is not None]
    result["mean_boundary_iou"] = sum(present) / len(present) if present else None
    result["confusion_matrix"] = matrix.matrix.tolist()
    result["images"] = len(pairs)
    result["seconds"] = round(seconds, 3)
    result["images_per_s"] = round(len(pairs) / seconds, 3) if seconds > 0 else None
    return result


def model_source(image: np.ndarray, nodata: np.ndarray | None, spec: BandSpec) -> ArrayRaster:
    """A dataset image as the predictor reads it: 8-bit RGB as a picture, other bands as
    float32 values; ``nodata`` pixels come out as ``ignore_index``."""
    valid = None if nodata is None else ~nodata
    if spec.reads_pictures():
        return ArrayRaster(image, valid)
    preview = np.zeros((*image.shape[:2], 3), dtype=np.uint8)
    return ArrayRaster(preview, valid, pixels=image.astype(np.float32))


def evaluate_checkpoint(
    checkpoint: str | Path,
    data_root: str | Path,
    *,
    split: str = "test",
    options: InferenceOptions | None = None,
    boundary_width: int = 3,
    on_bad_file: str = "error",
) -> dict[str, Any]:
    """Load ``checkpoint`` and score it on ``split`` ("test" or "trainval") of ``data_root``.

    Raises:
        CheckpointError: unreadable, unsafe or inconsistent checkpoint.
        DatasetError / DatasetLayoutError: the data folder or one of its files is unusable.
    """
    predictor = Predictor.from_checkpoint(checkpoint, options or InferenceOptions())
    pairs = collect_pairs(data_root, split, predictor.label_map, on_bad_file=on_bad_file)
    result = evaluate_pairs(predictor, pairs, boundary_width=boundary_width)
    return {
        "checkpoint": str(checkpoint),
        "data": str(data_root),
        "split": split,
        "device": str(predictor.device),
        "precision": predictor.precision,
        "tile": predictor.options.tile,
        "overlap": predictor.options.overlap,
        **result,
    }


def format_table(result: dict[str, Any]) -> str:
    """The per-class table people read: one row per class, then the means."""

    def f(value: float | None) -> str:
        return "   -  " if value is None else f"{value:6.4f}"

    header = (
        f"{'class':<12} {'IoU':>6} {'Dice':>6} {'prec':>6} {'recall':>6} {'bIoU':>6} {'pixels':>12}"
    )
    lines = [header, "-" * len(header)]
    for c in result["per_class"]:
        lines.append(
            f"{c['name']:<12} {f(c['iou'])} {f(c['dice'])} {f(c['precision'])} "
            f"{f(c['recall'])} {f(c.get('boundary_iou'))} {c['support_pixels']:>12d}"
        )
    lines.append("-" * len(header))
    lines.append(
        f"{'mean':<12} {f(result['miou'])} {f(result['mean_dice'])} {'':6} {'':6} "
        f"{f(result.get('mean_boundary_iou'))}"
    )
    lines.append(
        f"pixel accuracy {f(result['pixel_accuracy']).strip()}  mIoU {f(result['miou']).strip()}"
    )
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.evaluate",
        description="Score a checkpoint on a dataset split (per-class IoU, Dice, boundary IoU).",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint file (.pt)")
    parser.add_argument("--data", required=True, help="dataset root in the workshop layout")
    parser.add_argument("--split", default="test", choices=("test", "trainval"))
    parser.add_argument("--json", default=None, help="where to write the JSON result")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--precision", default="auto", choices=INFERENCE_PRECISIONS)
    parser.add_argument("--tile", type=int, default=512, help="tile side for large images")
    parser.add_argument("--overlap", type=int, default=64, help="pixels shared by neighbour tiles")
    parser.add_argument("--tile-batch", type=int, default=4, help="tiles per forward pass")
    parser.add_argument(
        "--flips", action="store_true", help="average each tile over its flips (4x the time)"
    )
    parser.add_argument("--boundary-width", type=int, default=3, help="boundary band in pixels")
    parser.add_argument("--skip-bad-files", action="store_true", help="skip unreadable pairs")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = InferenceOptions(
        device=args.device,
        precision=args.precision,
        tile=args.tile,
        overlap=args.overlap,
        tile_batch=args.tile_batch,
        flips=args.flips,
    )
    try:
        result = evaluate_checkpoint(
            args.checkpoint,
            args.data,
            split=args.split,
            options=options,
            boundary_width=args.boundary_width,
            on_bad_file="skip" if args.skip_bad_files else "error",
        )
        if args.json:
            write_json(result, args.json)
    except (
        CheckpointError,
        DatasetError,
        DatasetLayoutError,
        LabelMapError,
        ValueError,
        OSError,
    ) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return EXIT_ERROR
    print(
        f"{result['checkpoint']} on {result['data']} [{result['split']}]: "
        f"{result['images']} images, "
        f"{result['images_per_s']} images/s ({result['device']}, {result['precision']})"
    )
    print(format_table(result))
    if args.json:
        print(f"wrote {args.json}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
