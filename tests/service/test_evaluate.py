"""POST /evaluate: scores equal an independent numpy computation; every input error is a 422."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pycocotools import mask as coco_mask

from shared.labels import LabelMap
from tests.service.helpers import encode, png_mask, scene

IGNORE = 255


def _predict(client: TestClient, image: np.ndarray) -> np.ndarray:
    response = client.post("/segment", files={"image": ("x.png", encode(image))})
    assert response.status_code == 200
    return png_mask(response.content)


def _evaluate(client: TestClient, pairs: list[tuple[bytes, bytes]], **params: str):
    files = []
    for i, (image, mask) in enumerate(pairs):
        files.append(("image", (f"image{i}.png", image)))
        files.append(("mask", (f"mask{i}.png", mask)))
    return client.post("/evaluate", params=params, files=files)


def _numpy_scores(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> dict:
    """IoU, Dice and accuracy written out from their definitions, ignore_index left out."""
    valid = truth != IGNORE
    p, t = pred[valid], truth[valid]
    ious, dices = [], []
    for c in range(num_classes):
        inter = int(np.sum((p == c) & (t == c)))
        union = int(np.sum((p == c) | (t == c)))
        size = int(np.sum(p == c) + np.sum(t == c))
        ious.append(inter / union if union else None)
        dices.append(2 * inter / size if size else None)
    present = [v for v in ious if v is not None]
    return {
        "iou": ious,
        "dice": dices,
        "miou": sum(present) / len(present),
        "pixel_accuracy": float(np.mean(p == t)),
        "matrix": [
            [int(np.sum((t == i) & (p == j))) for j in range(num_classes)]
            for i in range(num_classes)
        ],
    }


def _truth(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Blocks of classes 0 and 1 with an ignore_index stripe; class 2 never appears."""
    rng = np.random.default_rng(seed)
    truth = (rng.random((shape[0] // 10 + 1, shape[1] // 10 + 1)) > 0.5).astype(np.uint8)
    truth = np.kron(truth, np.ones((10, 10), np.uint8))[: shape[0], : shape[1]]
    truth[:, :3] = IGNORE
    return np.ascontiguousarray(truth)


def _assert_scores(got: dict, expected: dict) -> None:
    for entry, iou, dice in zip(got["per_class"], expected["iou"], expected["dice"], strict=True):
        assert entry["iou"] == (pytest.approx(iou) if iou is not None else None)
        assert entry["dice"] == (pytest.approx(dice) if dice is not None else None)
    assert got["miou"] == pytest.approx(expected["miou"])
    assert got["pixel_accuracy"] == pytest.approx(expected["pixel_accuracy"])
    assert got["confusion_matrix"] == expected["matrix"]


def test_scores_equal_an_independent_numpy_computation(
    client: TestClient, label_map: LabelMap
) -> None:
    images = [scene(60, 80, seed=1), scene(100, 150, seed=2)]
    truths = [_truth((60, 80), 1), _truth((100, 150), 2)]
    preds = [_predict(client, image) for image in images]

    response = _evaluate(
        client, [(encode(i), encode(t)) for i, t in zip(images, truths, strict=True)]
    )

    assert response.status_code == 200
    body = response.json()
    assert body["num_pairs"] == 2
    for pair, pred, truth in zip(body["pairs"], preds, truths, strict=True):
        _assert_scores(pair["scores"], _numpy_scores(pred, truth, label_map.num_classes))
        assert (pair["height"], pair["width"]) == truth.shape
        assert pair["prediction"] is None
    # The aggregate is over all pixels of all pairs, not a mean of per-pair scores.
    all_pred = np.concatenate([p.ravel() for p in preds])
    all_truth = np.concatenate([t.ravel() for t in truths])
    _assert_scores(body["aggregate"], _numpy_scores(all_pred, all_truth, label_map.num_classes))
    assert [c["name"] for c in body["aggregate"]["per_class"]] == label_map.names


def test_iou_is_null_for_a_class_absent_from_truth_and_prediction(client: TestClient) -> None:
    # Prediction and truth are both the prediction itself: classes it never predicts are
    # absent from both, and the present one scores 1. A one-pixel image has one class.
    image = np.full((1, 1, 3), 90, np.uint8)
    pred = _predict(client, image)
    absent = set(range(3)) - set(np.unique(pred).tolist())
    assert len(absent) == 2

    body = _evaluate(client, [(encode(image), encode(pred))]).json()

    for entry in body["pairs"][0]["scores"]["per_class"]:
        assert entry["iou"] is None if entry["id"] in absent else entry["iou"] == 1.0
    assert body["pairs"][0]["scores"]["miou"] == 1.0


def test_colour_masks_score_like_index_masks(client: TestClient, label_map: LabelMap) -> None:
    image = encode(scene(50, 70, seed=6))
    truth = _truth((50, 70), 6)
    truth[truth == IGNORE] = 2  # a colour mask has no ignore colour; use lake instead
    colour = label_map.to_color(truth)

    by_index = _evaluate(client, [(image, encode(truth))]).json()
    by_colour = _evaluate(client, [(image, encode(colour))]).json()

    assert by_index["aggregate"] == by_colour["aggregate"]


def _assert_rle_mask(got: dict, expected: np.ndarray, label_map: LabelMap) -> None:
    """``got`` ({"height", "width", "classes"}) decodes with pycocotools to ``expected``."""
    assert (got["height"], got["width"]) == expected.shape
    assert [c["id"] for c in got["classes"]] == [c.id for c in label_map.classes]
    for entry in got["classes"]:
        rle = {"size": entry["rle"]["size"], "counts": entry["rle"]["counts"].encode()}
        np.testing.assert_array_equal(coco_mask.decode(rle), expected == entry["id"])
        assert entry["area"] == int(np.sum(expected == entry["id"]))
        assert entry["fraction"] == pytest.approx(entry["area"] / expected.size)


def test_format_rle_returns_each_prediction_and_truth(
    client: TestClient, label_map: LabelMap
) -> None:
    image = scene(45, 65, seed=7)
    truth = _truth((45, 65), 7)
    pred = _predict(client, image)

    body = _evaluate(client, [(encode(image), encode(truth))], format="rle").json()

    _assert_rle_mask(body["pairs"][0]["prediction"], pred, label_map)
    _assert_rle_mask(body["pairs"][0]["truth"], truth, label_map)
    # The ignore_index stripe belongs to no class.
    areas = sum(c["area"] for c in body["pairs"][0]["truth"]["classes"])
    assert areas == truth.size - int(np.sum(truth == IGNORE)) > 0


def test_format_png_leaves_the_masks_out(client: TestClient) -> None:
    image = scene(20, 30, seed=8)

    body = _evaluate(client, [(encode(image), encode(_truth((20, 30), 8)))]).json()

    assert body["pairs"][0]["prediction"] is None and body["pairs"][0]["truth"] is None


def test_format_geotiff_is_not_an_evaluate_format(client: TestClient) -> None:
    pair = (encode(scene(20, 30)), encode(_truth((20, 30), 8)))

    message = _error(_evaluate(client, [pair], format="geotiff"), 422, "validation_error")

    assert "format" in message


def _error(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code
    return body["error"]["message"]


def test_mask_of_another_size_is_422_naming_both_sizes(client: TestClient) -> None:
    response = _evaluate(client, [(encode(scene(30, 40)), encode(np.zeros((31, 42), np.uint8)))])

    message = _error(response, 422, "mask_size_mismatch")
    assert "42x31" in message and "40x30" in message
    assert "mask0.png" in message and "image0.png" in message


def test_unknown_mask_values_are_422_naming_them(client: TestClient) -> None:
    mask = np.zeros((30, 40), np.uint8)
    mask[0, 0], mask[5, 5] = 7, 9

    message = _error(
        _evaluate(client, [(encode(scene(30, 40)), encode(mask))]), 422, "unknown_mask_values"
    )

    assert "7" in message and "9" in message


def test_unknown_mask_colours_are_422(client: TestClient) -> None:
    mask = np.zeros((30, 40, 3), np.uint8)
    mask[...] = (1, 2, 3)

    _error(_evaluate(client, [(encode(scene(30, 40)), encode(mask))]), 422, "unknown_mask_values")


@pytest.mark.parametrize(("images", "masks"), [(2, 1), (1, 2), (1, 3)])
def test_unequal_numbers_of_images_and_masks_are_422(
    client: TestClient, images: int, masks: int
) -> None:
    image, mask = encode(scene(20, 20)), encode(np.zeros((20, 20), np.uint8))
    files = [("image", ("i.png", image))] * images + [("mask", ("m.png", mask))] * masks

    message = _error(client.post("/evaluate", files=files), 422, "pair_count_mismatch")

    assert f"{images} image(s) and {masks} mask(s)" in message


def test_missing_mask_field_is_422(client: TestClient) -> None:
    response = client.post("/evaluate", files={"image": ("i.png", encode(scene(20, 20)))})

    assert "mask" in _error(response, 422, "validation_error")


def test_too_many_pairs_is_422(app_factory) -> None:
    pair = (encode(scene(8, 8)), encode(np.zeros((8, 8), np.uint8)))
    with app_factory(max_pairs=2) as client:
        _error(_evaluate(client, [pair] * 3), 422, "too_many_pairs")
        assert _evaluate(client, [pair] * 2).status_code == 200


def test_a_corrupt_mask_is_400_naming_the_file(client: TestClient) -> None:
    response = _evaluate(client, [(encode(scene(20, 20)), b"not a png at all")])

    assert "mask 0 ('mask0.png')" in _error(response, 400, "corrupt_image")


def test_the_second_pair_is_named_in_its_error(client: TestClient) -> None:
    good = (encode(scene(20, 20)), encode(np.zeros((20, 20), np.uint8)))
    bad = (encode(scene(20, 20)), encode(np.zeros((21, 20), np.uint8)))

    assert "Pair 1" in _error(_evaluate(client, [good, bad]), 422, "mask_size_mismatch")
