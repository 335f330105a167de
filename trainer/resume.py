"""The run's checkpoints: ``last.pt`` holds everything a killed run needs to continue exactly
(weights, optimiser, schedule, scaler, counters, time spent, RNG and thread-tuner states),
``best.pt`` the weights and metadata the service loads."""

from __future__ import annotations

import logging
from typing import Any

from shared.checkpoint import build_checkpoint, save_checkpoint
from trainer import distributed
from trainer.config import ConfigError
from trainer.reproducibility import capture_rng, restore_rng, seed_everything
from trainer.run import Run, RunState

log = logging.getLogger("trainer")


def training_state(run: Run) -> dict[str, Any]:
    """What ``last.pt`` adds to the weights. Collective: every rank must call it."""
    s = run.state
    return {
        "epoch": s.epoch,
        "batches_done": s.batches_done,
        "step": s.step,
        "elapsed_s": run.elapsed(),
        "best_miou": s.best_miou,
        "best_epoch": s.best_epoch,
        "bad_epochs": s.bad_epochs,
        "world_size": run.info.world_size,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.schedule.state_dict(),
        "scaler": run.scaler.state_dict(),
        # With EMA the checkpoint's state_dict is the average; the trained weights go here.
        "model": (
            {k: v.detach().cpu() for k, v in run.model.state_dict().items()}
            if run.ema is not None
            else None
        ),
        # Every rank's generators and thread tuner, in rank order.
        "rng": distributed.all_gather_object(capture_rng()),
        "threads": distributed.all_gather_object(
            run.threads.state_dict() if run.threads is not None else None
        ),
    }


def save_checkpoints(run: Run, *, best: bool) -> None:
    """``last.pt`` (with everything needed to resume) and, if ``best``, ``best.pt``.

    Called on every rank (gathering RNG states is collective); only rank 0 writes.
    """
    state = training_state(run)
    if not run.info.is_main:
        return
    metrics = {
        "epoch": run.state.epoch,
        "step": run.state.step,
        "val": run.state.last_val,
        "best_miou": run.state.best_miou,
        "best_epoch": run.state.best_epoch,
    }
    common = {
        "backbone": run.cfg.model.backbone,
        "aux_loss": run.cfg.model.aux_loss,
        "label_map": run.label_map,
        "normalization": run.normalization,
        "config": run.cfg.model_dump(mode="json"),  # built-in types: weights_only-safe
        "metrics": metrics,
        "bands": run.bands,
        "gsd_m": run.gsd_m,
        "logit_offsets": run.predictor.logit_offsets,
    }
    save_checkpoint(
        build_checkpoint(run.eval_model, training_state=state, **common),
        run.run_dir / "last.pt",
    )
    if best:
        # The service needs weights and metadata only; no optimiser state.
        save_checkpoint(build_checkpoint(run.eval_model, **common), run.run_dir / "best.pt")


def restore(run: Run, ckpt: dict[str, Any]) -> None:
    """Load weights, optimiser, schedule, scaler, counters, RNG and tuner from a ``last.pt``."""
    ts = ckpt.get("training_state")
    if not isinstance(ts, dict):
        raise ConfigError(
            f"train.resume: {run.cfg.train.resume} holds no training state "
            "(best.pt is weights only; resume from last.pt)"
        )
    _load_weights_and_optimizer(run, ckpt, ts)
    run.schedule.load_state_dict(ts["scheduler"])
    run.scaler.load_state_dict(ts["scaler"])
    run.state = RunState(
        epoch=int(ts["epoch"]),
        batches_done=int(ts["batches_done"]),
        step=int(ts["step"]),
        elapsed_s=float(ts["elapsed_s"]),
        best_miou=ts.get("best_miou"),
        best_epoch=ts.get("best_epoch"),
        bad_epochs=int(ts.get("bad_epochs", 0)),
        last_val=dict(ckpt.get("metrics", {}).get("val") or {}),
    )
    _restore_rng_and_threads(run, ts)


def _load_weights_and_optimizer(run: Run, ckpt: dict[str, Any], ts: dict[str, Any]) -> None:
    try:
        if run.ema is not None:
            if ts.get("model") is None:
                raise ValueError("the checkpoint was trained without train.ema_decay")
            run.model.load_state_dict(ts["model"], strict=True)
            run.ema.module.load_state_dict(ckpt["state_dict"], strict=True)
        else:
            if ts.get("model") is not None:
                raise ValueError("the checkpoint was trained with train.ema_decay")
            run.model.load_state_dict(ckpt["state_dict"], strict=True)
        run.optimizer.load_state_dict(ts["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise ConfigError(
            f"train.resume: {run.cfg.train.resume} does not fit this model/optimiser "
            f"({' '.join(str(err).split())[:300]})"
        ) from None


def _restore_rng_and_threads(run: Run, ts: dict[str, Any]) -> None:
    rng = ts.get("rng") or []
    tuners = ts.get("threads") or []
    rank = run.info.rank
    if len(rng) == run.info.world_size:
        restore_rng(rng[rank])
        if run.threads is not None and len(tuners) == len(rng) and tuners[rank]:
            run.threads.load_state_dict(tuners[rank])
    elif rng:
        log.warning(
            "checkpoint was written by %d process(es), this run has %d: RNG streams reseeded",
            len(rng),
            run.info.world_size,
        )
        seed_everything(run.cfg.train.seed + rank + 1000 * run.state.epoch)
