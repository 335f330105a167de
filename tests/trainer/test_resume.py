"""Resuming a run from ``last.pt``: it continues where the interrupted run stopped, and ends
bit for bit where a straight run ends, with the quick recipe's features on.

The features that draw random numbers or read the clock are all on: weighted oversampling,
random crops and flips, an EMA of the weights and its recomputed BatchNorm statistics (a pass
over the epoch's crops with dropout on), bf16 autocast, a time budget that both decays
the learning rate and ends the run, and the thread tuner. Time is a :func:`step_clock`, so the
budget and the tuner see the same times in every run.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from shared.checkpoint import load_checkpoint
from tests.trainer.conftest import make_dataset, tiny_overrides, train_in_process
from trainer.config import load_config
from trainer.fit import main

REPO = Path(__file__).resolve().parents[2]

SECONDS_PER_STEP = 3.0
# 9 training tiles, batch 2: 4 steps per epoch, 16 planned; the 30 s budget ends the run after
# step 10, and the learning rate follows the budget (time is further along than the steps).
QUICK_RECIPE = {
    "data__oversample": "{lake: 4}",
    "data__oversample_min_pixels": 10,
    "augment__crop": "random",
    "augment__rotate90": 0.5,
    "augment__affine": 0.3,  # not in the quick recipe; one more stream of random numbers
    "model__bn_momentum": 0.1,
    "train__epochs": 4,
    "train__max_steps": None,
    "train__max_minutes": 0.5,
    "train__ema_decay": 0.9,
    "train__precise_bn_batches": 2,
    "train__precision": "bf16",
    "train__threads": None,
    "train__adapt_threads": True,
    "train__optimizer": "adamw",
    "train__weight_decay": 0.0001,
    "train__warmup_steps": 2,
    "train__grad_clip": 1.0,
    "train__class_weights": "{lake: 3}",
    "train__min_lr": 0.00001,
    "eval__enabled": False,
}
STRAIGHT_STEPS = 10
PLANNED_STEPS = 16  # 4 epochs x 4 steps: the learning rate's plan in the straight run


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # train.threads is null, so the tuner weighs 1 thread against all CPUs; torch itself runs
    # on one (see train_in_process), the same in every run of this module.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One uninterrupted run of the recipe: its data, final checkpoint and learning rates."""
    tmp = tmp_path_factory.mktemp("straight")
    data = make_dataset(tmp / "data")
    trainer, applied = train_in_process(
        load_config(None, tiny_overrides(data, tmp / "runs", **QUICK_RECIPE)), SECONDS_PER_STEP
    )
    assert trainer.state.step == STRAIGHT_STEPS  # the budget, not the planned 16 steps, ended it
    return {
        "data": data,
        "last": load_checkpoint(tmp / "runs" / "run" / "last.pt"),
        "applied": applied,
    }


@pytest.fixture(scope="module")
def resumed_runs(straight: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``resumed_runs[stop_at]``: a run stopped after ``stop_at`` steps, then resumed from its
    ``last.pt`` by a new trainer: its interrupted checkpoint, the (step, learning rate) pairs the
    resumed trainer applied, and the final checkpoint."""
    runs: dict[int, dict] = {}
    for stop_at in (6, 8):  # mid-epoch (epoch 2, batch 2) and an epoch boundary
        out = tmp_path_factory.mktemp(f"stop{stop_at}")
        overrides = tiny_overrides(straight["data"], out, **QUICK_RECIPE)
        stopped = load_config(None, [*overrides, f"train.max_steps={stop_at}"])
        train_in_process(stopped, SECONDS_PER_STEP, planned_steps=PLANNED_STEPS)
        last = out / "run" / "last.pt"
        interrupted = load_checkpoint(last)
        resume = load_config(None, [*overrides, f"train.resume={last}"])
        _, applied = train_in_process(resume, SECONDS_PER_STEP)
        runs[stop_at] = {
            "interrupted": interrupted,
            "applied": applied,
            "last": load_checkpoint(last),
        }
    return runs


def tensors_that_differ(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("stop_at", [6, 8], ids=["mid-epoch", "epoch-boundary"])
def test_resumed_run_ends_exactly_where_a_straight_run_ends(
    straight: dict, resumed_runs: dict, stop_at: int
) -> None:
    resumed = resumed_runs[stop_at]["last"]
    expected = straight["last"]
    # The average that is validated and served, the trained weights, and the optimiser's moments.
    assert not tensors_that_differ(expected["state_dict"], resumed["state_dict"])
    assert not tensors_that_differ(
        expected["training_state"]["model"], resumed["training_state"]["model"]
    )
    moments_a = expected["training_state"]["optimizer"]["state"]
    moments_b = resumed["training_state"]["optimizer"]["state"]
    for index in moments_a:
        assert not tensors_that_differ(moments_a[index], moments_b[index]), index
    for key in ("epoch", "step", "batches_done", "elapsed_s", "scheduler", "threads"):
        assert resumed["training_state"][key] == expected["training_state"][key], key


@pytest.mark.parametrize("stop_at", [6, 8], ids=["mid-epoch", "epoch-boundary"])
def test_a_resumed_run_continues_rather_than_restarts(
    straight: dict, resumed_runs: dict, stop_at: int
) -> None:
    # A restart from scratch would also end on the straight run's weights (training is
    # deterministic), so what tells the two apart is where the second process begins.
    run = resumed_runs[stop_at]
    applied, resumed = run["applied"], run["last"]
    state = run["interrupted"]["training_state"]
    assert (state["epoch"], state["batches_done"], state["step"]) == divmod(stop_at, 4) + (stop_at,)
    assert state["elapsed_s"] == stop_at * SECONDS_PER_STEP
    steps = [step for step, _, _ in applied]
    assert steps == list(range(stop_at, STRAIGHT_STEPS)), (
        f"the resumed process trained steps {steps}, not the remaining "
        f"{stop_at}..{STRAIGHT_STEPS - 1}"
    )
    # The learning rate and thread count at each resumed step are the straight run's at that
    # step: the schedule's step count, the time spent before the interruption and the thread
    # tuner's place in its probe were restored.
    assert applied == straight["applied"][stop_at:]
    assert resumed["training_state"]["step"] == STRAIGHT_STEPS


def test_killed_run_resumes_from_its_last_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A real SIGKILL between checkpoints: the resumed process picks up at the saved step."""
    data = make_dataset(tmp_path / "data", n_train=12)
    out = tmp_path / "runs"
    common = {"train__epochs": 4, "train__max_steps": None, "eval__enabled": False}
    args = tiny_overrides(data, out, train__checkpoint_every=1, **common)
    # The child stops itself with SIGKILL right after it has saved step 5: no clean-up runs.
    kill_after_save = (
        "import os, signal, sys\n"
        "import trainer.fit as fit\n"
        "save = fit.save_checkpoints\n"
        "def save_then_die(run, *, best):\n"
        "    save(run, best=best)\n"
        "    if run.state.step == 5:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "fit.save_checkpoints = save_then_die\n"
        "sys.exit(fit.main(sys.argv[1:]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", kill_after_save, *args],
        cwd=REPO,
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    last = out / "run" / "last.pt"
    killed = load_checkpoint(last)["training_state"]
    assert (killed["epoch"], killed["batches_done"], killed["step"]) == (1, 1, 5)

    assert main([*args, f"train.resume={last}"]) == 0, capsys.readouterr().err
    log = (out / "run" / "train.log").read_text()
    assert "resuming at epoch 2, step 5" in log
    done = load_checkpoint(last)["training_state"]
    assert (done["epoch"], done["step"], done["batches_done"]) == (4, 16, 0)
