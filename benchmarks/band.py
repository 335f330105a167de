"""Score checkpoints on the whole test band as one scene, the way the service segments it.

The bundled TEST_SET cuts the 100E-180E band (latitudes within 70 degrees of the equator) into
overlapping 256 px tiles: a lake near a tile's edge is seen without its surroundings, and a
pixel counts up to four times. This scores the band once, as a 1200 x 2100 scene through the
service's inference path (``shared.inference.Predictor`` with the service's settings: tiling,
precision, flips), as a check through ``POST /segment`` would. Per checkpoint: per-class IoU,
and lake recall by lake size (8-connected lake pixels of the label), which says how much of
what is missed is lakes too small to see at the mosaic's 7 km per pixel.

    python -m benchmarks.band --checkpoint runs/quickstart/best.pt [more.pt ...] \
        [--precision fp32] [--json benchmarks/band.json]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from benchmarks.common import describe, machine, markdown_table, write_json
from benchmarks.inference import service_options
from shared.datasets import BLUEMARBLE_SHAPE, MAX_ABS_LAT, TEST_BAND_LON, lat_rows, lon_columns
from shared.inference import Predictor
from shared.metrics import ConfusionMatrix, scores

# Lake sizes in pixels of the mosaic (about 7 x 7 km each): [low, high).
LAKE_SIZES = ((1, 10), (10, 50), (50, 200), (200, 1_000_000))


def band_window() -> tuple[slice, slice]:
    """Rows and columns of the test band in the 5400 x 2700 mosaic."""
    height, width = BLUEMARBLE_SHAPE
    first, stop = lat_rows(height, MAX_ABS_LAT)
    west, east = lon_columns(width, *TEST_BAND_LON)
    return slice(first, stop), slice(west, east)


def lake_recall_by_size(truth: np.ndarray, predicted: np.ndarray, lake: int) -> list[dict]:
    """For each size range, the lakes of ``truth`` in it and the share of their pixels found."""
    components, count = ndimage.label(truth == lake, structure=np.ones((3, 3), bool))
    index = np.arange(1, count + 1)
    sizes = ndimage.sum_labels(truth == lake, components, index)
    found = ndimage.sum_labels(predicted == lake, components, index)
    rows = []
    for low, high in LAKE_SIZES:
        chosen = (sizes >= low) & (sizes < high)
        pixels = int(sizes[chosen].sum())
        rows.append(
            {
                "pixels_from": low,
                "pixels_to": high,
                "lakes": int(chosen.sum()),
                "pixels": pixels,
                "recall": float(found[chosen].sum() / pixels) if pixels else None,
            }
        )
    return rows


def score(predictor: Predictor, image: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Per-class scores of one scene, and lake recall by lake size."""
    predicted = predictor.segment(image)
    names = predictor.label_map.names
    matrix = ConfusionMatrix(len(names), predictor.label_map.ignore_index)
    matrix.update(predicted, truth)
    result = scores(matrix.matrix, names)
    if "lake" in names:
        result["lake_recall_by_size"] = lake_recall_by_size(truth, predicted, names.index("lake"))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.band", description=__doc__)
    parser.add_argument("--checkpoint", nargs="+", required=True, help="checkpoints to score")
    parser.add_argument("--precision", help="instead of the service's SATSEG_PRECISION")
    parser.add_argument("--json", help="write the scores here")
    args = parser.parse_args(argv)

    from trainer.prepare import load_bluemarble

    mosaic, labels, _ = load_bluemarble()
    rows, cols = band_window()
    image, truth = np.ascontiguousarray(mosaic[rows, cols]), labels[rows, cols]
    options = service_options(args.precision)
    info = machine()
    print(describe(info), flush=True)
    results = []
    for path in args.checkpoint:
        predictor = Predictor.from_checkpoint(path, options)
        result = score(predictor, image, truth)
        result |= {"checkpoint": str(path), "precision": predictor.precision}
        results.append(result)
        ious = {c["name"]: c["iou"] for c in result["per_class"]}
        print(f"{path}: " + ", ".join(f"{n} {v:.4f}" for n, v in ious.items()), flush=True)
    if results and "lake_recall_by_size" in results[0]:
        headers = ["checkpoint"] + [
            f"lakes of {r['pixels_from']}-{r['pixels_to']} px ({r['pixels']} px)"
            for r in results[0]["lake_recall_by_size"]
        ]
        table = [
            [Path(r["checkpoint"]).parent.name]
            + [f"{s['recall']:.3f}" for s in r["lake_recall_by_size"]]
            for r in results
        ]
        print("\nlake recall by lake size\n" + markdown_table(headers, table))
    if args.json:
        band = {"rows": [rows.start, rows.stop], "cols": [cols.start, cols.stop]}
        write_json(args.json, {"machine": info, "band": band, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
