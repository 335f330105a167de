"""Train DeepLabV3 on a folder dataset; the checkpoint it writes is what the service loads.

    python -m trainer.fit --config trainer/config.yaml [key.path=value ...]
    torchrun --nproc_per_node=N -m trainer.fit --config trainer/config.yaml ...

Read from :func:`main` down: the config, the wired run (:mod:`trainer.build`), then epochs of
:func:`train_one_epoch` (augmented crops -> forward under autocast -> Dice/CE loss -> backward,
accumulated and clipped -> optimiser step at the warm-up + poly/cosine rate -> EMA) and
:func:`evaluate` (every ``train.val_every`` epochs and after the last: full tiles through the
service's inference path, after :func:`recompute_batchnorm` when ``train.precise_bn_batches``
is set), checkpoints
(:mod:`trainer.resume`), and last the test-split evaluation of the best checkpoint.
Errors the user fixes print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from shared.bands import BandSpec
from shared.inference import InferenceOptions, resolve_device
from shared.messages import one_line
from shared.metrics import ConfusionMatrix, scores
from shared.preprocess import normalize
from trainer import distributed
from trainer.batchnorm import recompute_statistics
from trainer.build import USER_ERRORS, RemoteRankError, build_run
from trainer.config import Config, ConfigError, load_config, to_yaml
from trainer.data import iterate_batches, preview_rgb
from trainer.evaluate import evaluate_checkpoint, format_table, write_json
from trainer.logging_utils import Progress, close_logging, metric_scalars, overlay_grid
from trainer.resume import save_checkpoints
from trainer.run import Run

log = logging.getLogger("trainer")

EXIT_OK, EXIT_ERROR = 0, 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        summary = train(cfg)
    except (*USER_ERRORS, RemoteRankError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted; resume with train.resume=<run folder>/last.pt", file=sys.stderr)
        return 130
    # One line a user compares with the README: test IoUs depend on the steps trained, and on a
    # time-bounded run the steps depend on the machine's images/s.
    log.info(
        "done: %d epoch(s), %d steps, %.1f min of training at %.1f img/s; best val mIoU %s%s",
        summary["epochs"],
        summary["steps"],
        summary["train_minutes"],
        summary["train_images_per_s"],
        "-" if summary["best_miou"] is None else f"{summary['best_miou']:.4f}",
        test_summary(summary.get("test")),
    )
    close_logging()
    return EXIT_OK


def train(cfg: Config) -> dict[str, Any]:
    """Train (and evaluate on the test split) as ``cfg`` says; returns a summary dict.

    Raises the USER_ERRORS types (config, data, output folder, checkpoint) before the first step.
    """
    try:
        device = resolve_device(cfg.train.device)
    except ValueError as err:
        raise ConfigError(f"train.device: {err}") from None
    info = distributed.setup(device)
    try:
        run = build_run(cfg, info)
        run.board.text("config", "```\n" + to_yaml(cfg) + "\n```", run.state.step)
        train_epochs(run)
        summary = summarize(run)
        distributed.barrier()
        if info.is_main and cfg.eval.enabled:
            summary["test"] = run_test_evaluation(run)
        run.board.close()
        return summary
    finally:
        distributed.cleanup()


def train_epochs(run: Run) -> None:
    """The epoch loop: train, validate, checkpoint; until the epochs, steps or time run out,
    or validation stops improving."""
    cfg, state = run.cfg, run.state
    run.started = run.clock()
    if state.epoch > 0 or state.batches_done > 0:
        log.info("resuming at epoch %d, step %d", state.epoch + 1, state.step)
    while state.epoch < cfg.train.epochs:
        if run.out_of_steps() or run.out_of_time():
            break
        epoch = state.epoch
        result = train_one_epoch(run)
        run.images_trained += result.images
        run.train_seconds += result.seconds
        # Decided once, so that the epoch which ends the run is the one validated last and
        # best.pt always holds validated weights.
        last = (
            not result.finished
            or state.epoch >= cfg.train.epochs
            or run.out_of_steps()
            or run.out_of_time()
        )
        val, improved = None, False
        if last or (epoch + 1) % cfg.train.val_every == 0:
            recompute_batchnorm(run, epoch)
            val = evaluate(run)
            improved = record(run, val, epoch)
        save_checkpoints(run, best=improved)
        log_epoch(run, epoch, result, val, improved)
        if last:
            if state.epoch < cfg.train.epochs:
                reason = "max_steps reached" if run.out_of_steps() else "time budget spent"
                log.info("stopping: %s", reason)
            break
        if cfg.train.patience is not None and state.bad_epochs >= cfg.train.patience:
            log.info("early stop: no val mIoU gain for %d epochs", state.bad_epochs)
            break
    run.board.flush()


# --- one epoch ---------------------------------------------------------------------------------


@dataclass
class EpochResult:
    finished: bool  # the epoch ran to its end (no step or time limit hit)
    images: int  # training images seen, all ranks together
    seconds: float
    loss: float  # mean total loss over the epoch's batches


def train_one_epoch(run: Run) -> EpochResult:
    """Train the rest of the current epoch (all of it unless a limit is reached)."""
    cfg, state = run.cfg, run.state
    accumulate = cfg.train.accumulate
    run.loaders.sampler.set_epoch(state.epoch)
    run.loaders.sampler.set_start(state.batches_done * cfg.train.batch_size)
    run.model.train()
    run.optimizer.zero_grad(set_to_none=True)
    total_batches = state.batches_done + len(run.loaders.train)
    meter = EpochMeter(run, total_batches)
    step_start = run.clock()
    finished = True
    for i, (images, masks) in enumerate(run.loaders.train):
        sync = (i + 1) % accumulate == 0
        meter.add(forward_backward(run, images, masks, sync=sync), images.shape[0])
        if not sync:
            continue
        lr = optimizer_step(run)
        if run.threads is not None:
            now = run.clock()
            run.threads.observe(now - step_start)
            step_start = now
        meter.stepped(lr)
        if run.out_of_steps() or run.out_of_time():
            finished = state.batches_done >= total_batches - (total_batches % accumulate)
            break
        every = cfg.train.checkpoint_every
        if every and state.step % every == 0 and state.batches_done < total_batches:
            save_checkpoints(run, best=False)
    meter.close()
    if finished:
        state.epoch += 1
        state.batches_done = 0
    return meter.result(finished)


def forward_backward(
    run: Run, images: torch.Tensor, masks: torch.Tensor, *, sync: bool
) -> dict[str, torch.Tensor]:
    """Forward under autocast, loss, backward of the loss's share of the step; returns the
    loss parts (on the device).

    ``images``: (N,B,H,W) band values (uint8 RGB, or the bands' dtype), ``masks``: (N,H,W)
    class ids. ``sync``: this micro-batch ends
    an optimiser step, so DDP all-reduces its gradients (once per step, not per micro-batch).
    """
    device = run.info.device
    target = masks.to(device, non_blocking=True).long()
    x = normalize(images.to(device, non_blocking=True), run.normalization)
    layout = torch.channels_last if run.cfg.train.channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=layout)
    no_sync = (
        run.train_model.no_sync()
        if not sync and isinstance(run.train_model, DistributedDataParallel)
        else contextlib.nullcontext()
    )
    with no_sync:
        dtype = run.autocast_dtype
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            outputs = run.train_model(x)
        loss, parts = run.criterion(outputs, target)
        run.scaler.scale(loss / run.cfg.train.accumulate).backward()
    return parts


def optimizer_step(run: Run) -> float:
    """One optimiser step at the schedule's rate, gradients clipped first; the EMA follows.
    Returns the rate."""
    cfg, state = run.cfg, run.state
    lr = run.schedule.apply(run.elapsed())
    if cfg.train.grad_clip is not None:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.train.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.schedule.step()
    state.step += 1
    state.batches_done += cfg.train.accumulate
    if run.ema is not None:
        run.ema.update(run.model, state.step)
    return lr


class EpochMeter:
    """An epoch's running numbers: the progress display, loss sums over the log window,
    images seen and the epoch's mean loss. Losses are read back from the device (which waits
    for it) only when something is shown."""

    def __init__(self, run: Run, total_batches: int) -> None:
        self.run = run
        self.total_batches = total_batches
        self.progress = Progress(
            total_batches,
            desc=f"epoch {run.state.epoch + 1}/{run.cfg.train.epochs}",
            mode=run.cfg.log.progress if run.info.is_main else "off",
            initial=run.state.batches_done,
        )
        self.start = time.perf_counter()
        self.images = 0
        self.loss = torch.zeros((), device=run.info.device)
        self._reset_window()

    def _reset_window(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.seen, self.window_images, self.window_start = 0, 0, time.perf_counter()

    def add(self, parts: dict[str, torch.Tensor], batch_size: int) -> None:
        for k, v in parts.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.seen += 1
        self.window_images += batch_size * self.run.info.world_size
        self.images += batch_size * self.run.info.world_size
        self.loss += parts["total"]

    def stepped(self, lr: float) -> None:
        """After an optimiser step: advance the progress; log the window when it is due."""
        run, state = self.run, self.run.state
        due = state.step % run.cfg.train.log_every == 0 or state.batches_done >= self.total_batches
        values = None
        if due or self.progress.mode == "bar":
            values = {k: float(v) / self.seen for k, v in self.sums.items()}
            rate = self.window_images / max(time.perf_counter() - self.window_start, 1e-9)
            values.update({"lr": lr, "img/s": rate})
        self.progress.update(run.cfg.train.accumulate, values)
        if due and values is not None:
            run.board.scalars(
                {f"train/{k}": v for k, v in values.items() if k not in ("lr", "img/s")}
                | {"train/lr": lr, "train/images_per_s": values["img/s"]},
                state.step,
            )
            self._reset_window()

    def close(self) -> None:
        self.progress.close()

    def result(self, finished: bool) -> EpochResult:
        batches = max(1, self.images // (self.run.cfg.train.batch_size * self.run.info.world_size))
        return EpochResult(
            finished=finished,
            images=self.images,
            seconds=time.perf_counter() - self.start,
            loss=float(self.loss) / batches,
        )


# --- validation --------------------------------------------------------------------------------


def recompute_batchnorm(run: Run, epoch: int) -> None:
    """Precise BN (:mod:`trainer.batchnorm`): the evaluated weights' BatchNorm statistics
    recomputed over ``train.precise_bn_batches`` batches of ``epoch``'s training crops, the
    crops those weights were trained on, so that validation and every checkpoint see them."""
    limit = run.cfg.train.precise_bn_batches
    if not limit:
        return
    device = run.info.device
    layout = torch.channels_last if run.cfg.train.channels_last else torch.contiguous_format
    # The epoch's order from its first sample; train_one_epoch sets both again before training.
    run.loaders.sampler.set_epoch(epoch)
    run.loaders.sampler.set_start(0)

    def inputs() -> Iterator[torch.Tensor]:
        for images, _ in run.loaders.train:
            x = normalize(images.to(device, non_blocking=True), run.normalization)
            yield x.contiguous(memory_format=layout)

    start = time.perf_counter()
    used = recompute_statistics(
        run.eval_model,
        inputs(),
        limit=limit,
        seed=run.cfg.train.seed + epoch,
        autocast=run.autocast_dtype,
    )
    log.info(
        "BatchNorm statistics recomputed over %d batch(es) of epoch %d's crops in %.1f s",
        used, epoch + 1, time.perf_counter() - start,
    )  # fmt: skip


@torch.inference_mode()
def evaluate(run: Run) -> dict[str, Any] | None:
    """Score this rank's share of the validation set; matrices are summed over ranks."""
    # Replicas share parameters but not BatchNorm statistics; align them first.
    distributed.average_buffers(run.model)
    if run.ema is not None:
        distributed.average_buffers(run.ema.module)
    if run.loaders.val is None:
        return None
    lm, device = run.label_map, run.info.device
    run.eval_model.eval()
    matrix = ConfusionMatrix(lm.num_classes, lm.ignore_index)
    loss_sum, loss_count, grid = 0.0, 0, []
    start = time.perf_counter()
    for batch in run.loaders.val:
        for images, masks in iterate_batches(batch):
            pred, loss = predict_batch(run, images, masks)
            if loss is not None:
                loss_sum += loss * images.shape[0]
                loss_count += images.shape[0]
            matrix.update(pred, masks)
            if run.info.is_main:
                take_samples(grid, images, masks, pred, run.cfg.log.image_samples, run.bands)
    run.model.train()
    total = distributed.all_reduce_sum(matrix.matrix, device)
    sums = distributed.all_reduce_sum(
        torch.tensor([loss_sum, loss_count], dtype=torch.float64).numpy(), device
    )
    result = scores(total, lm.names)
    result["loss"] = float(sums[0] / sums[1]) if sums[1] > 0 else None
    result["seconds"] = time.perf_counter() - start
    result["grid"] = grid
    return result


def predict_batch(
    run: Run, images: torch.Tensor, masks: torch.Tensor
) -> tuple[torch.Tensor, float | None]:
    """Predicted ids (N,H,W) uint8 on the CPU, and the mean loss where it is computed.

    The service's path (``shared.pipeline``): images up to ``eval.tile`` go through the model
    in one batch (whose logits give the loss); larger ones are tiled and blended. A multi-band
    model reads float32 band values, as the service hands them over.
    """
    if not run.bands.reads_pictures():
        images = images.float()
    result = run.predictor.predict_batch(images)
    pred = torch.from_numpy(result.masks)
    if result.logits is None:
        return pred, None
    loss, _ = run.criterion(result.logits, masks.to(result.logits.device).long())
    return pred, float(loss)


def take_samples(
    grid: list,
    images: torch.Tensor,
    masks: torch.Tensor,
    pred: torch.Tensor,
    limit: int,
    bands: BandSpec | None = None,
) -> None:
    """Add (image, truth, prediction) arrays to ``grid`` until it holds ``limit``; images of
    other bands than 8-bit RGB as an RGB preview (:func:`trainer.data.preview_rgb`)."""
    for img, truth, p in zip(images, masks, pred, strict=True):
        if len(grid) >= limit:
            return
        hwc = img.permute(1, 2, 0).numpy()
        if bands is not None and not bands.reads_pictures():
            hwc = preview_rgb(hwc, bands.names)
        grid.append((hwc, truth.numpy(), p.numpy()))


def record(run: Run, val: dict[str, Any] | None, epoch: int) -> bool:
    """Log validation; update best and early-stopping counters. True if this is the best."""
    state = run.state
    if val is None:
        # No validation split: the latest weights are the best we know of.
        return True
    grid = val.pop("grid")
    state.last_val = val
    run.board.scalars(metric_scalars("val", val) | {"val/loss": val.get("loss")}, state.step)
    if grid:
        run.board.image("val/input_truth_prediction", overlay_grid(grid, run.label_map), state.step)
    miou = val["miou"]
    if run.cfg.train.best_by == "last_epoch":
        state.best_miou, state.best_epoch = miou, epoch + 1
        return True
    if miou is not None and (
        state.best_miou is None or miou > state.best_miou + run.cfg.train.min_delta
    ):
        state.best_miou, state.best_epoch, state.bad_epochs = miou, epoch + 1, 0
        return True
    state.bad_epochs += 1
    return False


def log_epoch(
    run: Run, epoch: int, result: EpochResult, val: dict[str, Any] | None, improved: bool
) -> None:
    rate = result.images / max(result.seconds, 1e-9)
    run.board.scalars(
        {"train/epoch_loss": result.loss, "train/epoch_images_per_s": rate}, run.state.step
    )
    trained = (
        f"epoch {epoch + 1}/{run.cfg.train.epochs}: train loss {result.loss:.4f}, "
        f"{rate:.1f} img/s, {result.seconds:.0f}s"
    )
    if val is None:
        log.info("%s", trained)
        return
    ious = " ".join(
        f"{c['name']} {c['iou'] if c['iou'] is not None else float('nan'):.4f}"
        for c in val["per_class"]
    )
    log.info(
        "%s | val %.1fs: %s mIoU %.4f%s",
        trained,
        val["seconds"],
        ious,
        val["miou"] or 0.0,
        " (best)" if improved else "",
    )


# --- after training ----------------------------------------------------------------------------


def summarize(run: Run) -> dict[str, Any]:
    return {
        "run_dir": str(run.run_dir),
        "epochs": run.state.epoch,
        "steps": run.state.step,
        "train_minutes": round(run.elapsed() / 60.0, 2),
        "train_images_per_s": round(run.images_trained / max(run.train_seconds, 1e-9), 2),
        "best_miou": run.state.best_miou,
        "best_epoch": run.state.best_epoch,
    }


def run_test_evaluation(run: Run) -> dict[str, Any]:
    """Score the run's best (or last) checkpoint on the test split; print and save the table."""
    cfg, run_dir = run.cfg, run.run_dir
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
            precision=run.precision,
            tile=cfg.eval.tile,
            overlap=cfg.eval.overlap,
            tile_batch=cfg.eval.tile_batch,
            flips=cfg.eval.flips,
        ),
        boundary_width=cfg.eval.boundary_width,
        on_bad_file=cfg.data.on_bad_file,
    )
    path = run_dir / f"{cfg.eval.split}_metrics.json"
    write_json(result, path)
    run.board.scalars(metric_scalars(cfg.eval.split, result), run.state.step)
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


def test_summary(test: dict[str, Any] | None) -> str:
    """``"; test IoU ocean 0.970, land 0.951, lake 0.352 (mIoU 0.758)"``, or "" untested."""
    if not test:
        return ""
    ious = ", ".join(
        f"{c['name']} {'-' if c['iou'] is None else format(c['iou'], '.3f')}"
        for c in test["per_class"]
    )
    miou = "-" if test["miou"] is None else f"{test['miou']:.3f}"
    return f"; test IoU {ious} (mIoU {miou})"


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


if __name__ == "__main__":
    sys.exit(main())
