import json

import numpy as np
import pytest
import torch

from shared.metrics import BoundaryIoU, ConfusionMatrix, boundary_band, erode, scores

NAMES = ["ocean", "land", "lake"]

# truth / prediction, 2x3; the 255 pixel is ignored whatever is predicted there.
TRUTH = np.array([[0, 0, 1], [1, 1, 255]])
PRED = np.array([[0, 1, 1], [1, 0, 2]])
# Counted pairs (truth, pred): (0,0) (0,1) (1,1) (1,1) (1,0)
EXPECTED = np.array([[1, 1, 0], [1, 2, 0], [0, 0, 0]])


def test_confusion_matrix_by_hand():
    cm = ConfusionMatrix(3)
    cm.update(PRED, TRUTH)
    assert cm.matrix.dtype == np.int64
    np.testing.assert_array_equal(cm.matrix, EXPECTED)


def test_rows_are_truth_columns_are_prediction():
    cm = ConfusionMatrix(2)
    cm.update(np.array([1]), np.array([0]))  # truth 0 predicted as 1
    assert cm.matrix.tolist() == [[0, 1], [0, 0]]


def test_ignore_index_is_excluded_whatever_the_prediction():
    cm = ConfusionMatrix(2, ignore_index=7)
    cm.update(np.array([0, 1, 1]), np.array([7, 7, 1]))
    assert cm.matrix.tolist() == [[0, 0], [0, 1]]


def test_update_accumulates_and_accepts_tensors_of_any_shape():
    cm = ConfusionMatrix(3)
    cm.update(torch.from_numpy(PRED)[None], torch.from_numpy(TRUTH)[None])  # (1, H, W)
    cm.update(PRED.ravel().astype(np.uint8), TRUTH.ravel().astype(np.uint8))
    np.testing.assert_array_equal(cm.matrix, 2 * EXPECTED)


def test_merge_and_reset():
    a, b = ConfusionMatrix(3), ConfusionMatrix(3)
    a.update(PRED, TRUTH)
    b.update(PRED, TRUTH)
    a.merge(b)
    np.testing.assert_array_equal(a.matrix, 2 * EXPECTED)
    with pytest.raises(ValueError):
        a.merge(ConfusionMatrix(2))
    a.reset()
    assert a.matrix.sum() == 0


@pytest.mark.parametrize(
    ("pred", "target", "needle"),
    [
        (np.array([0, 3]), np.array([0, 1]), "pred has ids outside 0..2: [3]"),
        (np.array([0, 1]), np.array([0, 5]), "target has ids outside 0..2: [5]"),
        (np.array([0, 1]), np.array([0, 1, 1]), "shape"),
    ],
)
def test_update_rejects_bad_input(pred, target, needle):
    with pytest.raises(ValueError) as info:
        ConfusionMatrix(3).update(pred, target)
    assert needle in str(info.value)


def test_scores_by_hand():
    s = scores(EXPECTED, NAMES)
    ocean, land, lake = s["per_class"]
    # ocean: tp 1, support 2, predicted 2 -> IoU 1/3, Dice 2/4
    assert ocean == {
        "id": 0,
        "name": "ocean",
        "iou": pytest.approx(1 / 3),
        "dice": pytest.approx(0.5),
        "precision": pytest.approx(0.5),
        "recall": pytest.approx(0.5),
        "support_pixels": 2,
        "predicted_pixels": 2,
    }
    # land: tp 2, support 3, predicted 3 -> IoU 2/4, Dice 4/6
    assert land["iou"] == pytest.approx(0.5)
    assert land["dice"] == pytest.approx(2 / 3)
    assert land["precision"] == pytest.approx(2 / 3) and land["recall"] == pytest.approx(2 / 3)
    # 3 of 5 counted pixels right
    assert s["pixel_accuracy"] == pytest.approx(0.6)
    # lake is in neither truth nor prediction: null, and left out of the means
    assert lake["iou"] is None and lake["dice"] is None
    assert lake["precision"] is None and lake["recall"] is None
    assert s["miou"] == pytest.approx((1 / 3 + 0.5) / 2)
    assert s["mean_dice"] == pytest.approx((0.5 + 2 / 3) / 2)


def test_predicted_but_absent_class_scores_zero_not_null():
    # truth all ocean, one pixel predicted lake: lake IoU 0 (it counts against the mean)
    s = scores(np.array([[3, 0, 1], [0, 0, 0], [0, 0, 0]]), NAMES)
    lake = s["per_class"][2]
    assert lake["iou"] == 0.0 and lake["precision"] == 0.0
    assert lake["recall"] is None  # no lake pixels to recall
    assert s["per_class"][1]["iou"] is None
    assert s["miou"] == pytest.approx((3 / 4 + 0.0) / 2)


def test_scores_of_empty_matrix_are_null_and_json_safe():
    s = scores(np.zeros((3, 3), dtype=np.int64), NAMES)
    assert s["pixel_accuracy"] is None and s["miou"] is None and s["mean_dice"] is None
    assert json.loads(json.dumps(s)) == s


def test_scores_are_plain_python_types():
    s = scores(EXPECTED, NAMES)
    assert json.loads(json.dumps(s))["per_class"][2]["iou"] is None
    assert all(type(c["support_pixels"]) is int for c in s["per_class"])


def test_scores_checks_names():
    with pytest.raises(ValueError):
        scores(EXPECTED, NAMES[:2])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_iou_agrees_with_direct_computation(seed):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 4, size=(3, 17, 23))
    truth[rng.random(truth.shape) < 0.1] = 255
    pred = rng.integers(0, 4, size=truth.shape)
    cm = ConfusionMatrix(4)
    cm.update(pred, truth)
    s = scores(cm.matrix, ["a", "b", "c", "d"])
    valid = truth != 255
    for c in range(4):
        p, t = (pred == c) & valid, (truth == c) & valid
        iou = np.logical_and(p, t).sum() / np.logical_or(p, t).sum()
        assert s["per_class"][c]["iou"] == pytest.approx(iou)
    assert s["pixel_accuracy"] == pytest.approx((pred == truth)[valid].mean())


# -- boundary IoU ---------------------------------------------------------------------------------


def square(size: int = 9, lo: int = 2, hi: int = 7) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.int64)
    mask[lo:hi, lo:hi] = 1
    return mask


def test_erode_and_band_by_hand():
    mask = square(7, 1, 6).astype(bool)  # 5x5 square in a 7x7 frame
    eroded = erode(mask, 1)
    assert eroded.sum() == 9 and eroded[2:5, 2:5].all()
    band = boundary_band(mask, 1)
    assert band.sum() == 25 - 9
    assert erode(mask, 2).sum() == 1 and erode(mask, 3).sum() == 0


def test_image_edge_is_not_a_boundary():
    full = np.ones((4, 5), dtype=bool)
    assert erode(full, 2).all()
    assert not boundary_band(full, 2).any()
    half = np.zeros((4, 6), dtype=bool)
    half[:, :3] = True  # only the vertical edge at column 3 is a boundary
    assert boundary_band(half, 1).tolist() == [[False, False, True, False, False, False]] * 4


def test_boundary_iou_perfect_prediction():
    b = BoundaryIoU(2, width=1)
    b.update(square(), square())
    assert b.compute() == [1.0, 1.0]


def test_boundary_iou_by_hand():
    truth = square(9, 2, 7)  # 5x5 square: band of class 1 is its 16-pixel ring
    pred = square(9, 2, 6)  # 4x4 square: band is its 12-pixel ring
    b = BoundaryIoU(2, width=1)
    b.update(pred, truth)
    # class 1 rings share the top and left sides: rows 2, cols 2..5 and cols 2, rows 2..5 -> 7
    band_t = boundary_band(truth == 1, 1)
    band_p = boundary_band(pred == 1, 1)
    assert band_t.sum() == 16 and band_p.sum() == 12
    assert (band_t & band_p).sum() == 7
    assert b.compute()[1] == pytest.approx(7 / (16 + 12 - 7))


def test_boundary_iou_is_null_without_boundaries_and_ignores_pixels():
    b = BoundaryIoU(3, width=1)
    b.update(np.zeros((4, 4), np.int64), np.zeros((4, 4), np.int64))
    assert b.compute() == [None, None, None]  # one class everywhere: no boundary at all
    truth = square()
    truth[:, :5] = 255  # the left half is unlabelled: its edge is no boundary
    for fill in (0, 1):  # whatever is predicted there must not matter
        pred = square()
        pred[:, :5] = fill
        b = BoundaryIoU(2, width=1)
        b.update(pred, truth)
        assert b.compute() == [1.0, 1.0]


def test_boundary_iou_accumulates_over_updates():
    one, two = BoundaryIoU(2, width=1), BoundaryIoU(2, width=1)
    pairs = [(square(9, 2, 6), square(9, 2, 7)), (square(9, 1, 7), square(9, 2, 7))]
    for pred, truth in pairs:
        one.update(pred, truth)
    two.update(np.stack([p for p, _ in pairs]), np.stack([t for _, t in pairs]))
    assert one.compute() == two.compute()
    inter = sum((boundary_band(p == 1, 1) & boundary_band(t == 1, 1)).sum() for p, t in pairs)
    union = sum((boundary_band(p == 1, 1) | boundary_band(t == 1, 1)).sum() for p, t in pairs)
    assert one.compute()[1] == pytest.approx(inter / union)


def test_boundary_iou_wider_band_is_more_forgiving():
    truth, pred = square(12, 2, 9), square(12, 3, 10)  # shifted by one pixel
    narrow, wide = BoundaryIoU(2, width=1), BoundaryIoU(2, width=3)
    narrow.update(pred, truth)
    wide.update(pred, truth)
    assert wide.compute()[1] > narrow.compute()[1]


def test_boundary_iou_rejects_bad_arguments():
    with pytest.raises(ValueError):
        BoundaryIoU(2, width=0)
    with pytest.raises(ValueError, match="shape"):
        BoundaryIoU(2).update(np.zeros((2, 2), np.int64), np.zeros((2, 3), np.int64))
