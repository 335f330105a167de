"""Tests for shared/acceleration.py: BN folding, int8 quantisation, agreement, inputs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import shared.inference as inference
import shared.precision as precision
from shared.acceleration import (
    CALIBRATION_REGION,
    LAKE_DISTRICTS,
    Agreement,
    AgreementGate,
    Forward,
    QuantizationError,
    bluemarble_crops,
    calibration_batches,
    calibration_set,
    configure_threads,
    fold_bn,
    optimize,
    pixel_agreement,
)
from shared.inference import InferenceOptions, Predictor
from shared.labels import LabelMap
from shared.model import BACKBONES, build_model
from shared.preprocess import Normalization
from tests.toy_models import LAKE, Toy, lake_fragile_inputs, one_hot_images


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny convolutions on several threads crawl when other processes hold the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fold_bn_removes_batchnorm_and_keeps_the_function() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).eval()
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
        net[1].weight.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    folded = fold_bn(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(folded(x), net(x), atol=1e-5, rtol=1e-5)
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())  # the original is intact


def test_fold_bn_refuses_a_model_in_train_mode() -> None:
    with pytest.raises(ValueError, match="eval mode"):
        fold_bn(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).train())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_float_forward_gives_the_main_logits_without_the_aux_head(precision: str) -> None:
    x, labels = one_hot_images(2)
    forward = optimize(Toy().eval(), precision=precision)
    out = forward(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 16, 16)
    assert out.dtype == (torch.float32 if precision == "fp32" else torch.bfloat16)
    assert torch.equal(out.argmax(dim=1), labels)
    assert not any(name.endswith("aux_classifier") for name, _ in forward.named_modules())


def test_fp32_forward_matches_the_eager_model() -> None:
    model = Toy().eval()
    x, _ = one_hot_images(1)
    torch.testing.assert_close(optimize(model, precision="fp32")(x), model(x)["out"])


def test_optimize_leaves_the_model_untouched() -> None:
    model = Toy().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimize(model, quantize="int8", calibration=[one_hot_images(2)[0]])
    assert model.aux_classifier is not None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_int8_keeps_the_argmax_of_a_model_with_clear_margins() -> None:
    calibration = [one_hot_images(4, seed=s)[0] for s in range(2)]
    x, labels = one_hot_images(3, seed=7)
    gate = AgreementGate(min_pixel=0.99, min_class_iou=0.99)
    forward = optimize(Toy().eval(), quantize="int8", calibration=calibration, gate=gate)
    assert forward.agreement is not None and forward.agreement.pixel >= 0.99
    out = forward(x)
    assert out.dtype == torch.float32 and out.shape == (3, 3, 16, 16)
    assert torch.equal(out.argmax(dim=1), labels)
    # The convolutions are integer now, except the last 1x1 which stays float.
    assert any(isinstance(m, torch.ao.nn.quantized.Conv2d) for m in forward.modules())
    assert isinstance(forward.graph.get_submodule("model.classifier.4"), nn.Conv2d)


def test_int8_raises_when_agreement_is_below_the_floor() -> None:
    # Calibrated on near-zero inputs, every real input saturates: the argmax collapses.
    calibration = [torch.rand(2, 3, 16, 16) * 0.01]
    real = [one_hot_images(2)[0]]
    with pytest.raises(QuantizationError, match="pixel agreement 0.[0-9]+ < 0.99"):
        optimize(
            Toy().eval(),
            quantize="int8",
            calibration=calibration,
            gate=AgreementGate(min_pixel=0.99, min_class_iou=0.0),
            validation=real,
        )


def test_agreement_scores_each_class_by_the_iou_of_the_two_predictions() -> None:
    # By hand: float32 says 0 0 1 1 2 2 0 0, the candidate 0 0 1 1 2 1 0 1.
    reference = torch.tensor([[[0, 0, 1, 1], [2, 2, 0, 0]]])
    candidate = torch.tensor([[[0, 0, 1, 1], [2, 1, 0, 1]]])
    agreement = Agreement.measure([reference], [candidate], num_classes=4)
    assert agreement.pixel == pytest.approx(6 / 8)
    # class 0: 3 shared of 4 | class 1: 2 shared of 4 | class 2: 1 of 2 | class 3: nobody's
    assert agreement.class_iou == (pytest.approx(3 / 4), pytest.approx(2 / 4), 0.5, None)
    assert agreement.class_pixels == (4, 2, 2, 0)
    assert agreement.worst_class_iou == 0.5
    gate = AgreementGate(min_pixel=0.7, min_class_iou=0.6)
    assert gate.failures(agreement, ["a", "b", "c", "d"]) == [
        "b IoU 0.500 < 0.6",
        "c IoU 0.500 < 0.6",
    ]
    # Logits are reduced by argmax first; a class the candidate invents has IoU 0.
    logits = torch.nn.functional.one_hot(torch.tensor([[[3, 3]]]), 4).permute(0, 3, 1, 2).float()
    invented = Agreement.measure([torch.tensor([[[0, 0]]])], [logits], num_classes=4)
    assert invented.class_iou == (0.0, None, None, 0.0)


def test_the_gate_refuses_int8_that_loses_a_rare_class_the_pixel_share_misses() -> None:
    calibration, checks = lake_fragile_inputs()
    names = [c.name for c in LabelMap.load().classes]
    # Inputs built so: float32 finds the lakes, with a margin int8 cannot keep.
    lakes = int((Toy().eval()(checks[0])["out"].argmax(dim=1) == LAKE).sum())
    assert lakes > 0
    with pytest.raises(QuantizationError) as caught:
        optimize(
            Toy().eval(),
            quantize="int8",
            calibration=calibration,
            validation=checks,
            gate=AgreementGate(min_pixel=0.995, min_class_iou=0.9),
            class_names=names,
        )
    agreement = caught.value.agreement
    assert agreement is not None and agreement.pixel >= 0.995  # the old, pixel-only gate passes
    assert agreement.class_iou[LAKE] == 0.0 and agreement.class_pixels[LAKE] == lakes
    assert min(agreement.class_iou[:LAKE]) >= 0.99
    message = str(caught.value)
    assert "lake IoU 0.000 < 0.9" in message and "pixel agreement" not in message.split("(")[0]


def test_the_gate_judges_the_decisions_after_the_logit_offsets() -> None:
    # The same fragile lakes, under offsets that never let lake win: what would be served
    # has no lake to lose, so the gate passes and counts no lake pixel.
    calibration, checks = lake_fragile_inputs()
    forward = optimize(
        Toy().eval(),
        quantize="int8",
        calibration=calibration,
        validation=checks,
        gate=AgreementGate(min_pixel=0.995, min_class_iou=0.9),
        logit_offsets=[0.0, 0.0, -1000.0],
    )
    assert forward.agreement is not None and forward.agreement.class_pixels[LAKE] == 0
    assert forward.agreement.pixel >= 0.995


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"precision": "fp64"}, "unknown precision"),
        ({"quantize": "int4"}, "unknown quantize"),
        ({"quantize": "int8"}, "needs calibration"),
        ({"quantize": "int8", "calibration": []}, "at least one"),
        ({"quantize": "int8", "calibration": [torch.zeros(1, 3, 8, 8)], "device": "meta"}, "CPU"),
    ],
)
def test_optimize_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        optimize(Toy().eval(), **kwargs)


@pytest.mark.parametrize(
    "backbone",
    [
        "mobilenet_v3_large",
        "mobilenet_v3_large_deeplabv3plus_s1_aspp960",
        "mobilenet_v3_large_deeplabv3plus_s1_aspp160",
    ],
)
def test_deeplabv3_int8_runs_any_padded_size(backbone: str) -> None:
    model = build_model(backbone, num_classes=3).eval()
    calibration = [torch.randn(2, 3, 64, 64)]
    forward = optimize(model, quantize="int8", calibration=calibration)
    assert isinstance(forward, Forward)
    for shape in [(1, 3, 64, 64), (2, 3, 96, 64)]:
        out = forward(torch.randn(shape))
        assert out.shape == (shape[0], 3, *shape[2:]) and out.dtype == torch.float32


def test_deeplabv3_fp32_folded_matches_eager() -> None:
    torch.manual_seed(0)
    model = build_model("mobilenet_v3_large", num_classes=3).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        expected = model(x)["out"]
    torch.testing.assert_close(optimize(model, precision="fp32")(x), expected, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_folded_matches_eager(backbone: str) -> None:
    # BatchNorm statistics and affine parameters far from a fresh model's (mean 0, variance 1,
    # identity), as training leaves them: folding a BatchNorm into the wrong convolution, or
    # into one whose weights something else also reads, changes the function visibly.
    torch.manual_seed(0)
    model = build_model(backbone, num_classes=3).eval()
    for layer in model.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(layer.weight, 0.5, 1.5)
            nn.init.uniform_(layer.bias, -0.5, 0.5)
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        expected = model(x)["out"]
        folded = optimize(model, precision="fp32")(x)
    torch.testing.assert_close(folded, expected, atol=1e-3, rtol=1e-3)


def test_pixel_agreement_on_logits_and_masks() -> None:
    reference = torch.tensor([[[0, 1], [2, 2]]])  # (1, 2, 2) class ids
    candidate = torch.tensor([[[0, 1], [2, 0]]])
    assert pixel_agreement(reference, candidate) == 0.75
    logits = nn.functional.one_hot(candidate, 3).permute(0, 3, 1, 2).float()  # (1, 3, 2, 2)
    assert pixel_agreement(reference, logits) == 0.75
    assert pixel_agreement(logits, logits) == 1.0
    with pytest.raises(ValueError, match="shapes differ"):
        pixel_agreement(reference, torch.zeros(1, 3, 3, dtype=torch.long))


def test_calibration_batches_normalise_and_batch() -> None:
    norm = Normalization(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    images = [np.full((4, 4, 3), v, np.uint8) for v in (0, 255, 0, 255, 0)]
    batches = list(calibration_batches(images, norm, batch_size=2))
    assert [b.shape[0] for b in batches] == [2, 2, 1]
    assert batches[0].shape == (2, 3, 4, 4) and batches[0].dtype == torch.float32
    assert batches[0][0].unique().tolist() == [-1.0] and batches[0][1].unique().tolist() == [1.0]


def test_bluemarble_crops_are_real_repeatable_and_in_their_region() -> None:
    crops = bluemarble_crops(3, 32, seed=5, region=CALIBRATION_REGION)
    assert len(crops) == 3
    assert all(c.shape == (32, 32, 3) and c.dtype == np.uint8 for c in crops)
    again = bluemarble_crops(3, 32, seed=5, region=CALIBRATION_REGION)
    assert all(np.array_equal(a, b) for a, b in zip(crops, again, strict=True))
    assert crops[0].std() > 0  # imagery, not a blank
    with pytest.raises(ValueError, match="smaller than"):
        bluemarble_crops(1, 64, region=(0, 0, 32, 32))


def test_configure_threads_sets_the_count() -> None:
    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="positive"):
        configure_threads(0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_forward_keeps_the_argmax(precision: str) -> None:
    x, labels = one_hot_images(2)
    forward = optimize(Toy().eval(), device="cuda", precision=precision)
    out = forward(x.cuda())
    assert out.is_cuda and torch.equal(out.argmax(dim=1).cpu(), labels)


# -- the Predictor's optimised path ----------------------------------------------------------


@pytest.fixture
def small_calibration(monkeypatch: pytest.MonkeyPatch) -> None:
    """Calibrate on two 64x64 Blue Marble crops instead of twelve 256x256 ones (speed)."""
    import shared.acceleration as acceleration

    real = acceleration.calibration_set

    def small(normalization: Normalization, **kwargs: object) -> tuple[list, list]:
        return real(normalization, count=2, checks=1, size=64, folder=kwargs.get("folder"))

    monkeypatch.setattr(acceleration, "calibration_set", small)


def test_resolve_precision_int8_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert inference.resolve_precision("int8", cpu) == "int8"
    with pytest.raises(ValueError, match="int8 inference runs on the CPU"):
        inference.resolve_precision("int8", torch.device("cuda", 0))
    monkeypatch.setattr(precision, "cpu_bf16_is_fast", lambda: True)
    monkeypatch.setattr(precision, "has_int8_matmul", lambda: True)
    assert inference.resolve_precision("auto", cpu, optimize=True) == "int8"
    assert inference.resolve_precision("auto", cpu) == "bf16"  # eager models are never int8
    monkeypatch.setattr(precision, "has_int8_matmul", lambda: False)
    assert inference.resolve_precision("auto", cpu, optimize=True) == "bf16"


def test_predictor_int8_runs_a_quantised_forward(
    tiny_checkpoint: Path, small_calibration: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Random weights give near-tied logits, so agreement says nothing here: no floor.
    monkeypatch.setattr(inference, "INT8_GATE", AgreementGate(min_pixel=0.0, min_class_iou=0.0))
    options = InferenceOptions(device="cpu", precision="int8", tile=64, overlap=16)
    predictor = Predictor.from_checkpoint(tiny_checkpoint, options)
    assert predictor.precision == "int8" and isinstance(predictor.forward, Forward)
    assert any(isinstance(m, torch.ao.nn.quantized.Conv2d) for m in predictor.forward.modules())
    logits = predictor.run_batch(torch.zeros((2, 3, 64, 64), dtype=torch.uint8))
    assert logits.shape == (2, 3, 64, 64) and logits.dtype == torch.float32
    mask = predictor.segment(np.zeros((70, 150, 3), np.uint8))
    assert mask.shape == (70, 150) and mask.dtype == np.uint8


def test_predictor_auto_falls_back_when_int8_disagrees(
    tiny_checkpoint: Path, small_calibration: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(precision, "has_int8_matmul", lambda: True)
    monkeypatch.setattr(precision, "cpu_bf16_is_fast", lambda: False)
    nothing_passes = AgreementGate(min_pixel=1.01, min_class_iou=0.0)
    monkeypatch.setattr(inference, "INT8_GATE", nothing_passes)
    options = InferenceOptions(device="cpu", precision="auto", optimize=True, tile=64, overlap=16)
    predictor = Predictor.from_checkpoint(tiny_checkpoint, options)
    assert predictor.precision == "fp32"
    assert "fp32, batchnorm folded" in predictor.forward.description
    with pytest.raises(ValueError, match="int8 inference refused"):
        Predictor.from_checkpoint(tiny_checkpoint, replace(options, precision="int8"))


@pytest.mark.parametrize("bf16", [True, False])
def test_predictor_auto_serves_bf16_when_int8_costs_one_class_and_says_why(
    monkeypatch: pytest.MonkeyPatch, bf16: bool
) -> None:
    import shared.acceleration as acceleration

    calibration, checks = lake_fragile_inputs()
    monkeypatch.setattr(acceleration, "calibration_set", lambda *a, **k: (calibration, checks))
    monkeypatch.setattr(precision, "has_int8_matmul", lambda: True)
    monkeypatch.setattr(precision, "cpu_bf16_is_fast", lambda: bf16)
    options = InferenceOptions(device="cpu", precision="auto", optimize=True, tile=32, overlap=0)
    predictor = Predictor(Toy(), LabelMap.load(), Normalization(), options)

    fallback = "bf16" if bf16 else "fp32"
    assert predictor.precision == fallback
    assert not any(isinstance(m, torch.ao.nn.quantized.Conv2d) for m in predictor.forward.modules())
    assert "int8 refused" in predictor.precision_reason
    assert "lake IoU 0.000 < 0.9" in predictor.precision_reason
    assert predictor.precision_reason.endswith(f"{fallback} instead")
    agreement = predictor.int8_agreement
    assert agreement is not None and agreement.pixel >= 0.995 and agreement.class_iou[LAKE] == 0
    with pytest.raises(ValueError, match="int8 inference refused.*lake IoU"):
        Predictor(Toy(), LabelMap.load(), Normalization(), replace(options, precision="int8"))


def test_predictor_auto_keeps_int8_when_every_class_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    import shared.acceleration as acceleration

    calibration = [one_hot_images(4, seed=s)[0] for s in range(2)]
    checks = [one_hot_images(4, seed=9)[0]]
    monkeypatch.setattr(acceleration, "calibration_set", lambda *a, **k: (calibration, checks))
    monkeypatch.setattr(precision, "has_int8_matmul", lambda: True)
    options = InferenceOptions(device="cpu", precision="auto", optimize=True, tile=32, overlap=0)
    predictor = Predictor(Toy(), LabelMap.load(), Normalization(), options)

    assert predictor.precision == "int8"
    assert "passed the agreement gate" in predictor.precision_reason
    assert "lake 1.000" in predictor.precision_reason
    assert predictor.int8_agreement is not None
    assert predictor.int8_agreement.class_iou == (1.0, 1.0, 1.0)


def test_default_check_crops_come_from_every_lake_district() -> None:
    calibration, checks = calibration_set(Normalization(), count=2, size=64)
    assert sum(b.shape[0] for b in calibration) == 2
    assert sum(b.shape[0] for b in checks) == len(LAKE_DISTRICTS) >= 5
    assert all(tuple(b.shape[1:]) == (3, 64, 64) for b in checks)
    # Each district lies west of the test band (100E..180E), which calibration never sees.
    assert all(lon < 100 for lon, _ in LAKE_DISTRICTS.values())


def test_predictor_optimize_fp32_matches_the_eager_path(tiny_checkpoint: Path) -> None:
    options = InferenceOptions(device="cpu", precision="fp32", tile=64, overlap=16)
    eager = Predictor.from_checkpoint(tiny_checkpoint, options)
    fast = Predictor.from_checkpoint(tiny_checkpoint, replace(options, optimize=True))
    batch = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 3, 64, 64), np.uint8))
    torch.testing.assert_close(fast.run_batch(batch), eager.run_batch(batch), atol=1e-4, rtol=1e-3)


def test_calibration_set_from_a_folder(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (100, 70, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 256, (300, 300, 3), np.uint8)).save(tmp_path / "b.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    calibration, checks = calibration_set(
        Normalization(), folder=tmp_path, count=3, checks=1, size=256
    )
    # Crops come from a, b, a | b in turn: a gives 96x64 (sides cut to multiples of 32),
    # b 256x256; crops of one size share a batch.
    assert sorted(tuple(b.shape) for b in calibration) == [(1, 3, 256, 256), (2, 3, 96, 64)]
    assert [tuple(b.shape) for b in checks] == [(1, 3, 256, 256)]
    with pytest.raises(ValueError, match="does not exist"):
        calibration_set(Normalization(), folder=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no readable image"):
        calibration_set(Normalization(), folder=tmp_path / "empty")
