"""Checkpoints as plain dicts: atomic writes, ``weights_only=True`` reads, a versioned schema.

A checkpoint holds only tensors and plain Python containers, so ``torch.load(path,
weights_only=True)`` reads it and a tampered file cannot run code. Its keys (``SCHEMA_VERSION``
1: ``arch``, ``state_dict``, ``label_map``, ``normalization``, ``bands``, ``config``, ...) are
listed in docs/checkpoint.md. Checkpoints written before bands existed read as 8-bit RGB.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from enum import Enum
from importlib import metadata
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn

from shared.bands import BandError, BandSpec
from shared.files import atomic_writer
from shared.labels import LabelMap, LabelMapError
from shared.messages import first_sentence, one_line, refused_global
from shared.model import (
    BACKBONE_IDS,
    BACKBONES,
    build_model,
    canonical_backbone,
    head_out_channels,
    model_in_channels,
)
from shared.preprocess import Normalization

SCHEMA_VERSION = 1
ARCH_NAME = "deeplabv3"
REQUIRED_KEYS = (
    "schema_version",
    "arch",
    "state_dict",
    "label_map",
    "normalization",
    "config",
    "metrics",
    "versions",
    "created_at",
)
_HEAD_WEIGHT = "classifier.4.weight"
# Scalars that torch's weights_only unpickler accepts as they are.
_PLAIN_SCALARS = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    torch.dtype,
    torch.device,
    torch.Size,
)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or invalid; the message names the file and why."""


def build_checkpoint(
    model: nn.Module,
    *,
    backbone: str,
    aux_loss: bool,
    label_map: LabelMap,
    normalization: Normalization,
    config: dict,
    metrics: dict | None = None,
    training_state: dict | None = None,
    bands: BandSpec | None = None,
    gsd_m: float | None = None,
    logit_offsets: Sequence[float] | None = None,
) -> dict:
    """Assemble the checkpoint dict for ``model`` (layout: docs/checkpoint.md).

    Tensors are copied to the CPU; ``pathlib`` paths and numpy scalars in ``config``, ``metrics``
    and ``training_state`` become ``str`` and Python numbers.

    ``bands`` describes the model's input bands; it may be left out for a 3-band model, which
    then records 8-bit red, green, blue.

    ``logit_offsets`` (one float per class) are added to the logits wherever the checkpoint
    predicts (:class:`shared.inference.Predictor`), e.g. the logit adjustment that undoes the
    shift class weights give the decision boundary.

    Raises:
        ValueError: unknown backbone, the model's head does not have one output per class, or
            the bands or normalisation do not have one entry per input band of the model.
        TypeError: a value that ``torch.load(weights_only=True)`` would refuse (the message
            gives its key path), e.g. a numpy array or an ``argparse.Namespace``.
    """
    backbone = canonical_backbone(backbone)
    model = _unwrap(model)
    out_channels = head_out_channels(model)
    if out_channels != label_map.num_classes:
        raise ValueError(
            f"model head has {out_channels} outputs but the label map has "
            f"{label_map.num_classes} classes ({', '.join(label_map.names)})"
        )
    in_channels = model_in_channels(model)
    if bands is None and in_channels == 3:
        bands = BandSpec.rgb()
    if bands is None or bands.count != in_channels:
        raise ValueError(
            f"model reads {in_channels} bands but the band spec lists "
            f"{'none' if bands is None else ', '.join(bands.names)}"
        )
    if normalization.channels != in_channels:
        raise ValueError(
            f"model reads {in_channels} bands but the normalization has {normalization.channels}"
        )
    state_dict = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    payload: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "arch": {
            "name": ARCH_NAME,
            "backbone": backbone,
            "num_classes": label_map.num_classes,
            "aux_loss": bool(aux_loss),
            "in_channels": in_channels,
        },
        "state_dict": state_dict,
        "label_map": label_map.to_dict(),
        "normalization": normalization.to_dict(),
        "bands": bands.to_dict(),
        "config": _plain(config, "config"),
        "metrics": _plain(metrics or {}, "metrics"),
        "versions": {
            # str(): torch.__version__ is a TorchVersion, which weights_only loading refuses.
            "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__),
            "satseg": _satseg_version(),
        },
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if gsd_m is not None:
        payload["gsd_m"] = _checked_gsd(gsd_m, "gsd_m", ValueError)
    if logit_offsets is not None:
        payload["logit_offsets"] = checked_logit_offsets(
            logit_offsets, label_map.num_classes, "logit_offsets", ValueError
        )
    if training_state is not None:
        payload["training_state"] = _plain(training_state, "training_state")
    return payload


def gsd_from_checkpoint(ckpt: Mapping[str, Any]) -> float | None:
    """The training data's ground sample distance in metres, or None when not recorded."""
    value = ckpt.get("gsd_m")
    return None if value is None else _checked_gsd(value, "checkpoint gsd_m", CheckpointError)


def logit_offsets_from_checkpoint(ckpt: Mapping[str, Any]) -> list[float] | None:
    """The per-class logit offsets a checkpoint predicts with, or None (none recorded).

    Raises:
        CheckpointError: the recorded offsets are not one finite number per class.
    """
    offsets = ckpt.get("logit_offsets")
    if offsets is None:
        return None
    classes = int(ckpt["arch"]["num_classes"])
    return checked_logit_offsets(offsets, classes, "checkpoint logit_offsets", CheckpointError)


def checked_logit_offsets(
    offsets: Any, classes: int, what: str = "logit_offsets", error: type[Exception] = ValueError
) -> list[float]:
    """``offsets`` as floats, one per class, or ``error`` naming ``what`` and the problem."""
    if isinstance(offsets, (str, bytes)) or not isinstance(offsets, Sequence):
        raise error(f"{what} must be a list of {classes} numbers, got {type(offsets).__name__}")
    if len(offsets) != classes:
        raise error(f"{what} must have one number per class ({classes}), got {len(offsets)}")
    values = []
    for value in offsets:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise error(f"{what} must hold numbers, got {value!r}")
        if not math.isfinite(value):
            raise error(f"{what} must be finite, got {value!r}")
        values.append(float(value))
    return values


def _checked_gsd(value: Any, what: str, error: type[Exception]) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise error(f"{what} must be a positive number of metres, got {value!r}")
    if value == float("inf"):
        raise error(f"{what} must be finite, got {value!r}")
    return float(value)


def save_checkpoint(payload: dict, path: str | Path) -> None:
    """Write ``payload`` to ``path`` atomically: readers see the old file or the new, never half.

    The bytes go to a temporary file in the same folder (so ``os.replace`` is a rename on one
    filesystem), are flushed and fsynced, then renamed over ``path``; the folder is fsynced so the
    rename survives a power cut. On any failure the temporary file is removed and ``path`` is
    left as it was; temporary files left by a writer that was killed outright are removed by
    the next write. Missing parent folders are created.
    """
    with atomic_writer(path, durable=True) as f:
        torch.save(payload, f)


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Read and validate a checkpoint with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, holds pickled objects other
            than tensors and plain containers, has another schema version, lacks keys, or its
            head does not match its label map. The message names ``path`` and the reason.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc.strerror or exc}") from None
    if not magic:
        raise CheckpointError(f"checkpoint {path} is empty")
    # torch.save writes a zip archive; files from before torch 1.6 are a bare pickle.
    if not magic.startswith((b"PK\x03\x04", b"\x80")):
        raise CheckpointError(f"checkpoint {path} is not a PyTorch checkpoint file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" in str(exc).lower():
            name = refused_global(exc)
            culprit = f" ({name})" if name else ""
            raise CheckpointError(
                f"refusing checkpoint {path}: unsafe pickle: it holds objects other than tensors "
                f"and plain containers{culprit}; it was not loaded"
            ) from None
        raise CheckpointError(f"checkpoint {path} is corrupt: {first_sentence(exc)}") from None
    except EOFError:
        raise CheckpointError(f"checkpoint {path} is empty or truncated") from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc.strerror or exc}") from None
    except Exception as exc:  # torch reports torn zip archives as RuntimeError, text as KeyError...
        detail = f"{type(exc).__name__}: {first_sentence(exc)}"
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({detail})") from None
    _validate(payload, path)
    return payload


def model_from_checkpoint(
    ckpt: dict, device: str | torch.device = "cpu"
) -> tuple[nn.Module, LabelMap, Normalization]:
    """Rebuild the model of a loaded checkpoint, ready for inference.

    The model is built without pretrained weights and without the auxiliary head (inference never
    uses it), loaded strictly, moved to ``device`` and put in eval mode.

    Raises:
        CheckpointError: the state_dict does not fit the recorded architecture or label map.
    """
    _validate(ckpt, "<checkpoint dict>")
    arch = ckpt["arch"]
    label_map = LabelMap.from_dict(ckpt["label_map"], source="checkpoint label_map")
    normalization = Normalization.from_dict(ckpt["normalization"])
    model = build_model(
        arch["backbone"],
        num_classes=arch["num_classes"],
        weights="none",
        in_channels=arch.get("in_channels", 3),
    )
    state = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("aux_classifier.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint state_dict does not fit deeplabv3/{arch['backbone']} with "
            f"{arch['num_classes']} classes: {one_line(exc, 500)}"
        ) from None
    model.to(device).eval()
    return model, label_map, normalization


def bands_from_checkpoint(ckpt: dict) -> BandSpec:
    """The input bands of a loaded checkpoint; 8-bit RGB for checkpoints from before bands."""
    if "bands" not in ckpt:
        return BandSpec.rgb()
    return BandSpec.from_dict(ckpt["bands"])


def _validate(payload: Any, path: str | Path) -> None:
    if not isinstance(payload, dict):
        raise CheckpointError(
            f"checkpoint {path} is not a satseg checkpoint (holds {type(payload).__name__})"
        )
    if "schema_version" not in payload:
        raise CheckpointError(
            f"checkpoint {path} is not a satseg checkpoint (no schema_version; a bare "
            "state_dict can be used as weights for training, not for inference)"
        )
    version = payload["schema_version"]
    if version != SCHEMA_VERSION:
        newer = isinstance(version, int) and version > SCHEMA_VERSION
        raise CheckpointError(
            f"checkpoint {path} has schema_version {version!r}; this satseg reads "
            f"{SCHEMA_VERSION}" + (" (written by a newer satseg)" if newer else "")
        )
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks keys {missing}")

    arch = payload["arch"]
    if not isinstance(arch, dict) or arch.get("name") != ARCH_NAME:
        raise CheckpointError(f"checkpoint {path}: arch must be {{'name': 'deeplabv3', ...}}")
    if arch.get("backbone") not in BACKBONE_IDS:  # an old id still names its model
        raise CheckpointError(
            f"checkpoint {path}: unknown backbone {arch.get('backbone')!r} "
            f"(allowed: {', '.join(BACKBONES)})"
        )
    num_classes = arch.get("num_classes")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise CheckpointError(f"checkpoint {path}: arch num_classes {num_classes!r} is invalid")

    try:
        label_map = LabelMap.from_dict(payload["label_map"], source=f"{path} label_map")
    except LabelMapError as exc:
        raise CheckpointError(f"checkpoint {path}: invalid label_map: {exc}") from None
    if label_map.num_classes != num_classes:
        raise CheckpointError(
            f"checkpoint {path}: arch has {num_classes} classes but the label map has "
            f"{label_map.num_classes} ({', '.join(label_map.names)})"
        )
    in_channels = arch.get("in_channels", 3)
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise CheckpointError(f"checkpoint {path}: arch in_channels {in_channels!r} is invalid")
    try:
        normalization = Normalization.from_dict(payload["normalization"])
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {path}: invalid normalization: {exc}") from None
    if normalization.channels != in_channels:
        raise CheckpointError(
            f"checkpoint {path}: normalization has {normalization.channels} bands but the "
            f"model reads {in_channels}"
        )
    try:
        bands = bands_from_checkpoint(payload)
    except BandError as exc:
        raise CheckpointError(f"checkpoint {path}: invalid bands: {exc}") from None
    if bands.count != in_channels:
        raise CheckpointError(
            f"checkpoint {path}: bands lists {bands.count} ({', '.join(bands.names)}) but the "
            f"model reads {in_channels}"
        )

    gsd_from_checkpoint(payload)

    state = payload["state_dict"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"checkpoint {path}: state_dict must map names to tensors")
    head = state.get(_HEAD_WEIGHT)
    if head is None:
        raise CheckpointError(f"checkpoint {path}: state_dict has no {_HEAD_WEIGHT}")
    if head.shape[0] != num_classes:
        raise CheckpointError(
            f"checkpoint {path}: model head has {head.shape[0]} outputs but the label map has "
            f"{num_classes} classes ({', '.join(label_map.names)})"
        )


def _plain(value: Any, where: str) -> Any:
    """Copy ``value`` keeping only types ``torch.load(weights_only=True)`` accepts."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if type(value) in _PLAIN_SCALARS:
        return value
    if isinstance(value, Enum):
        return _plain(value.value, where)
    # Subclasses (TorchVersion, IntEnum...) pickle as their own class, which loading refuses.
    for base in (bool, int, float, str):
        if isinstance(value, base):
            return base(value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {k: _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(
        f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which "
        "torch.load(weights_only=True) refuses; store tensors, numbers, strings, lists or dicts"
    )


def _unwrap(model: nn.Module) -> nn.Module:
    # torch.compile and DistributedDataParallel wrap the model and prefix its state_dict keys.
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _satseg_version() -> str:
    try:
        return metadata.version("satseg")
    except metadata.PackageNotFoundError:
        return "unknown"
