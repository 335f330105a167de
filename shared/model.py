"""DeepLabV3 model factory: torchvision architectures with local-first weight loading.

Nothing downloads unless the caller asks for pretrained weights. When it does and the machine is
offline, :class:`WeightsUnavailableError` names the exact file to pre-place in the torch hub cache.

A model reads ``in_channels`` bands. Pretrained weights are RGB (their first convolution takes
red, green, blue in that order); for any other band list the first convolution is adapted by one
rule, :func:`adapt_rgb_kernels`: a band named red, green or blue gets the pretrained kernel of
that colour, every other band the mean of the three, and the layer is multiplied by 3 / N.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import (
    MobileNet_V3_Large_Weights,
    ResNet18_Weights,
    ResNet50_Weights,
    mobilenet_v3_large,
    resnet18,
)
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation import (
    DeepLabV3_MobileNet_V3_Large_Weights,
    DeepLabV3_ResNet50_Weights,
    deeplabv3_mobilenet_v3_large,
    deeplabv3_resnet50,
)
from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabV3
from torchvision.models.segmentation.fcn import FCNHead

from shared.messages import first_sentence, one_line, refused_global

# torchvision's two DeepLabV3 models, and six built here for small CPUs and features a few
# pixels wide: MobileNetV3-Large and ResNet-18 dilated to output stride 8 (``_os8``,
# _build_dilated), and MobileNetV3-Large at stride 16 with a DeepLabV3+ decoder (_build_decoder):
# ``_s4``, ``_s2`` and ``_s1`` name the stride its decoder ends at (joining the stride-4
# features, then also the stride-2 ones, then the stem's at stride 1), ``_aspp960`` and
# ``_aspp160`` the channels ASPP reads (_DECODERS says which block and rates).
BACKBONES = (
    "resnet50",
    "mobilenet_v3_large",
    "mobilenet_v3_large_os8",
    "resnet18_os8",
    "mobilenet_v3_large_deeplabv3plus_s4_aspp960",
    "mobilenet_v3_large_deeplabv3plus_s2_aspp960",
    "mobilenet_v3_large_deeplabv3plus_s1_aspp960",
    "mobilenet_v3_large_deeplabv3plus_s1_aspp160",
)
# The ids these backbones had before, which saved checkpoints and configs still carry: each
# builds exactly its new name's model, with the same state-dict keys.
BACKBONE_ALIASES = {
    "mobilenet_v3_large_fine": "mobilenet_v3_large_deeplabv3plus_s4_aspp960",
    "mobilenet_v3_large_fine2": "mobilenet_v3_large_deeplabv3plus_s2_aspp960",
    "mobilenet_v3_large_fine1": "mobilenet_v3_large_deeplabv3plus_s1_aspp960",
    "mobilenet_v3_large_lean1": "mobilenet_v3_large_deeplabv3plus_s1_aspp160",
}
# Every id build_model accepts.
BACKBONE_IDS = BACKBONES + tuple(BACKBONE_ALIASES)
RGB_BANDS = ("red", "green", "blue")  # the input order of every pretrained torchvision model
WEIGHTS = ("none", "coco_voc", "imagenet")

_BUILDERS = {"resnet50": deeplabv3_resnet50, "mobilenet_v3_large": deeplabv3_mobilenet_v3_large}
# The trunk whose ImageNet classification weights each backbone loads.
_TRUNKS = {
    "resnet50": "resnet50",
    "mobilenet_v3_large": "mobilenet_v3_large",
    "mobilenet_v3_large_os8": "mobilenet_v3_large",
    "resnet18_os8": "resnet18",
    "mobilenet_v3_large_deeplabv3plus_s4_aspp960": "mobilenet_v3_large",
    "mobilenet_v3_large_deeplabv3plus_s2_aspp960": "mobilenet_v3_large",
    "mobilenet_v3_large_deeplabv3plus_s1_aspp960": "mobilenet_v3_large",
    "mobilenet_v3_large_deeplabv3plus_s1_aspp160": "mobilenet_v3_large",
}
_COCO_WEIGHTS = {
    "resnet50": DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1,
    "mobilenet_v3_large": DeepLabV3_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1,
}
_IMAGENET_WEIGHTS = {
    "resnet50": ResNet50_Weights.IMAGENET1K_V1,
    "mobilenet_v3_large": MobileNet_V3_Large_Weights.IMAGENET1K_V1,
    "resnet18": ResNet18_Weights.IMAGENET1K_V1,
}
# The COCO checkpoints were trained on the 20 Pascal VOC classes plus background.
_COCO_NUM_CLASSES = 21
# The final 1x1 convolutions: the only layers whose shape depends on the number of classes.
_HEAD_PREFIXES = ("classifier.4.", "aux_classifier.4.")


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be fetched or read (typically: offline, nothing cached)."""


def canonical_backbone(backbone: str) -> str:
    """The current id of ``backbone``: itself, or the new name of an old id (BACKBONE_ALIASES).

    Raises:
        ValueError: an id that is neither.
    """
    if not isinstance(backbone, str) or backbone not in BACKBONE_IDS:
        raise ValueError(f"unknown backbone {backbone!r}; allowed: {', '.join(BACKBONES)}")
    return BACKBONE_ALIASES.get(backbone, backbone)


def build_model(
    backbone: str = "resnet50",
    num_classes: int = 3,
    weights: str = "none",
    aux_loss: bool = False,
    in_channels: int = 3,
    band_names: Sequence[str] | None = None,
) -> nn.Module:
    """Build a torchvision DeepLabV3 whose forward maps (N,B,H,W) float to {"out": (N,C,H,W)}.

    Args:
        backbone: one of :data:`BACKBONES`, or an old id of :data:`BACKBONE_ALIASES`.
        num_classes: C, the number of output channels of the head.
        weights: ``"none"`` (random init, nothing downloads), ``"coco_voc"`` (the whole
            COCO-with-VOC-labels model, head replaced by a fresh ``Conv2d(256, C, 1)``),
            ``"imagenet"`` (backbone only) or a path to a local state_dict or satseg checkpoint.
        aux_loss: keep the auxiliary FCN head (training only; it adds an "aux" output).
        in_channels: B, the number of input bands.
        band_names: the B band names in input order; they decide how pretrained RGB weights
            are adapted (see :func:`adapt_rgb_kernels`). Default: red, green, blue for B = 3;
            required with pretrained weights otherwise.

    A local weights file whose first convolution already takes B bands (a satseg checkpoint of
    a B-band model) is loaded as it is; one that takes 3 is RGB and is adapted like the
    downloaded weights.

    Raises:
        ValueError: unknown backbone or weights, or a local file that does not fit the model.
        WeightsUnavailableError: pretrained weights asked for but not downloadable or readable.
    """
    backbone = canonical_backbone(backbone)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    names = _band_names(in_channels, band_names)
    weights = str(weights)
    local = _checked_weights(weights, backbone, in_channels, names)
    if weights == "coco_voc":
        return _coco_model(backbone, num_classes, aux_loss, names)
    model = _architecture(backbone, num_classes, aux_loss)
    if weights == "imagenet":
        url = _IMAGENET_WEIGHTS[_TRUNKS[backbone]].url
        _load_backbone(model, _fetch(url), backbone, source="ImageNet")
        _adapt_first_conv(model, names)
    elif local is not None:
        _load_local(model, local, backbone, in_channels, names)
    elif in_channels != 3:
        _replace_first_conv(model, _fresh_first_conv(first_conv(model), in_channels))
    return model


def _checked_weights(
    weights: str, backbone: str, in_channels: int, names: tuple[str, ...] | None
) -> Path | None:
    """The local weights file ``weights`` names, or None for a named kind; refuses what
    :func:`build_model` cannot build."""
    local: Path | None = None
    if weights not in WEIGHTS:
        local = Path(weights).expanduser()
        if not local.is_file():
            raise ValueError(
                f"unknown weights {weights!r}: expected one of {', '.join(WEIGHTS)} "
                "or the path of an existing weights file"
            )
    if names is None and weights in ("coco_voc", "imagenet"):
        raise ValueError(
            f"pretrained weights for a {in_channels}-band model need band_names: the first "
            "convolution gives bands named red, green, blue their pretrained kernels"
        )
    if weights == "coco_voc" and backbone not in _COCO_WEIGHTS:
        raise ValueError(
            f"no COCO weights for backbone {backbone!r}; coco_voc exists for "
            f"{', '.join(_COCO_WEIGHTS)} (use imagenet or none)"
        )
    return local


def _coco_model(
    backbone: str, num_classes: int, aux_loss: bool, names: tuple[str, ...] | None
) -> nn.Module:
    """torchvision's COCO-with-VOC-labels model of ``backbone``, its heads replaced for
    ``num_classes`` and its first convolution adapted to ``names``."""
    # Build the 21-class architecture so the downloaded file loads strictly, then swap heads.
    model = _BUILDERS[backbone](
        weights=None, weights_backbone=None, num_classes=_COCO_NUM_CLASSES, aux_loss=True
    )
    url = _COCO_WEIGHTS[backbone].url
    state = _fetch(url)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise WeightsUnavailableError(
            f"{cache_path(url)} does not hold the DeepLabV3-{backbone} COCO weights "
            f"({one_line(exc, 400)}); delete it and place the file from {url} there"
        ) from exc
    _replace_heads(model, num_classes)
    if not aux_loss:
        model.aux_classifier = None
    _adapt_first_conv(model, names)
    return model


def _architecture(backbone: str, num_classes: int, aux_loss: bool) -> nn.Module:
    """The randomly initialised model of a canonical ``backbone`` id, 3 input bands."""
    if backbone in _BUILDERS:
        # weights_backbone=None explicitly: torchvision's default downloads ImageNet weights.
        return _BUILDERS[backbone](
            weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=aux_loss
        )
    if backbone in _DECODERS:
        return _build_decoder(num_classes, aux_loss, _DECODERS[backbone])
    return _build_dilated(backbone, num_classes, aux_loss)


# Output stride 8 and a 128-channel ASPP: a lake a few pixels wide still covers a feature
# cell, and the head (80% of the cost of torchvision's MobileNetV3 DeepLabV3) stays cheap.
# ASPP rates 6, 12, 18, the DeepLab paper's for stride-16 maps, suit the 32x32 maps of a
# 256 px tile; torchvision's 12, 24, 36 would mostly sample padding there.
_ASPP_WIDTH = 128
_DEEPLAB_RATES = (6, 12, 18)


def _build_dilated(backbone: str, num_classes: int, aux_loss: bool) -> DeepLabV3:
    """DeepLabV3 on a trunk dilated to output stride 8, with a 128-channel head; the layout of
    torchvision's (``backbone.*``, ``classifier.0`` ASPP ... ``classifier.4`` final 1x1 conv,
    ``aux_classifier`` an FCN head) so loading, quantisation and checkpoints treat it alike."""
    aux_layer: str
    if backbone == "mobilenet_v3_large_os8":
        features = mobilenet_v3_large(weights=None).features
        # Blocks 7-12 run at stride 16 and 13-15 at 32 in the classifier: dilate them instead.
        for index in range(7, 16):
            _dilate(features[index], 2 if index < 13 else 4)
        # The head reads block 15's 160 channels, not the 960 of the 1x1 expansion after it
        # (torchvision's choice): ASPP's 3x3 convolutions over 960 channels at stride 8 would
        # cost more than the whole trunk.
        trunk: nn.Module = features
        out_layer, out_channels, aux_layer, aux_channels = "15", 160, "4", 40
    elif backbone == "resnet18_os8":
        net = resnet18(weights=None)
        for layer, dilation in ((net.layer3, 2), (net.layer4, 4)):
            _dilate(layer, dilation)
        trunk = net
        out_layer, out_channels, aux_layer, aux_channels = "layer4", 512, "layer3", 256
    else:
        raise ValueError(f"unknown backbone {backbone!r}; allowed: {', '.join(BACKBONES)}")
    layers = {out_layer: "out"} | ({aux_layer: "aux"} if aux_loss else {})
    head = nn.Sequential(
        ASPP(out_channels, list(_DEEPLAB_RATES), _ASPP_WIDTH),
        nn.Conv2d(_ASPP_WIDTH, _ASPP_WIDTH, 3, padding=1, bias=False),
        nn.BatchNorm2d(_ASPP_WIDTH),
        nn.ReLU(),
        nn.Conv2d(_ASPP_WIDTH, num_classes, 1),
    )
    aux = FCNHead(aux_channels, num_classes) if aux_loss else None
    return DeepLabV3(IntermediateLayerGetter(trunk, layers), head, aux)


class _DeepLabV3PlusBackbone(nn.Module):
    """What DeepLabV3 calls its backbone, for a DeepLabV3+ model: the trunk, ASPP over its
    stride-16 features, and the decoder's joins; torchvision's DeepLabV3 head then classifies
    its ``"out"``. ASPP's output is upsampled to the stride-4 features' grid and concatenated
    with their 1x1 projection (``low``).

    With ``fine`` (the channels of stride-2 features) the decoder goes one level further: the
    stride-4 join passes through DeepLabV3+'s 3x3 decoder convolution, is upsampled to stride 2
    and concatenated with the stride-2 features' projection. With ``full`` as well, once more
    at the input's resolution, whose features are the trunk's stem filters at stride 1: the
    stem stays the one convolution that reads the bands, so band adaptation and pretrained
    weights treat the model like the others.

    The attribute names (``body``, ``aspp``, ``low``, ``refine``, ``fine``, ``refine_full``,
    ``full``) are the state-dict keys of every saved checkpoint of these backbones: keep them.
    """

    def __init__(
        self,
        trunk: nn.Module,
        layers: dict[str, str],
        high: int,
        low: int,
        width: int,
        rates: Sequence[int],
        fine: int | None = None,
        full: bool = False,
    ) -> None:
        super().__init__()
        self.body = IntermediateLayerGetter(trunk, layers)
        self.aspp = ASPP(high, list(rates), width)
        self.low = _projection(low, _LOW_WIDTH)
        self.refine: nn.Module | None = None
        self.fine: nn.Module | None = None
        if fine is not None:
            self.refine = _refinement(width + _LOW_WIDTH, _DECODER_WIDTH)
            self.fine = _projection(fine, _FINE_WIDTH)
        self.refine_full: nn.Module | None = None
        self.full: nn.Module | None = None
        if full:
            self.refine_full = _refinement(_DECODER_WIDTH + _FINE_WIDTH, _FINE_DECODER_WIDTH)
            self.full = _projection(self.body["0"][0].out_channels, _FULL_WIDTH)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features, stem = self._trunk(x)
        low = self.low(features["low"])
        high = _resized(self.aspp(features["high"]), low)
        joined = torch.cat([high, low], dim=1)
        if self.refine is not None and self.fine is not None:
            fine = self.fine(features["fine"])
            joined = torch.cat([_resized(self.refine(joined), fine), fine], dim=1)
        if self.refine_full is not None and self.full is not None and stem is not None:
            full = self.full(stem)
            joined = torch.cat([_resized(self.refine_full(joined), full), full], dim=1)
        out = {"out": joined}
        if "aux" in features:
            out["aux"] = features["aux"]
        return out

    def _trunk(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The trunk's features by name and, with ``full``, its stem convolution's output at the
        input's resolution.

        That convolution runs at stride 1 and every other pixel of its output goes on through
        the trunk: exactly what it gives at stride 2. So one convolution module still reads the
        bands, and BatchNorm folding (shared.acceleration.fold_bn), seeing its output used
        twice, leaves it and the trunk's BatchNorm after it apart: the full-resolution branch
        reads the convolution's own output.
        """
        if self.full is None:
            return self.body(x), None
        features: dict[str, torch.Tensor] = {}
        stem: torch.Tensor | None = None
        for name, layer in self.body.items():
            if stem is None:
                stem = layer[0](x)
                x = stem[..., ::2, ::2]
                for part in list(layer)[1:]:  # BatchNorm, activation
                    x = part(x)
            else:
                x = layer(x)
            if name in self.body.return_layers:
                features[self.body.return_layers[name]] = x
        return features, stem


def _refinement(channels: int, width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
    )


def _projection(channels: int, width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
    )


def _resized(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


# The stride-4 features' width after projection, and the decoder's: narrow, because at 64x64
# cells per 256 px tile every channel of a 3x3 convolution costs 16x what it costs at stride 16.
# At stride 2 (128x128 cells) narrower still: the 16 channels the trunk has there, and a
# 32-wide last convolution; at stride 1 the same.
_LOW_WIDTH = 32
_DECODER_WIDTH = 64
_FINE_WIDTH = 16
_FINE_DECODER_WIDTH = 32
_FULL_WIDTH = 16


@dataclass(frozen=True)
class _Decoder:
    """What a decoder backbone's name stands for (_build_decoder)."""

    stride: int  # the output stride its decoder ends at: 4, 2 or 1
    high_block: str  # the trunk block ASPP reads: "16" (960 channels) or "15" (160)
    rates: tuple[int, int, int]  # ASPP's three dilation rates
    head_dropout: float  # before the classifier


# The ``_aspp960`` backbones read block 16's 1x1 expansion to 960 channels, as torchvision's
# head does, with the rates of the stride-8 backbones. On the 12x12 maps of a 192 px training
# crop at stride 16 the off-centre taps of rates 12 and 18 fall on padding, so those weights
# never train; they stay as they are for the checkpoints trained with them. ``_aspp160`` reads
# block 15's 160 channels instead (1/6 of the 3x3 work; the trunk ends there, as in ``_os8``),
# at rates 2, 4 and 6, each of which reaches real cells of a 12x12 map, with no dropout before
# the classifier.
_DECODERS = {
    "mobilenet_v3_large_deeplabv3plus_s4_aspp960": _Decoder(4, "16", _DEEPLAB_RATES, 0.1),
    "mobilenet_v3_large_deeplabv3plus_s2_aspp960": _Decoder(2, "16", _DEEPLAB_RATES, 0.1),
    "mobilenet_v3_large_deeplabv3plus_s1_aspp960": _Decoder(1, "16", _DEEPLAB_RATES, 0.1),
    "mobilenet_v3_large_deeplabv3plus_s1_aspp160": _Decoder(1, "15", (2, 4, 6), 0.0),
}


def _build_decoder(num_classes: int, aux_loss: bool, spec: _Decoder) -> DeepLabV3:
    """MobileNetV3-Large at output stride 16 (torchvision's dilated trunk), a 128-wide ASPP, and
    a DeepLabV3+ decoder that ends at ``spec.stride`` 4, 2 or 1: lakes a few pixels across keep
    cells of their own while the trunk, whose depthwise convolutions dominate the CPU time,
    runs at stride 16."""
    stride = spec.stride
    features = mobilenet_v3_large(weights=None, dilated=True).features
    if stride == 1:
        features[0][0].stride = (1, 1)  # see _DeepLabV3PlusBackbone._trunk
    # Block 1 ends the stride-2 stage (16 channels), block 3 the stride-4 stage (24); block 4
    # is where torchvision taps its aux.
    layers = {"3": "low", spec.high_block: "high"} | ({"1": "fine"} if stride <= 2 else {})
    layers |= {"4": "aux"} if aux_loss else {}
    trunk = _DeepLabV3PlusBackbone(
        features,
        layers,
        features[int(spec.high_block)].out_channels,
        24,
        _ASPP_WIDTH,
        rates=spec.rates,
        fine=16 if stride <= 2 else None,
        full=stride == 1,
    )
    joined, width = {
        4: (_ASPP_WIDTH + _LOW_WIDTH, _DECODER_WIDTH),
        2: (_DECODER_WIDTH + _FINE_WIDTH, _FINE_DECODER_WIDTH),
        1: (_FINE_DECODER_WIDTH + _FULL_WIDTH, _FULL_WIDTH),
    }[stride]
    head = nn.Sequential(
        nn.Conv2d(joined, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Dropout(spec.head_dropout),
        nn.Conv2d(width, num_classes, 1),  # classifier.4, as in torchvision's head
    )
    aux = FCNHead(40, num_classes) if aux_loss else None
    return DeepLabV3(trunk, head, aux)


def _dilate(block: nn.Module, dilation: int) -> None:
    """Every spatial convolution of ``block`` at stride 1 with ``dilation`` (and the padding that
    keeps its output size), 1x1 shortcut convolutions at stride 1: the block keeps its input's
    resolution and, like torchvision's ``replace_stride_with_dilation``, its receptive field."""
    for conv in block.modules():
        if not isinstance(conv, nn.Conv2d):
            continue
        conv.stride = (1, 1)
        if conv.kernel_size[0] > 1:
            conv.dilation = (dilation, dilation)
            conv.padding = ((conv.kernel_size[0] - 1) // 2 * dilation,) * 2


def adapt_rgb_kernels(weight: torch.Tensor, band_names: Sequence[str]) -> torch.Tensor:
    """Pretrained RGB first-conv weights ``(O, 3, kh, kw)`` -> ``(O, N, kh, kw)`` for N bands.

    The rule: a band named ``red``, ``green`` or ``blue`` (case-insensitive) gets the kernel of
    that colour, taken from input 0, 1 or 2 by name and never by position, so bands listed as
    blue, green, red get the B, G, R kernels. Every other band gets the mean of the three.
    Then the whole layer is multiplied by 3 / N. When the bands include red, green and blue,
    a grey input (the same normalised value in every band) then gives exactly the activations
    the RGB layer gives on it, so the batch norm that follows sees the scale it was trained on;
    and the adapted model on ``(x_r, x_g, x_b, 0, ...) * N / 3`` equals the RGB model on
    ``(x_r, x_g, x_b)``. The 3 / N factor is the one timm applies when it repeats RGB kernels
    for other channel counts; here the kernels are chosen by band name, never by position.
    """
    if weight.ndim != 4 or weight.shape[1] != 3:
        raise ValueError(f"expected RGB kernels (O, 3, kh, kw), got {tuple(weight.shape)}")
    lowered = [str(n).lower() for n in band_names]
    if not lowered:
        raise ValueError("band_names is empty")
    mean = weight.mean(dim=1)
    columns = [weight[:, RGB_BANDS.index(name)] if name in RGB_BANDS else mean for name in lowered]
    return torch.stack(columns, dim=1) * (3.0 / len(lowered))


def first_conv(model: nn.Module) -> nn.Conv2d:
    """The convolution that reads the input bands."""
    return model.get_submodule(_first_conv_name(model))


def model_in_channels(model: nn.Module) -> int:
    """B, the number of input bands ``model`` reads."""
    return int(first_conv(model).in_channels)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run ``model`` on normalised (N,B,H,W) input and return the main (N,C,H,W) logits."""
    return model(x)["out"]


class MainLogits(nn.Module):
    """A DeepLabV3 without its dict output, for tracers and exporters that want one tensor out:
    normalised ``(N, B, H, W)`` -> main ``(N, C, H, W)`` logits. Its layers keep their names
    under ``model.`` (``model.classifier.4`` is the head's last convolution)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return logits(self.model, x)


def head_out_channels(model: nn.Module) -> int:
    """C of the main head's final 1x1 convolution."""
    return int(model.classifier[4].out_channels)


def cache_path(url: str) -> Path:
    """Where ``torch.hub`` looks for (and stores) the file downloaded from ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _replace_heads(model: nn.Module, num_classes: int) -> None:
    # Same replacement as the workshop: a fresh 1x1 conv over the head's 256 features.
    head = model.classifier[4]
    model.classifier[4] = nn.Conv2d(head.in_channels, num_classes, kernel_size=1)
    if model.aux_classifier is not None:
        # The aux head's inner width is backbone-specific (1024//4 for ResNet, 40//4 for MobileNet).
        aux = model.aux_classifier[4]
        model.aux_classifier[4] = nn.Conv2d(aux.in_channels, num_classes, kernel_size=1)


def _fetch(url: str) -> dict[str, torch.Tensor]:
    """State dict from the torch hub cache, downloading it there if absent."""
    target = cache_path(url)
    advice = (
        f"place the file {target.name} (from {url}) at {target} "
        "or pass the path of a local weights file instead"
    )
    try:
        return torch.hub.load_state_dict_from_url(
            url, progress=True, check_hash=True, weights_only=True, map_location="cpu"
        )
    except OSError as exc:  # URLError, HTTPError, socket errors and timeouts are all OSErrors.
        raise WeightsUnavailableError(
            f"cannot download pretrained weights ({exc}); {advice}"
        ) from exc
    except (RuntimeError, EOFError, pickle.UnpicklingError, KeyError) as exc:
        # A partial or tampered file in the cache (or a failed hash check on download).
        raise WeightsUnavailableError(
            f"pretrained weights file {target} is unreadable or corrupt ({first_sentence(exc)}); "
            f"delete it and {advice}"
        ) from exc


def _band_names(in_channels: int, band_names: Sequence[str] | None) -> tuple[str, ...] | None:
    if band_names is None:
        return RGB_BANDS if in_channels == 3 else None
    if isinstance(band_names, str) or len(band_names) != in_channels:
        raise ValueError(
            f"band_names must list {in_channels} names (one per input band), got {band_names!r}"
        )
    return tuple(str(n) for n in band_names)


def _first_conv_name(model: nn.Module) -> str:
    # torchvision's backbones start with their stem convolution: backbone.conv1 (ResNet),
    # backbone.0.0 (MobileNetV3).
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and name.startswith("backbone."):
            return name
    raise ValueError("model has no backbone convolution")


def _replace_first_conv(model: nn.Module, conv: nn.Conv2d) -> None:
    parent, _, child = _first_conv_name(model).rpartition(".")
    setattr(model.get_submodule(parent), child, conv)


def _fresh_first_conv(like: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(
        in_channels,
        like.out_channels,
        kernel_size=like.kernel_size,
        stride=like.stride,
        padding=like.padding,
        dilation=like.dilation,
        groups=like.groups,
        bias=like.bias is not None,
    )
    # torchvision initialises both backbones' convolutions this way.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def _adapt_first_conv(model: nn.Module, band_names: Sequence[str] | None) -> None:
    """Turn the loaded RGB first convolution into one over ``band_names`` (see the rule)."""
    if band_names is None or tuple(n.lower() for n in band_names) == RGB_BANDS:
        return
    old = first_conv(model)
    conv = _fresh_first_conv(old, len(band_names))
    with torch.no_grad():
        conv.weight.copy_(adapt_rgb_kernels(old.weight, band_names))
        if old.bias is not None:
            conv.bias.copy_(old.bias)
    _replace_first_conv(model, conv)


def _load_local(
    model: nn.Module,
    path: Path,
    backbone: str,
    in_channels: int = 3,
    band_names: Sequence[str] | None = None,
) -> None:
    """Load a local DeepLabV3 state_dict, satseg checkpoint or classification state_dict.

    A file whose first convolution takes ``in_channels`` bands loads as it is; one whose first
    convolution takes 3 is RGB and is adapted to ``band_names``.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        name = refused_global(exc)
        culprit = f" ({name})" if name else ""
        raise WeightsUnavailableError(
            f"refusing weights file {path}: it holds pickled objects{culprit} that "
            "weights_only loading does not allow"
        ) from exc
    except Exception as exc:  # torch raises EOFError, RuntimeError, KeyError... on corrupt files.
        raise WeightsUnavailableError(
            f"weights file {path} is unreadable or corrupt: {type(exc).__name__}: "
            f"{first_sentence(exc)}"
        ) from exc

    state = payload.get("state_dict", payload) if isinstance(payload, Mapping) else None
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"weights file {path} holds no state_dict of tensors")
    state = _strip_prefixes(state)
    file_bands = _file_in_channels(state)
    if file_bands == in_channels and in_channels != 3:
        # Already a B-band model: make room for its first convolution, load it unchanged.
        _replace_first_conv(model, _fresh_first_conv(first_conv(model), in_channels))
        band_names = None
    elif file_bands not in (None, 3):
        raise ValueError(
            f"weights file {path} has a first convolution over {file_bands} bands but the "
            f"model reads {in_channels}; only 3-band (RGB) weights are adapted to other bands"
        )
    elif band_names is None:
        raise ValueError(
            f"weights file {path} is RGB; a {in_channels}-band model needs band_names to "
            "adapt it (bands named red, green, blue get their pretrained kernels)"
        )
    # Every DeepLabV3 key starts with backbone., classifier. or aux_classifier.; classification
    # models (ImageNet ResNet50 / MobileNetV3 files) have no backbone. prefix.
    if any(k.startswith("backbone.") for k in state):
        _load_full(model, state, source=str(path))
    else:
        _load_backbone(model, state, backbone, source=str(path))
    _adapt_first_conv(model, band_names)


def _file_in_channels(state: Mapping[str, torch.Tensor]) -> int | None:
    """Input bands of a weights file's first convolution (DeepLabV3 or classification keys)."""
    for key in (
        "backbone.conv1.weight",
        "backbone.0.0.weight",
        "backbone.body.0.0.weight",
        "conv1.weight",
        "features.0.0.weight",
    ):
        weight = state.get(key)
        if weight is not None and weight.ndim == 4:
            return int(weight.shape[1])
    return None


def _strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DistributedDataParallel and torch.compile wrap the model and prefix every key.
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def _load_full(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a whole-model state dict; a head trained for another class count is skipped."""
    own = model.state_dict()
    skipped = [
        k
        for k, v in state.items()
        if k.startswith(_HEAD_PREFIXES) and k in own and own[k].shape != v.shape
    ]
    # The file's aux head is of no use to a model built without one.
    unused_aux = [k for k in state if k.startswith("aux_classifier.") and k not in own]
    filtered = {k: v for k, v in state.items() if k not in skipped and k not in unused_aux}
    try:
        result = model.load_state_dict(filtered, strict=False)
    except RuntimeError as exc:  # shape mismatches outside the head
        raise ValueError(
            f"weights file {source} does not fit this model: {one_line(exc, 400)}"
        ) from exc
    missing = [k for k in result.missing_keys if k not in skipped]
    missing_aux = [k for k in missing if k.startswith("aux_classifier.")]
    missing = [k for k in missing if k not in missing_aux]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"weights file {source} does not fit this model: "
            f"missing {_few(missing)}, unexpected {_few(result.unexpected_keys)}"
        )
    if skipped:
        warnings.warn(
            f"weights file {source}: head has a different number of classes; "
            f"kept the freshly initialised {', '.join(sorted(skipped))}",
            stacklevel=4,
        )
    if missing_aux:
        warnings.warn(
            f"weights file {source} has no auxiliary head; it stays randomly initialised",
            stacklevel=4,
        )


def _load_backbone(
    model: nn.Module, state: Mapping[str, torch.Tensor], backbone: str, source: str
) -> None:
    """Load classification weights (ResNet50 / MobileNetV3 ImageNet layout) into the backbone."""
    if _TRUNKS[backbone] == "mobilenet_v3_large":
        # DeepLabV3 keeps mobilenet.features, so "features.3.block..." becomes "3.block...".
        mapped = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
    else:
        # DeepLabV3 keeps the ResNet trunk and drops the global pool and fc classifier.
        mapped = {k: v for k, v in state.items() if not k.startswith("fc.")}
    # A trunk may end early (mobilenet_v3_large_os8 stops at block 15): its later layers'
    # weights have no place in it; every layer it keeps must still load exactly.
    # _DeepLabV3PlusBackbone wraps its trunk in ``body``.
    trunk = getattr(model.backbone, "body", model.backbone)
    kept = {name for name, _ in trunk.named_children()}
    mapped = {k: v for k, v in mapped.items() if k.split(".", 1)[0] in kept}
    try:
        trunk.load_state_dict(mapped, strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"{source} weights do not fit the {backbone} backbone: {one_line(exc, 400)}"
        ) from exc


def _few(keys: list[str], limit: int = 5) -> str:
    if not keys:
        return "none"
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown
