"""End-to-end runs of ``python -m trainer.fit`` on a tiny synthetic dataset (CPU, seconds each)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.checkpoint import load_checkpoint, model_from_checkpoint
from shared.inference import InferenceOptions, Predictor
from tests.trainer.conftest import synthetic_pair, tiny_overrides, train_in_process
from trainer.config import load_config
from trainer.fit import main

REPO = Path(__file__).resolve().parents[2]


def fit(capsys: pytest.CaptureFixture, data: Path, out: Path, **extra: object) -> tuple[int, str]:
    rc = main(tiny_overrides(data, out, **extra))
    captured = capsys.readouterr()
    return rc, captured.err


def test_bn_momentum_applies_to_every_batchnorm() -> None:
    from trainer.build import make_model

    cfg = load_config(None, ["model.backbone=mobilenet_v3_large", "model.bn_momentum=0.1"])
    model = make_model(cfg, 3, resuming=False)
    momenta = {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert momenta == {0.1}
    default = make_model(
        load_config(None, ["model.backbone=mobilenet_v3_large"]), 3, resuming=False
    )
    assert {m.momentum for m in default.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {
        0.01,
        0.1,
    }  # torchvision's own: 0.01 in the MobileNetV3 backbone, 0.1 in the DeepLab head


def test_tiny_fit_writes_what_the_service_loads(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "runs"
    rc, err = fit(capsys, dataset, out, model__aux_loss=True, log__tensorboard=True)
    assert rc == 0, err
    run = out / "run"
    for name in ("last.pt", "best.pt", "config.yaml", "train.log", "test_metrics.json"):
        assert (run / name).is_file(), name

    # Plain weights_only loading works, and the service's builder accepts it.
    raw = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    assert raw["arch"] == {
        "name": "deeplabv3",
        "backbone": "mobilenet_v3_large",
        "num_classes": 3,
        "aux_loss": True,
        "in_channels": 3,
    }
    assert "training_state" not in raw  # best.pt carries weights and metadata only
    model, label_map, _ = model_from_checkpoint(load_checkpoint(run / "best.pt"))
    assert model.aux_classifier is None and label_map.names == ["ocean", "land", "lake"]
    predictor = Predictor.from_checkpoint(
        run / "best.pt", InferenceOptions(device="cpu", tile=64, overlap=16)
    )
    image, _ = synthetic_pair(np.random.default_rng(0), 48)
    assert predictor.segment(image).shape == (48, 48)

    last = load_checkpoint(run / "last.pt")
    state = last["training_state"]
    assert state["step"] == 2 and state["epoch"] == 0 and state["batches_done"] == 2
    assert {"optimizer", "scheduler", "scaler", "rng"} <= set(state)
    assert isinstance(state["rng"][0]["numpy"]["keys"], torch.Tensor)
    assert last["metrics"]["val"]["miou"] is not None

    # The closing line names the steps and speed beside the test scores (make demo's summary).
    log_lines = (run / "train.log").read_text().splitlines()
    done = next(line for line in log_lines if " done: " in line)
    assert " 2 steps, " in done and " img/s" in done
    scores = json.loads((run / "test_metrics.json").read_text())
    ocean = next(c["iou"] for c in scores["per_class"] if c["name"] == "ocean")
    assert f"test IoU ocean {ocean:.3f}, land " in done and f"(mIoU {scores['miou']:.3f})" in done

    # The resolved config is written beside the run and is the one in the checkpoint.
    resolved = load_config(run / "config.yaml")
    assert resolved.model.aux_loss is True and resolved.train.max_steps == 2
    assert last["config"]["model"]["aux_loss"] is True

    result = json.loads((run / "test_metrics.json").read_text())
    assert result["split"] == "test" and result["images"] == 2
    assert {"miou", "pixel_accuracy", "mean_boundary_iou"} <= set(result)
    assert {"iou", "dice", "precision", "recall", "boundary_iou"} <= set(result["per_class"][0])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    tags = events.Tags()
    for tag in ("train/total", "train/lr", "train/images_per_s", "val/miou", "val/iou/land"):
        assert tag in tags["scalars"], tag
    assert "val/input_truth_prediction" in tags["images"]


def test_logit_adjustment_is_recorded_and_validation_and_test_predict_with_it(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # Ocean weighted 10,000x: its logit loses log(1e4) = 9.2 wherever the run predicts, more
    # than a two-step model's logits differ, so no pixel may be called ocean, in validation
    # (which picks best.pt) or in the test evaluation.
    out = tmp_path / "runs"
    rc, err = fit(
        capsys, dataset, out, train__class_weights="{ocean: 10000}", train__logit_adjustment=True
    )
    assert rc == 0, err
    run = out / "run"
    for name in ("best.pt", "last.pt"):
        offsets = load_checkpoint(run / name)["logit_offsets"]
        assert offsets == pytest.approx([-math.log(1e4), 0.0, 0.0]), name
    val = load_checkpoint(run / "best.pt")["metrics"]["val"]
    test = json.loads((run / "test_metrics.json").read_text())
    for scores in (val, test):
        ocean = next(c for c in scores["per_class"] if c["name"] == "ocean")
        assert ocean["support_pixels"] > 0 and ocean["predicted_pixels"] == 0

    rc, err = fit(capsys, dataset, tmp_path / "plain", train__class_weights="{ocean: 10000}")
    assert rc == 0, err
    assert "logit_offsets" not in load_checkpoint(tmp_path / "plain" / "run" / "best.pt")


def test_corrupt_image_stops_before_training_and_names_it(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bad = dataset / "TAIN_VAL_SET" / "IMAGES" / "tile004.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rc, err = fit(capsys, dataset, tmp_path / "runs")
    assert rc == 2
    assert "tile004.png" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "run" / "last.pt").exists()


def test_bad_files_are_skipped_when_configured(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (dataset / "TAIN_VAL_SET" / "IMAGES" / "tile004.png").write_bytes(b"garbage")
    rc, err = fit(capsys, dataset, tmp_path / "runs", data__on_bad_file="skip")
    assert rc == 0, err
    log = (tmp_path / "runs" / "run" / "train.log").read_text()
    assert "skipping" in log and "tile004.png" in log


def test_unwritable_out_dir_fails_at_start_up(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    # The data folder does not even exist: the output check comes first, before any data work.
    rc, err = fit(capsys, tmp_path / "no-data", blocker / "runs")
    assert rc == 2
    assert "out_dir" in err and str(blocker) in err and "Traceback" not in err


def test_read_only_out_dir_fails_at_start_up(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trainer.outputs

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    # chmod cannot stop root, so the refusal is simulated where the probe file is created.
    monkeypatch.setattr(trainer.outputs.tempfile, "mkstemp", refuse)
    rc, err = fit(capsys, tmp_path / "no-data", tmp_path / "runs")
    assert rc == 2 and "not writable" in err and "Permission denied" in err


def test_full_disk_fails_before_training(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import trainer.outputs

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(
        trainer.outputs.shutil, "disk_usage", lambda p: usage._replace(free=1024 * 1024)
    )
    rc, err = fit(capsys, dataset, tmp_path / "runs")
    assert rc == 2 and "1 MiB free" in err
    assert not (tmp_path / "runs" / "run" / "last.pt").exists()


def test_an_existing_run_is_not_overwritten(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert fit(capsys, dataset, tmp_path / "runs", eval__enabled=False)[0] == 0
    rc, err = fit(capsys, dataset, tmp_path / "runs", eval__enabled=False)
    assert rc == 2 and "already holds" in err and "train.resume" in err
    assert fit(capsys, dataset, tmp_path / "runs", eval__enabled=False, overwrite=True)[0] == 0


def test_resuming_from_best_is_refused(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert fit(capsys, dataset, tmp_path / "runs", eval__enabled=False)[0] == 0
    best = tmp_path / "runs" / "run" / "best.pt"
    rc, err = fit(capsys, dataset, tmp_path / "runs", eval__enabled=False, train__resume=best)
    assert rc == 2 and "no training state" in err


def test_time_budget_ends_the_run_and_decays_the_learning_rate(
    dataset: Path, tmp_path: Path
) -> None:
    # Time is a clock of 10 s per optimiser step, so the 30 s budget ends the run after exactly
    # three steps on any machine. 50 epochs plan 200 steps; the learning rate follows the budget.
    overrides = tiny_overrides(
        dataset, tmp_path / "runs",
        train__epochs=50, train__max_steps=None, train__max_minutes=0.5, train__lr=0.01,
        train__min_lr=0.001, train__schedule="poly", train__poly_power=0.9, eval__enabled=False,
    )  # fmt: skip
    trainer, applied = train_in_process(load_config(None, overrides), seconds_per_step=10.0)
    assert trainer.state.step == 3
    assert [step for step, _, _ in applied] == [0, 1, 2]
    for step, lr, _ in applied:
        assert lr == pytest.approx(0.001 + (0.01 - 0.001) * (1 - step / 3) ** 0.9), step
    state = load_checkpoint(tmp_path / "runs" / "run" / "last.pt")["training_state"]
    assert state["step"] == 3 and state["elapsed_s"] == 30.0


def test_early_stopping_and_accumulation(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # min_delta 1.0: no epoch can beat the first, so patience 1 stops after epoch 2.
    rc, err = fit(
        capsys, dataset, tmp_path / "runs",
        train__epochs=10, train__max_steps=None, train__patience=1, train__min_delta=1.0,
        train__accumulate=2, eval__enabled=False,
    )  # fmt: skip
    assert rc == 0, err
    state = load_checkpoint(tmp_path / "runs" / "run" / "last.pt")["training_state"]
    # 4 batches per epoch, 2 per optimiser step: 2 steps per epoch, 2 epochs.
    assert (state["epoch"], state["step"], state["bad_epochs"]) == (2, 4, 1)


@pytest.mark.parametrize(("best_by", "best_epoch"), [("val_miou", 1), ("last_epoch", 3)])
def test_best_checkpoint_follows_train_best_by(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture, best_by: str, best_epoch: int
) -> None:
    # min_delta 1.0: by validation mIoU no epoch can beat the first; by last epoch, each does.
    rc, err = fit(
        capsys, dataset, tmp_path / "runs",
        train__epochs=3, train__max_steps=None, train__min_delta=1.0, train__best_by=best_by,
        eval__enabled=False,
    )  # fmt: skip
    assert rc == 0, err
    run = tmp_path / "runs" / "run"
    assert load_checkpoint(run / "best.pt")["metrics"]["epoch"] == best_epoch
    assert load_checkpoint(run / "last.pt")["metrics"]["epoch"] == 3
    state = load_checkpoint(run / "last.pt")["training_state"]
    assert state["best_epoch"] == best_epoch


def test_val_every_validates_every_nth_and_the_last_epoch(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # Five epochs, validation every second: epochs 2 and 4, and 5 because the run ends there.
    # Precise BN runs only before a validation; best.pt holds the last validated weights.
    rc, err = fit(
        capsys, dataset, tmp_path / "runs",
        train__epochs=5, train__max_steps=None, train__val_every=2, train__best_by="last_epoch",
        train__ema_decay=0.9, train__precise_bn_batches=1, eval__enabled=False,
    )  # fmt: skip
    assert rc == 0, err
    run = tmp_path / "runs" / "run"
    log = (run / "train.log").read_text()
    lines = [line for line in log.splitlines() if "/5: train loss" in line]
    assert len(lines) == 5
    assert [" | val " in line for line in lines] == [False, True, False, True, True]
    assert log.count("BatchNorm statistics recomputed") == 3
    assert load_checkpoint(run / "best.pt")["metrics"]["epoch"] == 5
    assert load_checkpoint(run / "last.pt")["metrics"]["epoch"] == 5


def test_precise_bn_recomputes_the_saved_statistics_and_leaves_training_alone(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from shared.preprocess import normalize
    from trainer import distributed
    from trainer.batchnorm import recompute_statistics
    from trainer.build import load_data

    runs = {}
    for batches in (None, 2):
        out = tmp_path / f"runs-{batches}"
        extra = {"train__ema_decay": 0.9, "train__precise_bn_batches": batches}
        rc, err = fit(
            capsys, dataset, out, train__epochs=2, train__max_steps=None, eval__enabled=False,
            **extra,
        )  # fmt: skip
        assert rc == 0, err
        runs[batches] = load_checkpoint(out / "run" / "last.pt"), out / "run"
    (plain, _), (precise, run_dir) = runs[None], runs[2]
    assert "BatchNorm statistics recomputed over 2 batch(es)" in (run_dir / "train.log").read_text()

    # Two epochs: the pass after the first did not change the second's training. The same
    # weights, the same average of them; only the average's BatchNorm statistics differ.
    trained = plain["training_state"]["model"]
    assert all(torch.equal(v, precise["training_state"]["model"][k]) for k, v in trained.items())
    statistics = {k for k in plain["state_dict"] if k.endswith(("running_mean", "running_var"))}
    assert statistics
    for key, value in plain["state_dict"].items():
        if key not in statistics and not key.endswith("num_batches_tracked"):
            assert torch.equal(value, precise["state_dict"][key]), key
    changed = [
        k for k in statistics if not torch.equal(plain["state_dict"][k], precise["state_dict"][k])
    ]
    assert changed

    # They are the averaged weights' statistics over the first 2 batches of the last epoch's
    # crops (dropout on, from the seed the run gives that epoch's pass).
    predictor = Predictor.from_checkpoint(runs[None][1] / "last.pt")
    cfg = load_config(run_dir / "config.yaml")
    loaders = load_data(
        cfg, predictor.label_map, distributed.setup(torch.device("cpu")), None,
        predictor.normalization,
    )  # fmt: skip
    loaders.sampler.set_epoch(1)
    inputs = (normalize(images, predictor.normalization) for images, _ in loaders.train)
    recompute_statistics(predictor.model, inputs, limit=2, seed=cfg.train.seed + 1)
    for key in statistics:
        expected = predictor.model.state_dict()[key]
        assert torch.allclose(expected, precise["state_dict"][key], atol=1e-5), key
