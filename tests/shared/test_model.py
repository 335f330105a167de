from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import mobilenet_v3_large, resnet18, resnet50
from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

import shared.model as model_mod
from shared.model import (
    BACKBONE_ALIASES,
    BACKBONES,
    WEIGHTS,
    WeightsUnavailableError,
    build_model,
    canonical_backbone,
    first_conv,
    logits,
)

MBV3 = "mobilenet_v3_large"
COCO_MBV3_FILE = "deeplabv3_mobilenet_v3_large-fc3c493d.pth"
IMAGENET_MBV3_FILE = "mobilenet_v3_large-8738ca79.pth"


@pytest.fixture
def hub_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache, and downloads that fail as they do offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    # torch.hub imported urlopen by name; patch both so no code path can reach the network.
    monkeypatch.setattr(torch.hub, "urlopen", offline)
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    return Path(torch.hub.get_dir())


def _random_coco_mbv3_state() -> dict[str, torch.Tensor]:
    """What the COCO-with-VOC file holds: 21 classes and an aux head (random values here)."""
    torch.manual_seed(1)
    m = deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=21, aux_loss=True
    )
    return m.state_dict()


@pytest.mark.parametrize("backbone", BACKBONES)
def test_none_builds_offline_with_requested_classes(backbone: str, hub_dir: Path) -> None:
    model = build_model(backbone, num_classes=5, weights="none").eval()
    assert model.classifier[4].out_channels == 5
    assert model.aux_classifier is None
    with torch.inference_mode():
        out = logits(model, torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, 5, 64, 64)
    assert not (hub_dir / "checkpoints").exists()


def test_aux_loss_keeps_aux_head() -> None:
    model = build_model(MBV3, num_classes=3, aux_loss=True).eval()
    assert model.aux_classifier[4].out_channels == 3
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, 64, 64))
    assert set(out) == {"out", "aux"}
    assert out["aux"].shape == (1, 3, 64, 64)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"backbone": "vgg16"}, "resnet50, mobilenet_v3_large, mobilenet_v3_large_os8"),
        ({"weights": "coco"}, "none, coco_voc, imagenet"),
        ({"weights": "/no/such/weights.pth"}, "none, coco_voc, imagenet"),
        ({"num_classes": 0}, "num_classes"),
    ],
)
def test_bad_arguments_raise_value_error_naming_allowed_values(kwargs: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        build_model(**kwargs)


@pytest.mark.parametrize(
    ("weights", "filename"), [("coco_voc", COCO_MBV3_FILE), ("imagenet", IMAGENET_MBV3_FILE)]
)
def test_offline_download_says_where_to_put_the_file(
    weights: str, filename: str, hub_dir: Path
) -> None:
    with pytest.raises(WeightsUnavailableError) as info:
        build_model(MBV3, num_classes=3, weights=weights)
    message = str(info.value)
    assert str(hub_dir / "checkpoints" / filename) in message
    assert f"https://download.pytorch.org/models/{filename}" in message
    assert "local weights file" in message


def test_resnet_coco_names_its_file(hub_dir: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match="deeplabv3_resnet50_coco-cd0a2569.pth"):
        build_model("resnet50", weights="coco_voc")


def test_offline_error_when_the_download_function_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fail)
    with pytest.raises(WeightsUnavailableError, match="no route to host"):
        build_model(MBV3, weights="imagenet")


def test_coco_voc_from_pre_placed_cache_file_replaces_heads(hub_dir: Path) -> None:
    state = _random_coco_mbv3_state()
    (hub_dir / "checkpoints").mkdir(parents=True)
    torch.save(state, hub_dir / "checkpoints" / COCO_MBV3_FILE)

    model = build_model(MBV3, num_classes=3, weights="coco_voc")

    own = model.state_dict()
    assert torch.equal(own["backbone.0.0.weight"], state["backbone.0.0.weight"])
    assert torch.equal(own["classifier.0.convs.0.0.weight"], state["classifier.0.convs.0.0.weight"])
    head = model.classifier[4]
    assert (head.in_channels, head.out_channels, head.kernel_size) == (256, 3, (1, 1))
    assert model.aux_classifier is None


def test_coco_voc_with_aux_replaces_aux_head_too(hub_dir: Path) -> None:
    (hub_dir / "checkpoints").mkdir(parents=True)
    torch.save(_random_coco_mbv3_state(), hub_dir / "checkpoints" / COCO_MBV3_FILE)

    model = build_model(MBV3, num_classes=4, weights="coco_voc", aux_loss=True)

    # MobileNetV3's aux head works on 40 // 4 = 10 channels, not 256.
    aux = model.aux_classifier[4]
    assert (aux.in_channels, aux.out_channels) == (10, 4)
    with torch.inference_mode():
        out = model.eval()(torch.zeros(1, 3, 64, 64))
    assert out["out"].shape == out["aux"].shape == (1, 4, 64, 64)


def test_corrupt_cache_file_is_reported(hub_dir: Path) -> None:
    (hub_dir / "checkpoints").mkdir(parents=True)
    (hub_dir / "checkpoints" / COCO_MBV3_FILE).write_bytes(b"\x00" * 10)
    with pytest.raises(WeightsUnavailableError, match="unreadable or corrupt"):
        build_model(MBV3, weights="coco_voc")


def test_imagenet_loads_backbone_only(hub_dir: Path) -> None:
    torch.manual_seed(2)
    classifier = mobilenet_v3_large(weights=None)
    (hub_dir / "checkpoints").mkdir(parents=True)
    torch.save(classifier.state_dict(), hub_dir / "checkpoints" / IMAGENET_MBV3_FILE)

    model = build_model(MBV3, num_classes=3, weights="imagenet")

    assert torch.equal(
        model.backbone["4"].block[0][0].weight, classifier.features[4].block[0][0].weight
    )
    assert torch.equal(model.backbone["16"][0].weight, classifier.features[16][0].weight)
    assert model.classifier[4].out_channels == 3


def test_resnet_backbone_mapping_drops_fc() -> None:
    torch.manual_seed(3)
    classifier = resnet50(weights=None)
    model = build_model("resnet50", num_classes=3)
    model_mod._load_backbone(model, classifier.state_dict(), "resnet50", source="test")
    assert torch.equal(model.backbone.layer4[2].conv3.weight, classifier.layer4[2].conv3.weight)


def test_local_state_dict_and_backbone_file(tmp_path: Path) -> None:
    torch.manual_seed(4)
    source = build_model(MBV3, num_classes=3)
    full = tmp_path / "full.pth"
    torch.save(source.state_dict(), full)
    loaded = build_model(MBV3, num_classes=3, weights=str(full))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    backbone_only = tmp_path / "mbv3_imagenet.pth"
    torch.save(mobilenet_v3_large(weights=None).state_dict(), backbone_only)
    build_model(MBV3, num_classes=3, weights=str(backbone_only))


def test_local_checkpoint_with_other_class_count_warns_and_keeps_backbone(
    tiny_checkpoint: Path,
) -> None:
    state = torch.load(tiny_checkpoint, weights_only=True)["state_dict"]
    with pytest.warns(UserWarning, match=r"different number of classes.*classifier\.4\.weight"):
        model = build_model(MBV3, num_classes=5, weights=str(tiny_checkpoint))
    own = model.state_dict()
    assert own["classifier.4.weight"].shape[0] == 5
    assert torch.equal(own["backbone.0.0.weight"], state["backbone.0.0.weight"])
    assert torch.equal(own["classifier.1.weight"], state["classifier.1.weight"])


def test_prefixed_keys_from_wrapped_models_load(tmp_path: Path) -> None:
    source = build_model(MBV3, num_classes=3)
    path = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)
    loaded = build_model(MBV3, num_classes=3, weights=str(path))
    assert torch.equal(loaded.classifier[4].weight, source.classifier[4].weight)


def test_local_file_for_another_backbone_is_refused(tiny_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        build_model("resnet50", num_classes=3, weights=str(tiny_checkpoint))


def test_local_unsafe_pickle_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple:
            return (Path.touch, (marker,))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": Payload()}}, path)
    with pytest.raises(WeightsUnavailableError, match="refusing"):
        build_model(MBV3, weights=str(path))
    assert not marker.exists()


def test_local_file_without_tensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notweights.pth"
    torch.save({"hello": "world"}, path)
    with pytest.raises(ValueError, match="no state_dict"):
        build_model(MBV3, weights=str(path))


def test_logits_returns_the_out_entry() -> None:
    class Fake(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"out": x * 2, "aux": x}

    x = torch.ones(1, 2, 3, 3)
    assert torch.equal(logits(Fake(), x), x * 2)


def test_weights_names() -> None:
    assert WEIGHTS == ("none", "coco_voc", "imagenet")
    assert os.path.basename(model_mod._COCO_WEIGHTS[MBV3].url) == COCO_MBV3_FILE


# --------------------------------------------------------------------------- input bands

RELIEF_BANDS = ("red", "green", "blue", "relief")


def test_adapt_rgb_kernels_maps_by_name_not_position() -> None:
    torch.manual_seed(5)
    rgb = torch.randn(8, 3, 3, 3)
    bgr = model_mod.adapt_rgb_kernels(rgb, ("Blue", "green", "RED"))
    assert torch.equal(bgr[:, 0], rgb[:, 2])  # blue kernel for the blue band, scale 3/3
    assert torch.equal(bgr[:, 1], rgb[:, 1])
    assert torch.equal(bgr[:, 2], rgb[:, 0])
    nir_red = model_mod.adapt_rgb_kernels(rgb, ("nir", "red"))
    assert nir_red.shape == (8, 2, 3, 3)
    torch.testing.assert_close(nir_red[:, 0], rgb.mean(dim=1) * 1.5)
    torch.testing.assert_close(nir_red[:, 1], rgb[:, 0] * 1.5)


def _imagenet_file(tmp_path: Path, backbone: str) -> Path:
    """A torchvision classification state dict, as the ImageNet download holds (random here)."""
    torch.manual_seed(6)
    trunk = {"mobilenet_v3_large": mobilenet_v3_large, "resnet50": resnet50, "resnet18": resnet18}
    classifier = trunk[model_mod._TRUNKS[backbone]](weights=None)
    path = tmp_path / f"{backbone}_imagenet.pth"
    torch.save(classifier.state_dict(), path)
    return path


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pretrained trunk's deepest features (a DeepLabV3+ backbone's trunk is ``body``;
    its ASPP and projection after it start random in every build)."""
    with torch.inference_mode():
        trunk = getattr(model.eval().backbone, "body", model.backbone)
        features = trunk(x)
        return features.get("out", features.get("high"))


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max |b|: randomly initialised backbones end in tiny activations."""
    scale = float(b.abs().max())
    assert scale > 0, "features are all zero: the comparison would prove nothing"
    return float((a - b).abs().max()) / scale


@pytest.mark.parametrize("backbone", BACKBONES)
def test_four_band_model_on_zero_fourth_band_matches_pretrained_rgb(
    backbone: str, tmp_path: Path
) -> None:
    weights = str(_imagenet_file(tmp_path, backbone))
    rgb_model = build_model(backbone, num_classes=3, weights=weights)
    four = build_model(
        backbone, num_classes=3, weights=weights, in_channels=4, band_names=RELIEF_BANDS
    )
    assert model_mod.model_in_channels(four) == 4
    torch.manual_seed(7)
    image = torch.randn(1, 3, 64, 64)
    # The adapted layer is the RGB layer times 3/4, so scale the RGB bands by 4/3 to undo it.
    four_band = torch.cat([image * 4 / 3, torch.zeros(1, 1, 64, 64)], dim=1)
    assert _relative_difference(_features(four, four_band), _features(rgb_model, image)) < 1e-4
    # Without the 4/3 the features differ: the rescaling is real, not a no-op.
    unscaled = torch.cat([image, torch.zeros(1, 1, 64, 64)], dim=1)
    assert _relative_difference(_features(four, unscaled), _features(rgb_model, image)) > 1e-2


def test_coco_voc_weights_adapt_to_four_bands(hub_dir: Path) -> None:
    state = _random_coco_mbv3_state()
    (hub_dir / "checkpoints").mkdir(parents=True)
    torch.save(state, hub_dir / "checkpoints" / COCO_MBV3_FILE)
    rgb_model = build_model(MBV3, num_classes=3, weights="coco_voc")
    four = build_model(
        MBV3, num_classes=3, weights="coco_voc", in_channels=4, band_names=RELIEF_BANDS
    )
    pretrained = state["backbone.0.0.weight"]
    adapted = four.state_dict()["backbone.0.0.weight"]
    torch.testing.assert_close(adapted[:, :3], pretrained * 0.75)
    torch.testing.assert_close(adapted[:, 3], pretrained.mean(dim=1) * 0.75)
    torch.manual_seed(8)
    image = torch.randn(1, 3, 64, 64)
    four_band = torch.cat([image * 4 / 3, torch.zeros(1, 1, 64, 64)], dim=1)
    assert _relative_difference(_features(four, four_band), _features(rgb_model, image)) < 1e-4


def test_blue_green_red_bands_are_not_swapped(tmp_path: Path) -> None:
    weights = str(_imagenet_file(tmp_path, MBV3))
    rgb_model = build_model(MBV3, num_classes=3, weights=weights)
    bgr_model = build_model(
        MBV3, num_classes=3, weights=weights, band_names=("blue", "green", "red")
    )
    torch.manual_seed(9)
    rgb = torch.randn(1, 3, 64, 64)
    bgr = rgb.flip(1)  # the same scene with its bands stored blue, green, red
    assert _relative_difference(_features(bgr_model, bgr), _features(rgb_model, rgb)) < 1e-5
    # Fed in the wrong order the features change: the test would notice a positional mapping.
    assert _relative_difference(_features(bgr_model, rgb), _features(rgb_model, rgb)) > 1e-2


def test_random_init_takes_any_band_count() -> None:
    model = build_model(MBV3, num_classes=3, in_channels=6).eval()
    assert model_mod.first_conv(model).weight.shape[1] == 6
    with torch.inference_mode():
        assert logits(model, torch.zeros(1, 6, 64, 64)).shape == (1, 3, 64, 64)


def test_multiband_local_file_loads_unchanged_and_wrong_count_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(10)
    source = build_model(MBV3, num_classes=3, in_channels=4)
    path = tmp_path / "four.pth"
    torch.save(source.state_dict(), path)
    loaded = build_model(MBV3, num_classes=3, weights=str(path), in_channels=4)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(ValueError, match="first convolution over 4 bands but the model reads 5"):
        build_model(MBV3, weights=str(path), in_channels=5, band_names=("a",) * 5)
    with pytest.raises(ValueError, match="first convolution over 4 bands but the model reads 3"):
        build_model(MBV3, weights=str(path))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": "imagenet", "in_channels": 4}, "need band_names"),
        ({"in_channels": 0}, "in_channels must be a positive int"),
        ({"in_channels": 4, "band_names": ("red", "green", "blue")}, "must list 4 names"),
        ({"in_channels": 1, "band_names": "red"}, "must list 1 names"),
    ],
)
def test_bad_band_arguments(kwargs: dict, message: str, hub_dir: Path) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(MBV3, **kwargs)


def test_rgb_local_file_into_multiband_model_needs_names(tmp_path: Path) -> None:
    weights = str(_imagenet_file(tmp_path, MBV3))
    with pytest.raises(ValueError, match="is RGB; a 4-band model needs band_names"):
        build_model(MBV3, weights=weights, in_channels=4)


@pytest.mark.parametrize("backbone", ["mobilenet_v3_large_os8", "resnet18_os8"])
def test_dilated_backbones_keep_output_stride_8(backbone: str) -> None:
    model = build_model(backbone, num_classes=3).eval()
    with torch.inference_mode():
        features = model.backbone(torch.zeros(1, 3, 64, 96))["out"]
    # A 2-pixel-wide feature a stride-16 model would blur into one cell keeps a cell of its own.
    assert features.shape[-2:] == (8, 12)
    # torchvision's stride-16 model on the same input, for contrast.
    coarse = build_model("mobilenet_v3_large", num_classes=3).eval()
    with torch.inference_mode():
        assert coarse.backbone(torch.zeros(1, 3, 64, 96))["out"].shape[-2:] == (4, 6)


def test_decoder_backbone_joins_stride_4_features() -> None:
    model = build_model("mobilenet_v3_large_deeplabv3plus_s4_aspp960", num_classes=3).eval()
    with torch.inference_mode():
        joined = model.backbone(torch.zeros(1, 3, 64, 96))["out"]
    # ASPP's 128 channels upsampled from stride 16 beside 32 projected from stride 4.
    assert joined.shape == (1, 160, 16, 24)


def test_stride_2_decoder_backbone_joins_stride_2_features() -> None:
    model = build_model("mobilenet_v3_large_deeplabv3plus_s2_aspp960", num_classes=3).eval()
    with torch.inference_mode():
        joined = model.backbone(torch.zeros(1, 3, 64, 96))["out"]
    # The stride-4 decoder's 64 channels upsampled beside 16 projected from stride 2.
    assert joined.shape == (1, 80, 32, 48)


def test_stride_1_decoder_backbone_joins_the_stem_at_full_resolution() -> None:
    model = build_model("mobilenet_v3_large_deeplabv3plus_s1_aspp960", num_classes=3).eval()
    with torch.inference_mode():
        joined = model.backbone(torch.zeros(1, 3, 64, 96))["out"]
    # The stride-2 decoder's 32 channels upsampled beside 16 of the stem's filters at stride 1.
    assert joined.shape == (1, 48, 64, 96)
    # The stem is still the one convolution that reads the bands: a 4-band model has one.
    four = build_model(
        "mobilenet_v3_large_deeplabv3plus_s1_aspp960", num_classes=3, in_channels=4
    ).eval()
    readers = [m for m in four.modules() if isinstance(m, nn.Conv2d) and m.in_channels == 4]
    assert readers == [first_conv(four)]
    with torch.inference_mode():
        assert four(torch.zeros(1, 4, 64, 96))["out"].shape == (1, 3, 64, 96)


def test_aspp160_stride_1_backbone_reads_block_15_into_aspp_and_joins_like_aspp960() -> None:
    lean = build_model("mobilenet_v3_large_deeplabv3plus_s1_aspp160", num_classes=3).eval()
    fine1 = build_model("mobilenet_v3_large_deeplabv3plus_s1_aspp960", num_classes=3).eval()
    assert lean.backbone.aspp.convs[0][0].in_channels == 160
    with torch.inference_mode():
        joined = lean.backbone(torch.zeros(1, 3, 64, 96))["out"]
        assert lean(torch.zeros(1, 3, 64, 96))["out"].shape == (1, 3, 64, 96)
    assert joined.shape == (1, 48, 64, 96)
    count = sum(p.numel() for p in lean.parameters())
    assert count < 0.6 * sum(p.numel() for p in fine1.parameters())


@pytest.mark.parametrize(
    ("backbone", "all_taps_learn"),
    [
        ("mobilenet_v3_large_deeplabv3plus_s1_aspp160", True),
        ("mobilenet_v3_large_deeplabv3plus_s1_aspp960", False),
    ],
)
def test_every_aspp_tap_learns_from_a_192_px_crop_only_with_the_aspp160_rates(
    backbone: str, all_taps_learn: bool
) -> None:
    # A 192 px crop is a 12x12 map at stride 16. A tap of a 3x3 convolution dilated by 12 or
    # more reads padding from every cell, so its weights get no gradient and keep their random
    # initial values, which a larger input at inference then multiplies with real features.
    torch.manual_seed(0)
    model = build_model(backbone, num_classes=3).train()
    out = model(torch.randn(2, 3, 192, 192))["out"]
    out.square().mean().backward()
    off_centre = torch.ones(3, 3, dtype=torch.bool)
    off_centre[1, 1] = False
    learning = [
        bool(branch[0].weight.grad[:, :, off_centre].abs().sum() > 0)
        for branch in model.backbone.aspp.convs[1:4]
    ]
    assert all(learning) == all_taps_learn
    assert learning[0]  # rate 6, or 2: some cells of a 12x12 map reach a neighbour


def one_pixel_change(backbone: str) -> torch.Tensor:
    """(H, W): how much a fixed random model's logits change, summed over classes, when pixel
    (32, 32) of a 64 x 64 noise image is raised by 5: the footprint of a lake one pixel wide."""
    torch.manual_seed(0)
    model = build_model(backbone, num_classes=3).eval()
    torch.manual_seed(3)
    image = torch.randn(1, 3, 64, 64)
    dotted = image.clone()
    dotted[0, :, 32, 32] += 5.0
    with torch.inference_mode():
        return (model(dotted)["out"] - model(image)["out"]).abs().sum(1)[0]


@pytest.mark.parametrize(
    ("backbone", "sharp"),
    [
        ("mobilenet_v3_large_deeplabv3plus_s1_aspp960", True),
        ("mobilenet_v3_large_deeplabv3plus_s2_aspp960", False),
    ],
)
def test_a_one_pixel_feature_stays_within_two_pixels_with_the_stride_1_decoder(
    backbone: str, sharp: bool
) -> None:
    # The full-resolution branch (two 3x3 convolutions from the input) moves the logits within
    # 2 px of a one-pixel lake many times more than 3 px away; from stride 2 the change spreads
    # over the 2x2 cells and their bilinear neighbours.
    change = one_pixel_change(backbone)
    near, beyond = change[32, 30:35].max(), change[32, 35:37].max()
    assert (near > 5 * beyond) == sharp


@pytest.mark.parametrize(
    ("backbone", "sharp"),
    [
        ("mobilenet_v3_large_deeplabv3plus_s2_aspp960", True),
        ("mobilenet_v3_large_deeplabv3plus_s4_aspp960", False),
    ],
)
def test_a_one_pixel_feature_stays_local_with_the_stride_2_decoder(
    backbone: str, sharp: bool
) -> None:
    # A lake of one pixel: with the stride-2 features it moves the logits at and next to it
    # tens of times more than 6 px away; from stride 4 the change is faint and spread out.
    change = one_pixel_change(backbone)
    near, far = change[32, 30:35].max(), change[32, 38:41].max()
    assert (near > 10 * far) == sharp


@pytest.mark.parametrize(
    "backbone",
    [
        "mobilenet_v3_large_os8",
        "resnet18_os8",
        "mobilenet_v3_large_deeplabv3plus_s4_aspp960",
        "mobilenet_v3_large_deeplabv3plus_s2_aspp960",
        "mobilenet_v3_large_deeplabv3plus_s1_aspp960",
        "mobilenet_v3_large_deeplabv3plus_s1_aspp160",
    ],
)
def test_backbones_built_here_refuse_coco_weights_naming_the_ones_that_exist(backbone: str) -> None:
    with pytest.raises(ValueError, match="coco_voc exists for resnet50, mobilenet_v3_large"):
        build_model(backbone, weights="coco_voc")


# The state-dict layout (every key, shape and dtype, in order) of each old backbone id, as the
# code before the rename built it (commit 0edf3e8): the checkpoints saved under those ids hold
# exactly these tensors.
SAVED_LAYOUTS = {
    "mobilenet_v3_large_fine": (
        358,
        "babf88847f42963deee5304f5f475f7d9fb37ed3ab11e30d6047b1a26289e3e5",
    ),
    "mobilenet_v3_large_fine2": (
        370,
        "cc138c27637e0081499726c4b35a1b4f74359e27b79e0572b9e2c899eaae5871",
    ),
    "mobilenet_v3_large_fine1": (
        382,
        "5beaa1550e9a703e221d891e38deabcce13e5de2a054790feff81e258f520faa",
    ),
    "mobilenet_v3_large_lean1": (
        376,
        "46ec09f776e3a201b237196f0d15e750481483ee84d2db879ea639e98d7c3880",
    ),
}


def _layout(model: nn.Module) -> tuple[int, str]:
    state = model.state_dict()
    text = "\n".join(f"{k} {tuple(v.shape)} {v.dtype}" for k, v in state.items())
    return len(state), hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize("old", sorted(SAVED_LAYOUTS))
def test_an_old_backbone_id_and_its_new_name_build_the_model_saved_under_it(old: str) -> None:
    new = BACKBONE_ALIASES[old]
    assert new in BACKBONES and canonical_backbone(old) == new == canonical_backbone(new)
    assert _layout(build_model(old, num_classes=3)) == SAVED_LAYOUTS[old]
    assert _layout(build_model(new, num_classes=3)) == SAVED_LAYOUTS[old]


def test_every_backbone_id_is_current_or_an_alias_of_a_current_one() -> None:
    assert set(BACKBONE_ALIASES.values()) <= set(BACKBONES)
    assert not set(BACKBONE_ALIASES) & set(BACKBONES)
    with pytest.raises(ValueError, match="unknown backbone 'mobilenet_v3_large_fine3'"):
        build_model("mobilenet_v3_large_fine3")
