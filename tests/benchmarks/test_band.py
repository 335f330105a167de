from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks import band
from shared.inference import InferenceOptions, Predictor
from tests.service.helpers import scene


def test_the_band_window_is_100e_to_180e_within_70_degrees_of_the_equator() -> None:
    rows, cols = band.band_window()
    # 15 px per degree: rows 300..2400 are 70N..70S, columns 4200..5400 are 100E..180E.
    assert (rows.start, rows.stop) == (300, 2400)
    assert (cols.start, cols.stop) == (4200, 5400)


def test_lake_recall_by_size_counts_each_lake_in_its_size_range() -> None:
    truth = np.zeros((20, 40), np.uint8)
    truth[1, 1] = 2  # a 1 px lake, missed
    truth[5:8, 5:9] = 2  # a 12 px lake, 6 px found
    truth[10:18, 20:39] = 2  # a 152 px lake, all found
    predicted = np.zeros_like(truth)
    predicted[5:8, 5:7] = 2
    predicted[10:18, 20:39] = 2
    predicted[0, 30] = 2  # a false lake changes no recall
    rows = band.lake_recall_by_size(truth, predicted, lake=2)
    assert [(r["lakes"], r["pixels"]) for r in rows] == [(1, 1), (1, 12), (1, 152), (0, 0)]
    assert [r["recall"] for r in rows] == [0.0, pytest.approx(0.5), 1.0, None]


def test_score_gives_per_class_iou_and_lake_recall_of_the_served_mask(
    varied_checkpoint: Path,
) -> None:
    predictor = Predictor.from_checkpoint(
        varied_checkpoint, InferenceOptions(device="cpu", precision="fp32", tile=64, overlap=16)
    )
    image = scene(90, 130, seed=2)
    truth = predictor.segment(image)
    assert (truth == 2).any()
    result = band.score(predictor, image, truth)  # the model against itself
    assert [c["iou"] for c in result["per_class"]] == [1.0, 1.0, 1.0]
    assert sum(r["pixels"] for r in result["lake_recall_by_size"]) == int((truth == 2).sum())
    assert all(r["recall"] in (1.0, None) for r in result["lake_recall_by_size"])
