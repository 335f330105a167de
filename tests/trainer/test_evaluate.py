from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shared.inference import InferenceOptions, Predictor
from shared.preprocess import IMAGENET_MEAN, IMAGENET_STD
from tests.trainer.conftest import CLASS_RGB
from trainer.data import collect_pairs
from trainer.evaluate import evaluate_pairs, format_table, main

OPTIONS = InferenceOptions(device="cpu", precision="fp32", tile=64, overlap=16)


def colour_oracle(x: torch.Tensor) -> torch.Tensor:
    """Normalised (N,3,h,w) -> logits that pick the class whose colour is nearest: a perfect
    model for the synthetic tiles, whose pixels are their class colour plus small noise."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = (x * std + mean) * 255.0
    colours = torch.tensor(CLASS_RGB, dtype=torch.float32)  # (C,3)
    distance = ((rgb.unsqueeze(1) - colours.view(1, -1, 3, 1, 1)) ** 2).sum(dim=2)
    return -distance


def always(class_id: int):
    def forward(x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], 3, *x.shape[-2:])
        logits[:, class_id] = 1.0
        return logits

    return forward


@pytest.fixture
def predictor(tiny_checkpoint: Path) -> Predictor:
    return Predictor.from_checkpoint(tiny_checkpoint, OPTIONS)


def test_a_perfect_model_scores_one(predictor: Predictor, dataset: Path) -> None:
    predictor.forward = colour_oracle
    result = evaluate_pairs(predictor, collect_pairs(dataset, "test", predictor.label_map))
    assert result["images"] == 2
    assert result["pixel_accuracy"] == 1.0 and result["miou"] == 1.0
    for c in result["per_class"]:
        if c["support_pixels"]:
            assert (c["iou"], c["dice"], c["precision"], c["recall"]) == (1.0, 1.0, 1.0, 1.0)
            assert c["boundary_iou"] == 1.0


def test_an_all_ocean_model_scores_the_ocean_share(predictor: Predictor, dataset: Path) -> None:
    predictor.forward = always(0)
    pairs = collect_pairs(dataset, "test", predictor.label_map)
    result = evaluate_pairs(predictor, pairs)
    ocean, land, _ = result["per_class"]
    total = sum(c["support_pixels"] for c in result["per_class"])
    share = ocean["support_pixels"] / total
    assert ocean["iou"] == pytest.approx(share) and ocean["recall"] == 1.0
    assert land["iou"] == 0.0 and land["precision"] is None  # never predicted: 0/0
    assert result["pixel_accuracy"] == pytest.approx(share)
    assert result["confusion_matrix"][1][0] == land["support_pixels"]


def test_cli_prints_the_table_and_writes_json(
    tiny_checkpoint: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "m.json"
    rc = main(
        ["--checkpoint", str(tiny_checkpoint), "--data", str(dataset), "--json", str(out),
         "--device", "cpu", "--tile", "64", "--overlap", "16"]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0
    for word in ("ocean", "land", "lake", "IoU", "bIoU", "mIoU", "pixel accuracy"):
        assert word in printed
    result = json.loads(out.read_text())
    assert result["split"] == "test" and result["images"] == 2
    assert len(result["per_class"]) == 3
    assert {"iou", "dice", "precision", "recall", "boundary_iou"} <= set(result["per_class"][0])


@pytest.mark.parametrize(
    ("checkpoint", "data", "named"),
    [
        ("missing.pt", "data", "missing.pt"),
        ("garbage.pt", "data", "garbage.pt"),
        ("ok", "no-such-folder", "no-such-folder"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(
    tiny_checkpoint: Path,
    dataset: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    checkpoint: str,
    data: str,
    named: str,
) -> None:
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 10)
    ckpt = tiny_checkpoint if checkpoint == "ok" else tmp_path / checkpoint
    root = dataset if data == "data" else tmp_path / data
    rc = main(["--checkpoint", str(ckpt), "--data", str(root), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2
    assert named in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_mask_with_unknown_labels_is_named(
    tiny_checkpoint: Path, dataset: Path, capsys: pytest.CaptureFixture
) -> None:
    import numpy as np
    from PIL import Image

    bad = dataset / "TEST_SET" / "MASKS" / "tile001.png"
    Image.fromarray(np.full((64, 64), 9, dtype=np.uint8), mode="L").save(bad)
    rc = main(["--checkpoint", str(tiny_checkpoint), "--data", str(dataset), "--device", "cpu"])
    assert rc == 2 and "tile001.png" in capsys.readouterr().err


def test_table_shows_missing_values_as_dashes() -> None:
    result = {
        "per_class": [
            {"name": "ocean", "iou": 0.5, "dice": 0.6667, "precision": 1.0, "recall": 0.5,
             "boundary_iou": 0.25, "support_pixels": 10},
            {"name": "lake", "iou": None, "dice": None, "precision": None, "recall": None,
             "boundary_iou": None, "support_pixels": 0},
        ],
        "miou": 0.5, "mean_dice": 0.6667, "mean_boundary_iou": 0.25, "pixel_accuracy": 0.5,
    }  # fmt: skip
    lines = format_table(result).splitlines()
    assert lines[2].split() == ["ocean", "0.5000", "0.6667", "1.0000", "0.5000", "0.2500", "10"]
    assert lines[3].split() == ["lake", "-", "-", "-", "-", "-", "0"]
