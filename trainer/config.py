"""Training configuration: YAML defaults, dotted command-line overrides, typed dataclasses.

Layering, lowest to highest: the dataclass defaults below, the YAML file, then ``key.path=value``
overrides from the command line (values parsed as YAML, so ``null``, ``true``, ``[0.5, 1.0]`` work).
Every key is checked against the dataclasses before any work starts: an unknown key or a value of
the wrong type raises :class:`ConfigError` whose message names the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key (and the file)."""


@dataclass
class DataConfig:
    root: str = "data/bluemarble"
    # label_mapping.json to use; null = the one at the repository root.
    label_map: str | None = None
    # Side of the square training crop. Validation and test run at full tile resolution.
    image_size: int = 512
    # Share of TAIN_VAL_SET held out for validation (seeded by train.seed).
    val_fraction: float = 0.1
    num_workers: int = 2
    # Keep decoded tiles in memory after the start-up validation pass (small datasets only).
    cache: bool = False
    # A corrupt image, unreadable mask or unknown label value: stop, or skip it with a warning.
    on_bad_file: Literal["error", "skip"] = "error"
    # Sampling weight per class name: a tile is drawn with the largest factor among the classes
    # it contains (1.0 when none is listed), so tiles holding rare classes are seen more often.
    oversample: dict[str, float] = field(default_factory=dict)
    # A tile "contains" a class for oversampling when it holds at least this many of its pixels.
    oversample_min_pixels: int = 1


@dataclass
class AugmentConfig:
    # "random_resized": RandomResizedCrop to image_size (area share crop_scale, aspect crop_ratio);
    # "random": pad with ignore_index if needed, then a random image_size crop at native resolution.
    crop: Literal["random_resized", "random"] = "random_resized"
    crop_scale: tuple[float, float] = (0.25, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.3333333)
    # Share of crops taken instead at native resolution around a pixel of one of focus_classes
    # (when the tile has one): rare classes then appear in crops, not only in their tiles.
    focus_crop: float = 0.0
    focus_classes: list[str] = field(default_factory=list)
    hflip: float = 0.5
    vflip: float = 0.5
    rotate90: float = 0.5
    # Affine (shift-scale-rotate) probability and ranges; areas rotated in are ignore_index.
    affine: float = 0.0
    affine_scale: tuple[float, float] = (0.9, 1.1)
    affine_rotate: float = 15.0
    affine_translate: float = 0.05
    # ColorJitter probability and strengths.
    color_jitter: float = 0.0
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02


@dataclass
class ModelConfig:
    backbone: Literal["resnet50", "mobilenet_v3_large"] = "resnet50"
    # none | coco_voc | imagenet | path to a local state_dict or checkpoint.
    weights: str = "none"
    aux_loss: bool = False
    # BatchNorm momentum for every BN layer while training; null keeps torchvision's (0.01 in
    # the MobileNetV3 backbone: running statistics that trail far behind the weights in a short
    # from-scratch run, so validation in eval mode sees a different network than training).
    bn_momentum: float | None = None


@dataclass
class TrainConfig:
    epochs: int = 30
    # Per process; the effective batch is batch_size * accumulate * world size.
    batch_size: int = 8
    lr: float = 1e-4
    # Cap on optimiser steps (smoke runs); null = no cap.
    max_steps: int | None = None
    # Wall-clock budget for training; the schedule decays to min_lr as it runs out. null = none.
    max_minutes: float | None = None
    seed: int = 42
    # Checkpoint (last.pt) to continue from: model, optimiser, scheduler, scaler, epoch, RNG.
    resume: str | None = None
    loss: Literal["dice", "ce", "dice+ce"] = "dice+ce"
    # Per class name; classes not listed weigh 1.0. Applies to CE and Dice.
    class_weights: dict[str, float] = field(default_factory=dict)
    dice_smooth: float = 1.0
    aux_weight: float = 0.4
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["poly", "cosine", "constant"] = "poly"
    poly_power: float = 0.9
    min_lr: float = 0.0
    grad_clip: float | None = None
    accumulate: int = 1
    # auto: bf16 where the device supports it, fp16 + GradScaler on CUDA without bf16, else fp32.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = True
    compile: bool = False
    # Validate and save an exponential moving average of the weights (e.g. 0.999); null = off.
    ema_decay: float | None = None
    # Early stopping: epochs without a val mIoU gain above min_delta; null = off.
    patience: int | None = None
    min_delta: float = 0.0
    # Deterministic kernels (slower): a resumed run then matches a straight one bit for bit.
    deterministic: bool = False
    sync_bn: bool = False
    device: str = "auto"
    # torch intra-op threads per process; null = torch's default.
    threads: int | None = None
    # CPU only: every so often time a few steps with 1 thread and with `threads` (null: all
    # CPUs) and keep the faster, for machines shared with other work (see trainer/threads.py).
    # Off when `deterministic` is on: the thread count changes the order of sums.
    adapt_threads: bool = False
    # Also write last.pt every N optimiser steps inside an epoch (resume continues mid-epoch).
    checkpoint_every: int | None = None
    log_every: int = 10


@dataclass
class EvalConfig:
    # Evaluate a checkpoint of the run on the test split after training.
    enabled: bool = True
    checkpoint: Literal["best", "last"] = "best"
    split: Literal["test", "trainval"] = "test"
    tile: int = 512
    overlap: int = 64
    tile_batch: int = 4
    boundary_width: int = 3


@dataclass
class LogConfig:
    tensorboard: bool = True
    # Validation images shown as input / truth / prediction overlays every epoch.
    image_samples: int = 4
    # auto: a progress bar in a terminal, plain log lines otherwise.
    progress: Literal["auto", "bar", "lines"] = "auto"


@dataclass
class Config:
    out_dir: str = "runs"
    # Folder under out_dir; null = a UTC timestamp.
    run_name: str | None = None
    # Allow a new run to replace the checkpoints of an existing run folder.
    overwrite: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at ``path``, then ``key.path=value`` overrides; validated."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        data = read_yaml(path)
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(data, key, value)
    cfg = from_dict(data, source=source)
    check_values(cfg)
    return cfg


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, turning every failure into a ConfigError naming the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read config file ({exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}:{where} invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{p}: the top level must be a mapping of keys, got {type(data).__name__}"
        )
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.lr=3e-4"`` -> ``("train.lr", 3e-4)``; the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data["a"]["b"] = value`` for key ``"a.b"``, creating mappings on the way."""
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def from_dict(data: Mapping[str, Any], source: str = "<dict>") -> Config:
    """Build a Config from nested mappings; unknown keys and wrong types raise ConfigError."""
    return _build(Config, data, prefix="", source=source)


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of built-in types (tuples become lists): YAML- and weights_only-safe."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    return plain(cfg)


def dump_yaml(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (the run folder's record of what was trained)."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
    Path(path).write_text(text, encoding="utf-8")


def check_values(cfg: Config) -> None:
    """Range checks that types alone cannot express; each error names its key."""
    positive = {
        "data.image_size": cfg.data.image_size,
        "train.epochs": cfg.train.epochs,
        "train.batch_size": cfg.train.batch_size,
        "train.accumulate": cfg.train.accumulate,
        "train.log_every": cfg.train.log_every,
        "eval.tile": cfg.eval.tile,
        "data.oversample_min_pixels": cfg.data.oversample_min_pixels,
        "eval.tile_batch": cfg.eval.tile_batch,
        "eval.boundary_width": cfg.eval.boundary_width,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be > 0, got {value}")
    optional_positive = {
        "train.max_steps": cfg.train.max_steps,
        "train.max_minutes": cfg.train.max_minutes,
        "train.patience": cfg.train.patience,
        "train.grad_clip": cfg.train.grad_clip,
        "train.threads": cfg.train.threads,
        "train.checkpoint_every": cfg.train.checkpoint_every,
    }
    for key, value in optional_positive.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{key}: must be > 0 or null, got {value}")
    if cfg.train.batch_size < 2:
        # BatchNorm after DeepLabV3's image pooling needs two values per channel to train.
        raise ConfigError(f"train.batch_size: must be >= 2, got {cfg.train.batch_size}")
    if cfg.train.lr <= 0:
        raise ConfigError(f"train.lr: must be > 0, got {cfg.train.lr}")
    non_negative = {
        "data.num_workers": cfg.data.num_workers,
        "train.weight_decay": cfg.train.weight_decay,
        "train.warmup_steps": cfg.train.warmup_steps,
        "train.min_lr": cfg.train.min_lr,
        "train.dice_smooth": cfg.train.dice_smooth,
        "train.aux_weight": cfg.train.aux_weight,
        "train.min_delta": cfg.train.min_delta,
        "eval.overlap": cfg.eval.overlap,
        "log.image_samples": cfg.log.image_samples,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0, got {value}")
    if cfg.model.bn_momentum is not None and not 0.0 < cfg.model.bn_momentum <= 1.0:
        raise ConfigError(
            f"model.bn_momentum: must be in (0, 1] or null, got {cfg.model.bn_momentum}"
        )
    if cfg.train.ema_decay is not None and not 0.0 < cfg.train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay: must be in (0, 1) or null, got {cfg.train.ema_decay}")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: must be in [0, 1), got {cfg.data.val_fraction}")
    if cfg.eval.overlap >= cfg.eval.tile:
        raise ConfigError(f"eval.overlap: must be smaller than eval.tile ({cfg.eval.tile})")
    aug = cfg.augment
    for key in ("hflip", "vflip", "rotate90", "affine", "color_jitter", "focus_crop"):
        p = getattr(aug, key)
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"augment.{key}: a probability in [0, 1], got {p}")
    lo, hi = aug.crop_scale
    if not 0.0 < lo <= hi <= 1.0:
        raise ConfigError(f"augment.crop_scale: need 0 < min <= max <= 1, got {[lo, hi]}")
    lo, hi = aug.crop_ratio
    if not 0.0 < lo <= hi:
        raise ConfigError(f"augment.crop_ratio: need 0 < min <= max, got {[lo, hi]}")
    lo, hi = aug.affine_scale
    if not 0.0 < lo <= hi:
        raise ConfigError(f"augment.affine_scale: need 0 < min <= max, got {[lo, hi]}")
    for key, weights in (
        ("data.oversample", cfg.data.oversample),
        ("train.class_weights", cfg.train.class_weights),
    ):
        for name, w in weights.items():
            if not w >= 0:
                raise ConfigError(f"{key}.{name}: must be >= 0, got {w}")
    if cfg.run_name is not None and (
        not cfg.run_name
        or "/" in cfg.run_name
        or "\\" in cfg.run_name
        or cfg.run_name in {".", ".."}
    ):
        raise ConfigError(f"run_name: must be a plain folder name, got {cfg.run_name!r}")


def check_class_names(cfg: Config, names: Sequence[str]) -> None:
    """Class names used in the config must exist in the label map."""
    for i, name in enumerate(cfg.augment.focus_classes):
        if name not in names:
            raise ConfigError(
                f"augment.focus_classes[{i}]: unknown class {name!r}; classes: {list(names)}"
            )
    for key, weights in (
        ("data.oversample", cfg.data.oversample),
        ("train.class_weights", cfg.train.class_weights),
    ):
        for name in weights:
            if name not in names:
                raise ConfigError(f"{key}.{name}: unknown class {name!r}; classes: {list(names)}")


# --- typed conversion -------------------------------------------------------------------------


def _build(cls: type, data: Any, prefix: str, source: str) -> Any:
    where = prefix.rstrip(".") or "<top level>"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {where}: expected a mapping, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'{hint}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        kwargs[name] = _coerce(data[name], hints[name], f"{prefix}{name}", source)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, {} if value is None else value, key + ".", source)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            if value is None:
                raise ConfigError(f"{source}: {key}: must not be null")
            return _coerce(value, inner[0], key, source)
        raise TypeError(f"unsupported config type {tp}")  # pragma: no cover
    if value is None:
        raise ConfigError(f"{source}: {key}: must not be null (expected {_type_name(tp)})")
    if origin is Literal:
        if value not in args or isinstance(value, bool):
            choices = " | ".join(str(a) for a in args)
            raise ConfigError(f"{source}: {key}: expected one of {choices}, got {_show(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: expected true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{source}: {key}: expected an integer, got {_show(value)}")
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise ConfigError(f"{source}: {key}: expected an integer, got {_show(value)}")
        return int(value)
    if tp is float:
        # YAML 1.1 reads "1e-4" (no dot) as a string; accept any numeric text for float keys.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(
                    f"{source}: {key}: expected a number, got {_show(value)}"
                ) from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{source}: {key}: expected a number, got {_show(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{source}: {key}: expected a finite number, got {value}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key}: expected a string, got {_show(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(
                f"{source}: {key}: expected a list of {len(args)} values, got {_show(value)}"
            )
        return tuple(
            _coerce(v, a, f"{key}[{i}]", source)
            for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{source}: {key}: expected a list, got {_show(value)}")
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: {key}: expected a mapping, got {_show(value)}")
        return {
            _coerce(k, args[0], f"{key} key", source): _coerce(v, args[1], f"{key}.{k}", source)
            for k, v in value.items()
        }
    raise TypeError(f"unsupported config type {tp}")  # pragma: no cover


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"
