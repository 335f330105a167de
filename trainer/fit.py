"""Train DeepLabV3 on a folder dataset; the checkpoint it writes is what the service loads.

    python -m trainer.fit --config trainer/config.yaml [key.path=value ...]
    torchrun --nproc_per_node=N -m trainer.fit --config trainer/config.yaml ...

One epoch: augmented crops -> forward under autocast -> Dice/CE loss (+ aux head) -> backward
(accumulated, clipped) -> optimiser step with a warm-up + poly/cosine learning rate; then
validation at full tile resolution through the service's inference path, TensorBoard scalars
and an overlay grid, ``last.pt`` (and ``best.pt`` when validation mIoU improves). After the
last epoch the best checkpoint is scored on the test split and the table is saved as JSON.

Everything that can be wrong with the config, the data or the output folder is found before
the first step; such errors print one line and exit with code 2.

Testing hook: with ``SATSEG_RANK_STATE_DIR`` set, every rank also saves its final weights there
as ``rank<N>.pt`` (to prove that distributed replicas end identical).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from shared.checkpoint import CheckpointError, build_checkpoint, load_checkpoint, save_checkpoint
from shared.imaging import ImageError
from shared.inference import InferenceOptions, Predictor, cpu_has_native_bf16, resolve_device
from shared.labels import DEFAULT_LABEL_MAPPING, LabelMap, LabelMapError
from shared.metrics import ConfusionMatrix, scores
from shared.model import WeightsUnavailableError, build_model
from shared.preprocess import Normalization, normalize
from trainer import distributed
from trainer.config import (
    Config,
    ConfigError,
    check_class_names,
    dump_yaml,
    load_config,
    to_dict,
)
from trainer.data import (
    DatasetError,
    Loaders,
    SegmentationDataset,
    build_train_transform,
    collect_pairs,
    iterate_batches,
    make_loaders,
    sampling_weights,
    split_train_val,
)
from trainer.dataset_layout import DatasetLayoutError
from trainer.distributed import DistInfo
from trainer.ema import ModelEma
from trainer.evaluate import evaluate_checkpoint, format_table, write_json
from trainer.logging_utils import (
    Board,
    Progress,
    metric_scalars,
    overlay_grid,
    setup_logging,
)
from trainer.losses import SegmentationLoss, class_weight_tensor
from trainer.outputs import (
    OutputDirError,
    check_free_space,
    checkpoint_bytes,
    default_run_name,
    prepare_run_dir,
)
from trainer.reproducibility import capture_rng, configure_determinism, restore_rng, seed_everything
from trainer.schedule import LRSchedule
from trainer.threads import ThreadTuner, available_cpus

log = logging.getLogger("trainer")

EXIT_OK, EXIT_ERROR = 0, 2
RANK_STATE_ENV = "SATSEG_RANK_STATE_DIR"
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


@dataclass
class EpochResult:
    finished: bool  # the epoch ran to its end (no step or time limit hit)
    images: int  # training images seen, all ranks together
    seconds: float
    loss: float  # mean total loss over the epoch's batches


@dataclass
class RunState:
    """Where training stands; saved in ``training_state`` so a resumed run continues exactly."""

    epoch: int = 0  # the epoch in progress (== epochs done when batches_done is 0)
    batches_done: int = 0  # batches of `epoch` already trained (mid-epoch checkpoints)
    step: int = 0  # optimiser steps so far
    elapsed_s: float = 0.0  # training wall time before this process started
    best_miou: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0  # epochs since the last improvement (early stopping)
    last_val: dict[str, Any] = field(default_factory=dict)


# --- start-up ----------------------------------------------------------------------------------


def training_precision(name: str, device: torch.device) -> str:
    """auto -> bf16 where the device computes it natively, fp16 (+GradScaler) on CUDA without
    bf16, fp32 otherwise. fp16 on the CPU is refused (slow, and no benefit over bf16)."""
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision: fp16 needs CUDA; use bf16 or fp32 on the CPU")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision: this GPU has no bf16; use fp16 or auto")
    return name


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


def load_data(cfg: Config, label_map: LabelMap, info: DistInfo) -> Loaders:
    """Check every file, split train/val (seeded), build datasets and loaders."""

    def check() -> tuple[list, list]:
        log.info("checking %s ...", cfg.data.root)
        t0 = time.perf_counter()
        pairs = collect_pairs(
            cfg.data.root, "trainval", label_map, on_bad_file=cfg.data.on_bad_file
        )
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

    pairs, _ = on_main(info, check)
    train_pairs, val_pairs = split_train_val(pairs, cfg.data.val_fraction, cfg.train.seed)
    transform = build_train_transform(
        cfg.augment,
        cfg.data.image_size,
        ignore_index=label_map.ignore_index,
        num_classes=label_map.num_classes,
        focus_ids=[label_map.names.index(n) for n in cfg.augment.focus_classes],
    )
    train_set = SegmentationDataset(train_pairs, label_map, transform, cache=cfg.data.cache)
    val_set = SegmentationDataset(val_pairs, label_map, None, cache=cfg.data.cache)
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


def make_model(cfg: Config, num_classes: int, *, resuming: bool) -> nn.Module:
    """DeepLabV3 from shared.model; a resumed run takes its weights from the checkpoint."""
    weights = "none" if resuming else cfg.model.weights
    try:
        model = build_model(
            cfg.model.backbone,
            num_classes=num_classes,
            weights=weights,
            aux_loss=cfg.model.aux_loss,
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


# --- the loop ----------------------------------------------------------------------------------


@dataclass
class Trainer:
    """The pieces of a run, wired together once; :meth:`run` is the epoch loop."""

    cfg: Config
    info: DistInfo
    run_dir: Path
    label_map: LabelMap
    normalization: Normalization
    model: nn.Module  # the bare model (weights, checkpoints, validation)
    train_model: nn.Module  # what the forward runs: DDP and/or compiled wrapper of `model`
    criterion: SegmentationLoss
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    scaler: torch.amp.GradScaler
    loaders: Loaders
    precision: str
    predictor: Predictor
    board: Board
    state: RunState
    # The time source of the budget and the thread tuner, read when training progresses; a
    # resumed run reproduces a straight one exactly when both runs read the same times.
    clock: Callable[[], float] = time.monotonic
    started: float = 0.0
    # This process's training throughput (not counting validation and checkpoints).
    images_trained: int = 0
    train_seconds: float = 0.0
    threads: ThreadTuner | None = None
    ema: ModelEma | None = None

    @property
    def eval_model(self) -> nn.Module:
        """What is validated and saved: the weights' moving average, or the weights."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def elapsed(self) -> float:
        """Training wall time, including what earlier (interrupted) processes spent."""
        return self.state.elapsed_s + self.clock() - self.started

    def out_of_time(self) -> bool:
        budget = self.cfg.train.max_minutes
        return budget is not None and self.elapsed() >= budget * 60.0

    def out_of_time_all_ranks(self) -> bool:
        """Ranks' clocks differ slightly; they must agree on when to stop."""
        if self.cfg.train.max_minutes is None:
            return False
        return distributed.any_rank(self.out_of_time(), self.info.device)

    def out_of_steps(self) -> bool:
        cap = self.cfg.train.max_steps
        return cap is not None and self.state.step >= cap

    # -- one epoch --

    def train_one_epoch(self) -> EpochResult:
        """Train the rest of the current epoch (all of it unless a limit is reached)."""
        cfg, state, device = self.cfg, self.state, self.info.device
        accumulate = cfg.train.accumulate
        loader = self.loaders.train
        self.loaders.sampler.set_epoch(state.epoch)
        self.loaders.sampler.set_start(state.batches_done * cfg.train.batch_size)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total_batches = state.batches_done + len(loader)
        progress = Progress(
            total_batches,
            desc=f"epoch {state.epoch + 1}/{cfg.train.epochs}",
            mode=cfg.log.progress if self.info.is_main else "off",
            initial=state.batches_done,
        )
        sums: dict[str, torch.Tensor] = {}
        seen, window_images, window_start = 0, 0, time.perf_counter()
        epoch_start = time.perf_counter()
        step_start = self.clock()
        epoch_images, epoch_loss = 0, torch.zeros((), device=device)
        finished = True
        for i, (images, masks) in enumerate(loader):
            images = images.to(device, non_blocking=True)
            target = masks.to(device, non_blocking=True).long()
            x = normalize(images, self.normalization)
            x = x.contiguous(
                memory_format=torch.channels_last
                if cfg.train.channels_last
                else torch.contiguous_format
            )
            sync = (i + 1) % accumulate == 0
            # Gradients are all-reduced once per optimiser step, not once per micro-batch.
            no_sync = (
                self.train_model.no_sync()
                if not sync and isinstance(self.train_model, DistributedDataParallel)
                else contextlib.nullcontext()
            )
            with no_sync:
                dtype = self.autocast_dtype
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    outputs = self.train_model(x)
                loss, parts = self.criterion(outputs, target)
                self.scaler.scale(loss / accumulate).backward()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            seen += 1
            window_images += images.shape[0] * self.info.world_size
            epoch_images += images.shape[0] * self.info.world_size
            epoch_loss += parts["total"]
            if not sync:
                continue
            lr = self.schedule.apply(self.elapsed())
            if cfg.train.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.schedule.step()
            state.step += 1
            state.batches_done += accumulate
            if self.ema is not None:
                self.ema.update(self.model, state.step)
            if self.threads is not None:
                now = self.clock()
                self.threads.observe(now - step_start)
                step_start = now

            # Reading losses back from the device waits for it: only when something is shown.
            log_now = state.step % cfg.train.log_every == 0 or state.batches_done >= total_batches
            values = None
            if log_now or progress.mode == "bar":
                values = {k: float(v) / seen for k, v in sums.items()}
                rate = window_images / max(time.perf_counter() - window_start, 1e-9)
                values.update({"lr": lr, "img/s": rate})
            progress.update(accumulate, values if log_now or progress.mode == "bar" else None)
            if log_now and values is not None:
                self.board.scalars(
                    {f"train/{k}": v for k, v in values.items() if k not in ("lr", "img/s")}
                    | {"train/lr": lr, "train/images_per_s": values["img/s"]},
                    state.step,
                )
                sums, seen, window_images, window_start = {}, 0, 0, time.perf_counter()
            stop = self.out_of_steps() or self.out_of_time_all_ranks()
            if stop:
                finished = state.batches_done >= total_batches - (total_batches % accumulate)
                break
            every = cfg.train.checkpoint_every
            if every and state.step % every == 0 and state.batches_done < total_batches:
                self.save(best=False)
        progress.close()
        if finished:
            state.epoch += 1
            state.batches_done = 0
        batches = max(1, epoch_images // (cfg.train.batch_size * self.info.world_size))
        return EpochResult(
            finished=finished,
            images=epoch_images,
            seconds=time.perf_counter() - epoch_start,
            loss=float(epoch_loss) / batches,
        )

    # -- validation --

    @torch.inference_mode()
    def validate(self) -> dict[str, Any] | None:
        """Score this rank's share of the validation set; matrices are summed over ranks."""
        # Replicas share parameters but not BatchNorm statistics; align them first.
        distributed.average_buffers(self.model)
        if self.ema is not None:
            distributed.average_buffers(self.ema.module)
        loader = self.loaders.val
        if loader is None:
            return None
        lm = self.label_map
        self.eval_model.eval()
        matrix = ConfusionMatrix(lm.num_classes, lm.ignore_index)
        loss_sum, loss_count = 0.0, 0
        grid: list = []
        start = time.perf_counter()
        for batch in loader:
            for images, masks in iterate_batches(batch):
                # The service's path (shared.pipeline): one pass up to a tile, tiled above.
                result = self.predictor.predict_batch(images)
                if result.logits is not None:  # one forward pass: its logits give the loss
                    target = masks.to(result.logits.device).long()
                    loss, _ = self.criterion(result.logits, target)
                    loss_sum += float(loss) * images.shape[0]
                    loss_count += images.shape[0]
                pred = torch.from_numpy(result.masks)
                matrix.update(pred, masks)
                if self.info.is_main and len(grid) < self.cfg.log.image_samples:
                    for img, truth, p in zip(images, masks, pred, strict=True):
                        if len(grid) < self.cfg.log.image_samples:
                            grid.append((img.permute(1, 2, 0).numpy(), truth.numpy(), p.numpy()))
        self.model.train()
        device = self.info.device
        total = distributed.all_reduce_sum(matrix.matrix, device)
        sums = distributed.all_reduce_sum(
            torch.tensor([loss_sum, loss_count], dtype=torch.float64).numpy(), device
        )
        result = scores(total, lm.names)
        result["loss"] = float(sums[0] / sums[1]) if sums[1] > 0 else None
        result["seconds"] = time.perf_counter() - start
        result["grid"] = grid
        return result

    # -- checkpoints --

    def training_state(self) -> dict[str, Any]:
        s = self.state
        return {
            "epoch": s.epoch,
            "batches_done": s.batches_done,
            "step": s.step,
            "elapsed_s": self.elapsed(),
            "best_miou": s.best_miou,
            "best_epoch": s.best_epoch,
            "bad_epochs": s.bad_epochs,
            "world_size": self.info.world_size,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            # With EMA the checkpoint's state_dict is the average; the trained weights go here.
            "model": (
                {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
                if self.ema is not None
                else None
            ),
            # Every rank's generators and thread tuner, in rank order.
            "rng": distributed.all_gather_object(capture_rng()),
            "threads": distributed.all_gather_object(
                self.threads.state_dict() if self.threads is not None else None
            ),
        }

    def save(self, *, best: bool) -> None:
        """``last.pt`` (with everything needed to resume) and, if ``best``, ``best.pt``.

        Called on every rank (gathering RNG states is collective); only rank 0 writes.
        """
        training_state = self.training_state()
        if not self.info.is_main:
            return
        metrics = {
            "epoch": self.state.epoch,
            "step": self.state.step,
            "val": self.state.last_val,
            "best_miou": self.state.best_miou,
            "best_epoch": self.state.best_epoch,
        }
        common = {
            "backbone": self.cfg.model.backbone,
            "aux_loss": self.cfg.model.aux_loss,
            "label_map": self.label_map,
            "normalization": self.normalization,
            "config": to_dict(self.cfg),
            "metrics": metrics,
        }
        save_checkpoint(
            build_checkpoint(self.eval_model, training_state=training_state, **common),
            self.run_dir / "last.pt",
        )
        if best:
            # The service needs weights and metadata only; no optimiser state.
            save_checkpoint(build_checkpoint(self.eval_model, **common), self.run_dir / "best.pt")

    def restore(self, ckpt: dict[str, Any]) -> None:
        """Load weights, optimiser, schedule, scaler, counters and RNG from a ``last.pt``."""
        ts = ckpt.get("training_state")
        if not isinstance(ts, dict):
            raise ConfigError(
                f"train.resume: {self.cfg.train.resume} holds no training state "
                "(best.pt is weights only; resume from last.pt)"
            )
        try:
            if self.ema is not None:
                if ts.get("model") is None:
                    raise ValueError("the checkpoint was trained without train.ema_decay")
                self.model.load_state_dict(ts["model"], strict=True)
                self.ema.module.load_state_dict(ckpt["state_dict"], strict=True)
            else:
                if ts.get("model") is not None:
                    raise ValueError("the checkpoint was trained with train.ema_decay")
                self.model.load_state_dict(ckpt["state_dict"], strict=True)
            self.optimizer.load_state_dict(ts["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise ConfigError(
                f"train.resume: {self.cfg.train.resume} does not fit this model/optimiser "
                f"({' '.join(str(err).split())[:300]})"
            ) from None
        self.schedule.load_state_dict(ts["scheduler"])
        self.scaler.load_state_dict(ts["scaler"])
        self.state = RunState(
            epoch=int(ts["epoch"]),
            batches_done=int(ts["batches_done"]),
            step=int(ts["step"]),
            elapsed_s=float(ts["elapsed_s"]),
            best_miou=ts.get("best_miou"),
            best_epoch=ts.get("best_epoch"),
            bad_epochs=int(ts.get("bad_epochs", 0)),
            last_val=dict(ckpt.get("metrics", {}).get("val") or {}),
        )
        rng = ts.get("rng") or []
        tuners = ts.get("threads") or []
        if len(rng) == self.info.world_size:
            restore_rng(rng[self.info.rank])
            if self.threads is not None and len(tuners) == len(rng) and tuners[self.info.rank]:
                self.threads.load_state_dict(tuners[self.info.rank])
        elif rng:
            log.warning(
                "checkpoint was written by %d process(es), this run has %d: RNG streams reseeded",
                len(rng),
                self.info.world_size,
            )
            seed_everything(self.cfg.train.seed + self.info.rank + 1000 * self.state.epoch)

    # -- the epoch loop --

    def run(self) -> None:
        cfg, state = self.cfg, self.state
        self.started = self.clock()
        if state.epoch > 0 or state.batches_done > 0:
            log.info("resuming at epoch %d, step %d", state.epoch + 1, state.step)
        while state.epoch < cfg.train.epochs:
            if self.out_of_steps() or self.out_of_time_all_ranks():
                break
            epoch = state.epoch
            result = self.train_one_epoch()
            finished = result.finished
            rate = result.images / max(result.seconds, 1e-9)
            self.images_trained += result.images
            self.train_seconds += result.seconds
            val = self.validate()
            improved = self.record(val, epoch)
            self.save(best=improved)
            self.board.scalars(
                {"train/epoch_loss": result.loss, "train/epoch_images_per_s": rate}, state.step
            )
            if val is not None:
                log.info(
                    "epoch %d/%d: train loss %.4f, %.1f img/s, %.0fs | val %.1fs: %s mIoU %.4f%s",
                    epoch + 1,
                    cfg.train.epochs,
                    result.loss,
                    rate,
                    result.seconds,
                    val["seconds"],
                    " ".join(
                        f"{c['name']} {c['iou'] if c['iou'] is not None else float('nan'):.4f}"
                        for c in val["per_class"]
                    ),
                    val["miou"] or 0.0,
                    " (best)" if improved else "",
                )
            if not finished:
                log.info(
                    "stopping: %s",
                    "max_steps reached" if self.out_of_steps() else "time budget spent",
                )
                break
            if cfg.train.patience is not None and state.bad_epochs >= cfg.train.patience:
                log.info("early stop: no val mIoU gain for %d epochs", state.bad_epochs)
                break
        self.board.flush()

    def record(self, val: dict[str, Any] | None, epoch: int) -> bool:
        """Log validation; update best and early-stopping counters. True if this is the best."""
        state = self.state
        if val is None:
            # No validation split: the latest weights are the best we know of.
            return True
        grid = val.pop("grid")
        state.last_val = val
        step = state.step
        self.board.scalars(metric_scalars("val", val) | {"val/loss": val.get("loss")}, step)
        if grid:
            self.board.image("val/input_truth_prediction", overlay_grid(grid, self.label_map), step)
        miou = val["miou"]
        if miou is not None and (
            state.best_miou is None or miou > state.best_miou + self.cfg.train.min_delta
        ):
            state.best_miou, state.best_epoch, state.bad_epochs = miou, epoch + 1, 0
            return True
        state.bad_epochs += 1
        return False


# --- entry points ------------------------------------------------------------------------------


def train(cfg: Config) -> dict[str, Any]:
    """Run training (and the test evaluation) for ``cfg``; returns a summary dict.

    Raises the USER_ERRORS types (config, data, output folder, checkpoint) before the first step.
    """
    try:
        device = resolve_device(cfg.train.device)
    except ValueError as err:
        raise ConfigError(f"train.device: {err}") from None
    info = distributed.setup(device)
    try:
        return _train(cfg, info)
    finally:
        distributed.cleanup()


def _train(cfg: Config, info: DistInfo) -> dict[str, Any]:
    trainer = build_trainer(cfg, info)
    board, run_dir, precision = trainer.board, trainer.run_dir, trainer.precision
    board.text("config", "```\n" + format_config(cfg) + "\n```", trainer.state.step)

    trainer.run()
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "epochs": trainer.state.epoch,
        "steps": trainer.state.step,
        "train_minutes": round(trainer.elapsed() / 60.0, 2),
        "train_images_per_s": round(trainer.images_trained / max(trainer.train_seconds, 1e-9), 2),
        "best_miou": trainer.state.best_miou,
        "best_epoch": trainer.state.best_epoch,
    }
    distributed.average_buffers(trainer.eval_model)
    dump_dir = os.environ.get(RANK_STATE_ENV)
    if dump_dir:
        Path(dump_dir).mkdir(parents=True, exist_ok=True)
        torch.save(
            {k: v.detach().cpu() for k, v in trainer.eval_model.state_dict().items()},
            Path(dump_dir) / f"rank{info.rank}.pt",
        )
    distributed.barrier()
    if info.is_main and cfg.eval.enabled:
        summary["test"] = run_test_evaluation(cfg, run_dir, precision, board, trainer.state.step)
    board.close()
    return summary


def build_trainer(cfg: Config, info: DistInfo) -> Trainer:
    """Every piece of a run wired together (and restored from ``train.resume`` if set)."""
    device = info.device
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    tuner = None
    if cfg.train.adapt_threads and device.type == "cpu":
        if cfg.train.deterministic:
            # The thread count changes the order of floating-point sums, and the tuner picks
            # it by timing: a deterministic run keeps one count.
            log.info("train.deterministic: adapt_threads is off")
        else:
            tuner = ThreadTuner([1, cfg.train.threads or available_cpus()])
    configure_determinism(cfg.train.deterministic)
    precision = training_precision(cfg.train.precision, device)

    label_map_path = Path(cfg.data.label_map) if cfg.data.label_map else DEFAULT_LABEL_MAPPING
    label_map = LabelMap.load(label_map_path)
    check_class_names(cfg, label_map.names)
    resume_ckpt = load_checkpoint(cfg.train.resume) if cfg.train.resume else None
    if resume_ckpt is not None and resume_ckpt["arch"]["backbone"] != cfg.model.backbone:
        raise ConfigError(
            f"train.resume: checkpoint is {resume_ckpt['arch']['backbone']}, "
            f"model.backbone is {cfg.model.backbone}"
        )

    # The output folder first: a bad out_dir must fail in seconds, not after an epoch.
    run_dir = on_main(
        info,
        prepare_run_dir,
        resolve_run_dir(cfg),
        overwrite=cfg.overwrite,
        resuming=resume_ckpt is not None,
    )
    setup_logging(run_dir / "train.log" if info.is_main else None, enabled=info.is_main)
    if info.is_main:
        dump_yaml(cfg, run_dir / "config.yaml")
    log.info(
        "run folder %s; device %s x%d, precision %s", run_dir, device, info.world_size, precision
    )

    seed_everything(cfg.train.seed + info.rank)
    loaders = load_data(cfg, label_map, info)

    model = make_model(cfg, label_map.num_classes, resuming=resume_ckpt is not None).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.train.sync_bn and info.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    on_main(info, check_free_space, run_dir, 3 * checkpoint_bytes(model))

    normalization = Normalization()
    weights = class_weight_tensor(cfg.train.class_weights, label_map.names)
    criterion = SegmentationLoss(
        cfg.train.loss,
        num_classes=label_map.num_classes,
        ignore_index=label_map.ignore_index,
        smooth=cfg.train.dice_smooth,
        class_weights=weights,
        aux_weight=cfg.train.aux_weight,
    ).to(device)
    optimizer = make_optimizer(model, cfg)
    steps_per_epoch = max(1, len(loaders.train) // cfg.train.accumulate)
    schedule = LRSchedule(
        optimizer,
        base_lr=cfg.train.lr,
        total_steps=cfg.train.epochs * steps_per_epoch,
        warmup_steps=cfg.train.warmup_steps,
        kind=cfg.train.schedule,
        power=cfg.train.poly_power,
        min_lr=cfg.train.min_lr,
        budget_s=cfg.train.max_minutes * 60.0 if cfg.train.max_minutes else None,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    train_model: nn.Module = model
    if info.enabled:
        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.train.compile:
        train_model = torch.compile(train_model)
    ema = ModelEma(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
    predictor = Predictor(
        ema.module if ema is not None else model,
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
    )
    model.train()  # the Predictor switched it to eval mode
    board = Board(run_dir / "tb" if info.is_main and cfg.log.tensorboard else None)
    trainer = Trainer(
        cfg=cfg,
        info=info,
        run_dir=run_dir,
        label_map=label_map,
        normalization=normalization,
        model=model,
        train_model=train_model,
        criterion=criterion,
        optimizer=optimizer,
        schedule=schedule,
        scaler=scaler,
        loaders=loaders,
        precision=precision,
        predictor=predictor,
        board=board,
        state=RunState(),
        threads=tuner,
        ema=ema,
    )
    if resume_ckpt is not None:
        trainer.restore(resume_ckpt)
    return trainer


def run_test_evaluation(
    cfg: Config, run_dir: Path, precision: str, board: Board, step: int
) -> dict[str, Any]:
    """Score the run's best (or last) checkpoint on the test split; print and save the table."""
    ckpt = run_dir / f"{cfg.eval.checkpoint}.pt"
    if not ckpt.exists():
        ckpt = run_dir / "last.pt"
    t0 = time.perf_counter()
    result = evaluate_checkpoint(
        ckpt,
        cfg.data.root,
        split=cfg.eval.split,
        options=InferenceOptions(
            device=cfg.train.device,
            precision=precision,
            tile=cfg.eval.tile,
            overlap=cfg.eval.overlap,
            tile_batch=cfg.eval.tile_batch,
        ),
        boundary_width=cfg.eval.boundary_width,
        on_bad_file=cfg.data.on_bad_file,
    )
    path = run_dir / f"{cfg.eval.split}_metrics.json"
    write_json(result, path)
    board.scalars(metric_scalars(cfg.eval.split, result), step)
    log.info(
        "%s split, %s: %d images in %.1fs (%.1f images/s)\n%s\nwrote %s",
        cfg.eval.split,
        ckpt.name,
        result["images"],
        time.perf_counter() - t0,
        result["images_per_s"] or 0.0,
        format_table(result),
        path,
    )
    return {k: result[k] for k in ("miou", "pixel_accuracy", "per_class")}


def format_config(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.fit",
        description="Train DeepLabV3 on a folder dataset (see trainer/config.yaml for every key).",
    )
    parser.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key.path=value",
        help="e.g. train.epochs=2 data.image_size=128",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        summary = train(cfg)
    except (*USER_ERRORS, RemoteRankError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted; resume with train.resume=<run folder>/last.pt", file=sys.stderr)
        return 130
    log.info(
        "done: %d epoch(s), %d steps, %.1f min of training at %.1f img/s; best val mIoU %s",
        summary["epochs"],
        summary["steps"],
        summary["train_minutes"],
        summary["train_images_per_s"],
        "-" if summary["best_miou"] is None else f"{summary['best_miou']:.4f}",
    )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
