"""DeepLabV3 model factory: torchvision architectures with local-first weight loading.

Nothing downloads unless the caller asks for pretrained weights. When it does and the machine is
offline, :class:`WeightsUnavailableError` names the exact file to pre-place in the torch hub cache.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from torchvision.models import MobileNet_V3_Large_Weights, ResNet50_Weights
from torchvision.models.segmentation import (
    DeepLabV3_MobileNet_V3_Large_Weights,
    DeepLabV3_ResNet50_Weights,
    deeplabv3_mobilenet_v3_large,
    deeplabv3_resnet50,
)

BACKBONES = ("resnet50", "mobilenet_v3_large")
WEIGHTS = ("none", "coco_voc", "imagenet")

_BUILDERS = {"resnet50": deeplabv3_resnet50, "mobilenet_v3_large": deeplabv3_mobilenet_v3_large}
_COCO_WEIGHTS = {
    "resnet50": DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1,
    "mobilenet_v3_large": DeepLabV3_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1,
}
_IMAGENET_WEIGHTS = {
    "resnet50": ResNet50_Weights.IMAGENET1K_V1,
    "mobilenet_v3_large": MobileNet_V3_Large_Weights.IMAGENET1K_V1,
}
# The COCO checkpoints were trained on the 20 Pascal VOC classes plus background.
_COCO_NUM_CLASSES = 21
# The final 1x1 convolutions: the only layers whose shape depends on the number of classes.
_HEAD_PREFIXES = ("classifier.4.", "aux_classifier.4.")


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be fetched or read (typically: offline, nothing cached)."""


def build_model(
    backbone: str = "resnet50",
    num_classes: int = 3,
    weights: str = "none",
    aux_loss: bool = False,
) -> nn.Module:
    """Build a torchvision DeepLabV3 whose forward maps (N,3,H,W) float to {"out": (N,C,H,W)}.

    Args:
        backbone: one of :data:`BACKBONES`.
        num_classes: C, the number of output channels of the head.
        weights: ``"none"`` (random init, nothing downloads), ``"coco_voc"`` (the whole
            COCO-with-VOC-labels model, head replaced by a fresh ``Conv2d(256, C, 1)``),
            ``"imagenet"`` (backbone only) or a path to a local state_dict or satseg checkpoint.
        aux_loss: keep the auxiliary FCN head (training only; it adds an "aux" output).

    Raises:
        ValueError: unknown backbone or weights, or a local file that does not fit the model.
        WeightsUnavailableError: pretrained weights asked for but not downloadable or readable.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; allowed: {', '.join(BACKBONES)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    weights = str(weights)
    local: Path | None = None
    if weights not in WEIGHTS:
        local = Path(weights).expanduser()
        if not local.is_file():
            raise ValueError(
                f"unknown weights {weights!r}: expected one of {', '.join(WEIGHTS)} "
                "or the path of an existing weights file"
            )

    builder = _BUILDERS[backbone]
    if weights == "coco_voc":
        # Build the 21-class architecture so the downloaded file loads strictly, then swap heads.
        model = builder(
            weights=None, weights_backbone=None, num_classes=_COCO_NUM_CLASSES, aux_loss=True
        )
        url = _COCO_WEIGHTS[backbone].url
        state = _fetch(url)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise WeightsUnavailableError(
                f"{cache_path(url)} does not hold the DeepLabV3-{backbone} COCO weights "
                f"({_compact(exc)}); delete it and place the file from {url} there"
            ) from exc
        _replace_heads(model, num_classes)
        if not aux_loss:
            model.aux_classifier = None
        return model

    # weights_backbone=None explicitly: torchvision's default downloads ImageNet weights.
    model = builder(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=aux_loss)
    if weights == "imagenet":
        _load_backbone(model, _fetch(_IMAGENET_WEIGHTS[backbone].url), backbone, source="ImageNet")
    elif local is not None:
        _load_local(model, local, backbone)
    return model


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run ``model`` on normalised (N,3,H,W) input and return the main (N,C,H,W) logits."""
    return model(x)["out"]


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
            f"pretrained weights file {target} is unreadable or corrupt ({_first_line(exc)}); "
            f"delete it and {advice}"
        ) from exc


def _load_local(model: nn.Module, path: Path, backbone: str) -> None:
    """Load a local DeepLabV3 state_dict, satseg checkpoint or classification state_dict."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        match = re.search(r"GLOBAL ([\w.]+)", str(exc))
        culprit = f" ({match.group(1)})" if match else ""
        raise WeightsUnavailableError(
            f"refusing weights file {path}: it holds pickled objects{culprit} that "
            "weights_only loading does not allow"
        ) from exc
    except Exception as exc:  # torch raises EOFError, RuntimeError, KeyError... on corrupt files.
        raise WeightsUnavailableError(
            f"weights file {path} is unreadable or corrupt: {type(exc).__name__}: "
            f"{_first_line(exc)}"
        ) from exc

    state = payload.get("state_dict", payload) if isinstance(payload, Mapping) else None
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"weights file {path} holds no state_dict of tensors")
    state = _strip_prefixes(state)
    # Every DeepLabV3 key starts with backbone., classifier. or aux_classifier.; classification
    # models (ImageNet ResNet50 / MobileNetV3 files) have no backbone. prefix.
    if any(k.startswith("backbone.") for k in state):
        _load_full(model, state, source=str(path))
    else:
        _load_backbone(model, state, backbone, source=str(path))


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
        raise ValueError(f"weights file {source} does not fit this model: {_compact(exc)}") from exc
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
    if backbone == "mobilenet_v3_large":
        # DeepLabV3 keeps mobilenet.features, so "features.3.block..." becomes "3.block...".
        mapped = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
    else:
        # DeepLabV3 keeps the ResNet trunk and drops the global pool and fc classifier.
        mapped = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        model.backbone.load_state_dict(mapped, strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"{source} weights do not fit the {backbone} backbone: {_compact(exc)}"
        ) from exc


def _first_line(exc: BaseException) -> str:
    # torch's messages run on with advice; the first sentence carries the fact.
    text = str(exc).strip()
    return text.splitlines()[0].split(". ")[0] if text else type(exc).__name__


def _compact(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _few(keys: list[str], limit: int = 5) -> str:
    if not keys:
        return "none"
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown
