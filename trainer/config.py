"""Training configuration: defaults below, then a YAML file, then ``key.path=value`` overrides
(values parsed as YAML, so ``null``, ``true``, ``[0.5, 1.0]`` work). Every key, type and range
is checked before any work starts; a :class:`ConfigError` names the key, the value and the file.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.functional_validators import AfterValidator, BeforeValidator, model_validator

from shared.bands import parse_nodata
from shared.model import BACKBONE_IDS, canonical_backbone
from shared.precision import TRAINING_PRECISIONS
from shared.tiling import check_tile_overlap
from trainer.losses import LOSSES
from trainer.overrides import parse_override, read_config_file, set_dotted


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key (and the file)."""


def _require(ok: Callable[[Any], bool], message: str, when: Any = AfterValidator) -> Any:
    """A validator that refuses a value for which ``ok`` is false, with ``message``."""

    def check(value: Any) -> Any:
        if not ok(value):
            raise ValueError(message)
        return value

    return when(check)


# YAML's true/false are not numbers, whatever Python thinks of bool.
_NUMBER = _require(lambda v: not isinstance(v, bool), "a number, not true/false", BeforeValidator)
Int = Annotated[int, _NUMBER]
Float = Annotated[float, _NUMBER]
Probability = Annotated[float, _NUMBER, Field(ge=0.0, le=1.0)]
Positive = Annotated[int, _NUMBER, Field(gt=0)]
NonNegative = Annotated[float, _NUMBER, Field(ge=0.0)]
ClassFactors = dict[str, NonNegative]  # per class name; classes not listed weigh 1.0
_ORDERED = _require(lambda pair: 0.0 < pair[0] <= pair[1], "need 0 < min <= max")
Range = Annotated[tuple[Float, Float], _ORDERED]  # (min, max)
_PLAIN = _require(
    lambda s: s not in {"", ".", ".."} and not {"/", "\\"} & set(s), "must be a plain folder name"
)
FolderName = Annotated[str, _PLAIN]
BandItem = Positive | str  # a band by 1-based number or by description


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class DataConfig(Section):
    root: str = "data/bluemarble"
    label_map: str | None = None  # null: label_mapping.json at the repository root
    image_size: Positive = 512  # side of the square training crop
    val_fraction: Float = Field(0.1, ge=0.0, lt=1.0)  # share of TAIN_VAL_SET held out
    num_workers: Int = Field(2, ge=0)
    cache: bool = False  # keep decoded tiles in memory (small datasets only)
    on_bad_file: Literal["error", "skip"] = "error"
    oversample: ClassFactors = {}  # a tile's draw weight: the largest of the classes it holds
    oversample_min_pixels: Positive = 1  # the pixels a class needs in a tile to count as held
    bands: list[BandItem] | None = None  # in model order; null: every band but alpha
    nodata: Annotated[str | float, AfterValidator(parse_nodata)] = "auto"  # auto|none|VALUE


class AugmentConfig(Section):
    crop: Literal["random_resized", "random"] = "random_resized"  # random: native resolution
    crop_scale: Annotated[tuple[Probability, Probability], _ORDERED] = (0.25, 1.0)
    crop_ratio: Range = (0.75, 1.3333333)
    focus_crop: Probability = 0.0  # share of crops centred on a pixel of focus_classes
    focus_classes: list[str] = []
    hflip: Probability = 0.5
    vflip: Probability = 0.5
    rotate90: Probability = 0.5
    affine: Probability = 0.0  # shift-scale-rotate; areas rotated in are ignore_index
    affine_scale: Range = (0.9, 1.1)
    affine_rotate: Float = 15.0
    affine_translate: Float = 0.05
    color_jitter: Probability = 0.0
    brightness: Float = 0.2
    contrast: Float = 0.2
    saturation: Float = 0.2
    hue: Float = 0.02


class ModelConfig(Section):
    # shared.model.BACKBONES; an old id is read as its new name, which the run records
    backbone: Annotated[Literal[BACKBONE_IDS], AfterValidator(canonical_backbone)] = "resnet50"
    weights: str = "none"  # none | coco_voc | imagenet | a path
    aux_loss: bool = False
    bn_momentum: Float | None = Field(None, gt=0.0, le=1.0)  # null: torchvision's


class TrainConfig(Section):
    epochs: Positive = 30
    batch_size: Int = Field(8, ge=2)  # per process; BatchNorm needs two values per channel
    lr: Float = Field(1e-4, gt=0.0)
    max_steps: Positive | None = None
    max_minutes: Float | None = Field(None, gt=0.0)  # the schedule decays to min_lr as it ends
    seed: Int = 42
    resume: str | None = None  # a last.pt to continue from
    loss: Literal[LOSSES] = "dice+ce"  # trainer.losses.LOSSES
    # The Lovasz term of each crop on its own, averaged, instead of one over the batch's pixels.
    lovasz_per_image: bool = False
    class_weights: ClassFactors = {}
    # Subtract log(class weight) from each logit wherever the checkpoint predicts: the weights
    # still make training attend to a rare class, without fattening its predictions.
    logit_adjustment: bool = False
    dice_smooth: NonNegative = 1.0
    aux_weight: NonNegative = 0.4
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: NonNegative = 0.0
    warmup_steps: Int = Field(0, ge=0)
    schedule: Literal["poly", "cosine", "constant"] = "poly"
    poly_power: Float = 0.9
    min_lr: NonNegative = 0.0
    grad_clip: Float | None = Field(None, gt=0.0)
    accumulate: Positive = 1
    precision: Literal[TRAINING_PRECISIONS] = "auto"  # bf16/fp16 on devices that run them fast
    channels_last: bool = True
    compile: bool = False
    ema_decay: Float | None = Field(None, gt=0.0, lt=1.0)  # validate and save a weight EMA
    # Before each validation, recompute the BatchNorm statistics of the weights validated and
    # saved over this many batches of the epoch's training crops (trainer/batchnorm.py).
    precise_bn_batches: Positive | None = None
    # What best.pt holds: the weights of the epoch with the highest validation mIoU, or the last
    # epoch's (for a fixed schedule whose validation split is too small to choose between the
    # last epochs: their differences there are noise, and the pick carries it to the test set).
    best_by: Literal["val_miou", "last_epoch"] = "val_miou"
    # Validate (after precise BN) every this many epochs, and always after the last one; an
    # epoch in between only writes last.pt. With best_by=last_epoch, validation in between
    # only logs progress, and a short run spends its time better on training steps.
    val_every: Positive = 1
    patience: Positive | None = None  # validations without a val mIoU gain above min_delta
    min_delta: NonNegative = 0.0
    deterministic: bool = False  # deterministic kernels and one thread count
    sync_bn: bool = False
    device: str = "auto"
    threads: Positive | None = None  # torch intra-op threads per process
    # CPU: time 1 thread against `threads` now and then, keep the faster (trainer/threads.py).
    # Off when `deterministic` is on: the thread count changes the order of sums.
    adapt_threads: bool = False
    checkpoint_every: Positive | None = None  # also write last.pt every N steps
    log_every: Positive = 10

    @model_validator(mode="after")
    def _early_stopping(self) -> TrainConfig:
        if self.patience is not None and self.best_by != "val_miou":
            raise ValueError(
                "patience stops on validation mIoU and needs best_by=val_miou, "
                f"got best_by={self.best_by}"
            )
        return self

    @model_validator(mode="after")
    def _lovasz_option(self) -> TrainConfig:
        if self.lovasz_per_image and "lovasz" not in self.loss.split("+"):
            raise ValueError(f"lovasz_per_image needs a loss with a lovasz term, got {self.loss}")
        return self


class EvalConfig(Section):
    enabled: bool = True  # evaluate a checkpoint of the run on the test split after training
    checkpoint: Literal["best", "last"] = "best"
    split: Literal["test", "trainval"] = "test"
    tile: Positive = 512
    overlap: Int = Field(64, ge=0)
    tile_batch: Positive = 4
    flips: bool = False  # test-time flips (4 forward passes per tile), as SATSEG_FLIPS serves
    boundary_width: Positive = 3

    @model_validator(mode="after")
    def _tiling(self) -> EvalConfig:
        check_tile_overlap(self.tile, self.overlap, aligned=True)  # as the Predictor will
        return self


class LogConfig(Section):
    tensorboard: bool = True
    image_samples: Int = Field(4, ge=0)  # validation overlays shown every epoch
    progress: Literal["auto", "bar", "lines"] = "auto"


class Config(Section):
    out_dir: str = "runs"
    run_name: FolderName | None = None  # null: a UTC timestamp
    overwrite: bool = False  # allow a new run to replace an existing run folder's checkpoints
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    log: LogConfig = LogConfig()


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (over its ``base:`` file, if it names one), then
    ``key.path=value`` overrides; validated."""
    try:
        data = read_config_file(path) if path is not None else {}
        for item in overrides:
            set_dotted(data, *parse_override(item))
        return Config.model_validate(data)
    except ValidationError as err:
        source = str(path) if path is not None else "<defaults>"
        raise ConfigError(f"{source}: {_describe(err.errors()[0])}") from None
    except ValueError as err:  # the file or an override, named in the message
        raise ConfigError(str(err)) from None


def _describe(error: Any) -> str:
    loc = [str(part) for part in error["loc"] if not str(part).startswith(("function-", "tuple["))]
    key = ".".join(loc) or "<top level>"
    if error["type"] == "extra_forbidden":
        section: Any = Config
        for part in loc[:-1]:
            section = section.model_fields[part].annotation
        close = difflib.get_close_matches(loc[-1], list(section.model_fields), n=1)
        hint = f" (did you mean '{'.'.join([*loc[:-1], close[0]])}'?)" if close else ""
        return f"unknown key '{key}'{hint}"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "value_error" and isinstance(error["input"], dict):
        return f"{key}.{message}"  # a section's own check; its message starts with the field
    got = f"got {error['input']!r}"
    return f"{key}: {message}" if message.endswith(got) else f"{key}: {message}, {got}"


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML: the run folder's record of what was trained."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=None)


def dump_yaml(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(to_yaml(cfg), encoding="utf-8")


def check_class_names(cfg: Config, names: Sequence[str]) -> None:
    """Class names used in the config must exist in the label map."""
    used = [(f"augment.focus_classes[{i}]", n) for i, n in enumerate(cfg.augment.focus_classes)]
    used += [(f"data.oversample.{n}", n) for n in cfg.data.oversample]
    used += [(f"train.class_weights.{n}", n) for n in cfg.train.class_weights]
    for key, name in used:
        if name not in names:
            raise ConfigError(f"{key}: unknown class {name!r}; classes: {list(names)}")
