"""Wiring a run: config -> label map -> output folder -> data -> model -> loss, optimiser,
schedule -> the :class:`~trainer.run.Run` the loop trains (restored from ``train.resume``).

Everything that can be wrong with the config, the data or the output folder is found here,
before the first step, as one of :data:`USER_ERRORS`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from shared.bands import BandError, BandSpec
from shared.checkpoint import CheckpointError, bands_from_checkpoint, load_checkpoint
from shared.imaging import ImageError
from shared.inference import InferenceOptions, Predictor
from shared.labels import DEFAULT_LABEL_MAPPING, LabelMap, LabelMapError
from shared.model import WeightsUnavailableError, build_model, canonical_backbone
from shared.precision import resolve_precision
from shared.preprocess import STATS_FILE, Normalization, load_stats, normalization_for, save_stats
from trainer import distributed
from trainer.config import Config, ConfigError, check_class_names, dump_yaml
from trainer.data import (
    DatasetError,
    Loaders,
    SegmentationDataset,
    build_train_transform,
    collect_pairs,
    make_loaders,
    sampling_weights,
    split_train_val,
)
from trainer.dataset_layout import DatasetLayoutError, dataset_band_spec, image_gsd
from trainer.distributed import DistInfo
from trainer.ema import ModelEma
from trainer.logging_utils import Board, setup_logging
from trainer.losses import SegmentationLoss, class_weight_tensor, logit_adjustment
from trainer.outputs import (
    OutputDirError,
    check_free_space,
    checkpoint_bytes,
    default_run_name,
    prepare_run_dir,
)
from trainer.reproducibility import configure_determinism, seed_everything
from trainer.resume import restore
from trainer.run import Run
from trainer.schedule import LRSchedule
from trainer.threads import ThreadTuner, available_cpus

log = logging.getLogger("trainer")

# Problems the user fixes (config, data, folders, checkpoints): one line, exit 2, no traceback.
USER_ERRORS = (
    ConfigError,
    DatasetError,
    DatasetLayoutError,
    OutputDirError,
    CheckpointError,
    LabelMapError,
    WeightsUnavailableError,
    ImageError,
)


class RemoteRankError(RuntimeError):
    """Another rank hit a user error during start-up; its message is relayed here."""


def build_run(cfg: Config, info: DistInfo) -> Run:
    """Every piece of a run wired together, and restored from ``train.resume`` if set."""
    device = info.device
    tuner = make_thread_tuner(cfg, device)
    configure_determinism(cfg.train.deterministic)
    precision = training_precision(cfg, device)
    label_map = LabelMap.load(Path(cfg.data.label_map or DEFAULT_LABEL_MAPPING))
    check_class_names(cfg, label_map.names)
    spec, first_image = resolve_data_bands(cfg)
    cfg = with_resolved_bands(cfg, spec)
    resume_ckpt = load_resume_checkpoint(cfg, spec)
    # The output folder first: a bad out_dir must fail in seconds, not after an epoch.
    run_dir = open_run_dir(cfg, info, resuming=resume_ckpt is not None, spec=spec)
    log.info(
        "run folder %s; device %s x%d, precision %s", run_dir, device, info.world_size, precision
    )
    log.info("bands: %s (%s, nodata %s)", describe_bands(spec), spec.dtype, spec.nodata)
    normalization = on_main(info, band_normalization, cfg, spec)
    gsd_m = image_gsd(first_image)

    seed_everything(cfg.train.seed + info.rank)
    loaders = load_data(cfg, label_map, info, spec, normalization)
    model = make_model(cfg, label_map.num_classes, spec, resuming=resume_ckpt is not None)
    model = place_model(model, cfg, info)
    on_main(info, check_free_space, run_dir, 3 * checkpoint_bytes(model))
    optimizer = make_optimizer(model, cfg)
    # DDP makes every rank's weights rank 0's: the EMA copy comes after it.
    train_model = wrap_for_training(model, cfg, info)
    ema = ModelEma(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
    predictor = make_predictor(
        ema.module if ema is not None else model, label_map, normalization, cfg, precision, device
    )
    predictor.metadata["bands"] = spec.to_dict()
    run = Run(
        cfg=cfg,
        info=info,
        run_dir=run_dir,
        label_map=label_map,
        normalization=normalization,
        model=model,
        train_model=train_model,
        criterion=make_criterion(cfg, label_map).to(device),
        optimizer=optimizer,
        schedule=make_schedule(optimizer, cfg, len(loaders.train)),
        scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
        loaders=loaders,
        precision=precision,
        predictor=predictor,
        board=Board(run_dir / "tb" if info.is_main and cfg.log.tensorboard else None),
        threads=tuner,
        ema=ema,
        bands=spec,
        gsd_m=gsd_m,
    )
    model.train()  # the Predictor switched it to eval mode
    if resume_ckpt is not None:
        restore(run, resume_ckpt)
    return run


def training_precision(cfg: Config, device: torch.device) -> str:
    """``train.precision`` resolved for ``device``; one it cannot run is a ConfigError."""
    try:
        return resolve_precision(cfg.train.precision, device, training=True)
    except ValueError as err:
        raise ConfigError(f"train.precision: {err}") from None


def make_thread_tuner(cfg: Config, device: torch.device) -> ThreadTuner | None:
    """Sets ``train.threads``; with ``train.adapt_threads`` on the CPU, the tuner that varies it."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if not cfg.train.adapt_threads or device.type != "cpu":
        return None
    if cfg.train.deterministic:
        # The thread count changes the order of floating-point sums, and the tuner picks it by
        # timing: a deterministic run keeps one count.
        log.info("train.deterministic: adapt_threads is off")
        return None
    return ThreadTuner([1, cfg.train.threads or available_cpus()])


def open_run_dir(
    cfg: Config, info: DistInfo, *, resuming: bool, spec: BandSpec | None = None
) -> Path:
    """The checked (writable, not another run's unless resuming) run folder, its log file and
    the resolved config written into it (with the resolved bands' names as a comment)."""
    run_dir = on_main(
        info, prepare_run_dir, resolve_run_dir(cfg), overwrite=cfg.overwrite, resuming=resuming
    )
    setup_logging(run_dir / "train.log" if info.is_main else None, enabled=info.is_main)
    if info.is_main:
        dump_yaml(cfg, run_dir / "config.yaml")
        if spec is not None:
            with (run_dir / "config.yaml").open("a", encoding="utf-8") as f:
                f.write(f"# data.bands resolved, in model order: {describe_bands(spec)}\n")
    return run_dir


def resolve_data_bands(cfg: Config) -> tuple[BandSpec, Path]:
    """``data.bands`` and ``data.nodata`` resolved against the first training image (and that
    image), before any work: a band the data do not have is a ConfigError naming it."""
    try:
        return dataset_band_spec(cfg.data.root, cfg.data.bands, cfg.data.nodata)
    except BandError as err:
        raise ConfigError(f"data.bands: {err}") from None
    except ImageError as err:
        raise DatasetError(str(err)) from None


def with_resolved_bands(cfg: Config, spec: BandSpec) -> Config:
    """``cfg`` with ``data.bands`` as the resolved 1-based band numbers in model order."""
    resolved = cfg.model_copy(deep=True)
    resolved.data.bands = list(spec.indexes)
    return resolved


def describe_bands(spec: BandSpec) -> str:
    return ", ".join(f"{b.index}={b.name}" for b in spec.bands)


def band_normalization(cfg: Config, spec: BandSpec) -> Normalization:
    """ImageNet for 8-bit RGB; else the training split's per-band statistics (nodata
    excluded) from the data root's :data:`~shared.preprocess.STATS_FILE`, measured (as
    ``python -m trainer.prepare stats`` does) and written there when it is missing."""
    from trainer.prepare import PrepareError, measure_band_stats

    if spec.is_rgb8():
        return normalization_for(spec, None)
    path = Path(cfg.data.root) / STATS_FILE
    if path.is_file():
        try:
            return normalization_for(spec, load_stats(path, spec))
        except ValueError as err:
            log.warning("%s; measuring the bands of this run instead", err)
    log.info("measuring per-band statistics of %s (training split, nodata excluded)", path.parent)
    try:
        measured_spec, stats, files = measure_band_stats(
            Path(cfg.data.root), list(spec.indexes), spec.nodata
        )
        if not path.exists():
            try:
                norm = save_stats(path, measured_spec, stats, split="trainval", files=files)
                log.info("wrote %s", path)
            except OSError as err:
                log.warning("cannot write %s (%s); statistics kept for this run", path, err)
                norm = stats.normalization(spec.names)
        else:
            norm = stats.normalization(spec.names)
        return normalization_for(spec, norm)
    except PrepareError as err:
        raise DatasetError(str(err)) from None
    except ValueError as err:  # a constant band, no valid pixel
        raise DatasetError(f"{cfg.data.root}: {err}") from None


def load_resume_checkpoint(cfg: Config, spec: BandSpec | None = None) -> dict[str, Any] | None:
    if not cfg.train.resume:
        return None
    ckpt = load_checkpoint(cfg.train.resume)
    if canonical_backbone(ckpt["arch"]["backbone"]) != cfg.model.backbone:
        raise ConfigError(
            f"train.resume: checkpoint is {ckpt['arch']['backbone']}, "
            f"model.backbone is {cfg.model.backbone}"
        )
    trained = bands_from_checkpoint(ckpt)
    if spec is not None and (trained.indexes, trained.names) != (spec.indexes, spec.names):
        raise ConfigError(
            f"train.resume: checkpoint reads bands {describe_bands(trained)}, data.bands "
            f"resolves to {describe_bands(spec)}"
        )
    return ckpt


def resolve_run_dir(cfg: Config) -> Path:
    """``out_dir/run_name``; resuming without a run name continues in the checkpoint's folder."""
    if cfg.run_name is None and cfg.train.resume:
        return Path(cfg.train.resume).resolve().parent
    return Path(cfg.out_dir) / (cfg.run_name or default_run_name())


def on_main(info: DistInfo, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` on rank 0 only and hand its result (or its user error) to every rank."""
    outcome: tuple[str, Any] = ("ok", None)
    if info.is_main:
        try:
            outcome = ("ok", fn(*args, **kwargs))
        except USER_ERRORS as err:
            if not info.enabled:
                raise
            outcome = ("error", f"{type(err).__name__}: {err}")
    outcome = distributed.broadcast_object(outcome)
    if outcome[0] == "error":
        if info.is_main:
            raise RemoteRankError(outcome[1].split(": ", 1)[1])
        raise RemoteRankError(outcome[1])
    return outcome[1]


def check_files(cfg: Config, label_map: LabelMap) -> tuple[list, list]:
    """Every trainval (and, with evaluation on, test) pair decodes and holds known labels."""
    log.info("checking %s ...", cfg.data.root)
    t0 = time.perf_counter()
    pairs = collect_pairs(cfg.data.root, "trainval", label_map, on_bad_file=cfg.data.on_bad_file)
    test = []
    if cfg.eval.enabled:
        test = collect_pairs(
            cfg.data.root, cfg.eval.split, label_map, on_bad_file=cfg.data.on_bad_file
        )
    log.info(
        "%d trainval and %d %s pairs checked in %.1fs",
        len(pairs),
        len(test),
        cfg.eval.split,
        time.perf_counter() - t0,
    )
    return pairs, test


def load_data(
    cfg: Config,
    label_map: LabelMap,
    info: DistInfo,
    spec: BandSpec | None = None,
    normalization: Normalization | None = None,
) -> Loaders:
    """Check every file, split train/val (seeded), build datasets and loaders. Images are read
    as ``spec``'s bands (8-bit RGB without it), nodata pixels at the band means of
    ``normalization`` (so they normalise to 0, as the service fills them)."""
    pairs, _ = on_main(info, check_files, cfg, label_map)
    train_pairs, val_pairs = split_train_val(pairs, cfg.data.val_fraction, cfg.train.seed)
    if spec is not None and cfg.augment.color_jitter > 0 and not spec.is_rgb8():
        raise ConfigError(
            "augment.color_jitter: colour transforms apply to 8-bit red, green, blue only; the "
            f"bands are {describe_bands(spec)} ({spec.dtype}); set it to 0"
        )
    fill = None
    if normalization is not None:
        fill = [m * normalization.scale for m in normalization.mean]
    transform = build_train_transform(
        cfg.augment,
        cfg.data.image_size,
        ignore_index=label_map.ignore_index,
        num_classes=label_map.num_classes,
        focus_ids=[label_map.names.index(n) for n in cfg.augment.focus_classes],
    )
    data = {"cache": cfg.data.cache, "spec": spec, "fill": fill}
    train_set = SegmentationDataset(train_pairs, label_map, transform, **data)
    val_set = SegmentationDataset(val_pairs, label_map, None, **data)
    weights = None
    if cfg.data.oversample:
        presence = train_set.class_presence(cfg.data.oversample_min_pixels)
        weights = sampling_weights(presence, cfg.data.oversample, label_map.names)
        boosted = int((weights > 1).sum()) if weights is not None else 0
        log.info("oversampling: %d of %d training tiles weighted up", boosted, len(train_set))
    loaders = make_loaders(
        train_set,
        val_set,
        batch_size=cfg.train.batch_size,
        num_workers=cfg.data.num_workers,
        seed=cfg.train.seed,
        rank=info.rank,
        world_size=info.world_size,
        weights=weights,
        pin_memory=info.device.type == "cuda",
    )
    log.info(
        "data: %d train / %d val tiles, %d steps per epoch (batch %d x %d process(es) x %d accum.)",
        loaders.train_size,
        loaders.val_size,
        len(loaders.train) // cfg.train.accumulate,
        cfg.train.batch_size,
        info.world_size,
        cfg.train.accumulate,
    )
    return loaders


def make_model(
    cfg: Config, num_classes: int, spec: BandSpec | None = None, *, resuming: bool
) -> nn.Module:
    """DeepLabV3 from shared.model reading ``spec``'s bands (8-bit RGB without it); a resumed
    run takes its weights from the checkpoint."""
    weights = "none" if resuming else cfg.model.weights
    spec = spec or BandSpec.rgb()
    try:
        model = build_model(
            cfg.model.backbone,
            num_classes=num_classes,
            weights=weights,
            aux_loss=cfg.model.aux_loss,
            in_channels=spec.count,
            band_names=spec.names,
        )
    except ValueError as err:
        raise ConfigError(f"model.weights: {err}") from None
    if cfg.model.bn_momentum is not None:
        # Momentum is a training hyperparameter, not part of the weights: checkpoints are
        # unaffected and the service's model is built the same way.
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = cfg.model.bn_momentum
    return model


def place_model(model: nn.Module, cfg: Config, info: DistInfo) -> nn.Module:
    """On the device, in channels_last if asked, with synchronised BatchNorm across ranks."""
    model = model.to(info.device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.train.sync_bn and info.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def wrap_for_training(model: nn.Module, cfg: Config, info: DistInfo) -> nn.Module:
    """What the training forward runs: DDP across ranks and/or ``torch.compile``."""
    train_model = model
    if info.enabled:
        device = info.device
        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.train.compile:
        train_model = torch.compile(train_model)
    return train_model


def make_criterion(cfg: Config, label_map: LabelMap) -> SegmentationLoss:
    return SegmentationLoss(
        cfg.train.loss,
        num_classes=label_map.num_classes,
        ignore_index=label_map.ignore_index,
        smooth=cfg.train.dice_smooth,
        class_weights=class_weight_tensor(cfg.train.class_weights, label_map.names),
        aux_weight=cfg.train.aux_weight,
        lovasz_per_image=cfg.train.lovasz_per_image,
    )


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """Adam or AdamW; no weight decay on biases and normalisation parameters (1-D tensors),
    where shrinking towards zero only fights the normalisation."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.train.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.train.lr)
    return torch.optim.Adam(groups, lr=cfg.train.lr)


def make_schedule(
    optimizer: torch.optim.Optimizer, cfg: Config, batches_per_epoch: int
) -> LRSchedule:
    """Warm-up, then decay over the planned steps or the time budget, whichever runs out first.
    The planned steps are the epochs' steps, or ``train.max_steps`` when that ends the run first:
    a run that stops at max_steps has decayed to min_lr by then."""
    steps_per_epoch = max(1, batches_per_epoch // cfg.train.accumulate)
    planned = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps is not None:
        planned = min(planned, cfg.train.max_steps)
    return LRSchedule(
        optimizer,
        base_lr=cfg.train.lr,
        total_steps=planned,
        warmup_steps=cfg.train.warmup_steps,
        kind=cfg.train.schedule,
        power=cfg.train.poly_power,
        min_lr=cfg.train.min_lr,
        budget_s=cfg.train.max_minutes * 60.0 if cfg.train.max_minutes else None,
    )


def make_predictor(
    model: nn.Module,
    label_map: LabelMap,
    normalization: Normalization,
    cfg: Config,
    precision: str,
    device: torch.device,
) -> Predictor:
    """Validation runs through the service's inference path, at full tile resolution, with the
    logit adjustment the checkpoints record (``train.logit_adjustment``), so the best epoch is
    chosen on what will be served."""
    offsets = None
    if cfg.train.logit_adjustment:
        offsets = logit_adjustment(cfg.train.class_weights, label_map.names)
    return Predictor(
        model,
        label_map,
        normalization,
        InferenceOptions(
            device=str(device),
            precision=precision,
            channels_last=cfg.train.channels_last,
            tile=cfg.eval.tile,
            overlap=cfg.eval.overlap,
            tile_batch=cfg.eval.tile_batch,
        ),
        offsets,
    )
