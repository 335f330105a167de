from __future__ import annotations

import argparse
import os
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch

import shared.checkpoint as ckpt_mod
import shared.files
from shared.bands import Band, BandSpec
from shared.checkpoint import (
    SCHEMA_VERSION,
    CheckpointError,
    bands_from_checkpoint,
    build_checkpoint,
    load_checkpoint,
    logit_offsets_from_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from shared.labels import LabelMap
from shared.model import BACKBONE_ALIASES, build_model
from shared.preprocess import Normalization

MBV3 = "mobilenet_v3_large"


def _payload(label_map: LabelMap, **kwargs: object) -> dict:
    torch.manual_seed(0)
    model = build_model(MBV3, num_classes=label_map.num_classes, aux_loss=True)
    defaults: dict = {
        "backbone": MBV3,
        "aux_loss": True,
        "label_map": label_map,
        "normalization": Normalization(mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6)),
        "config": {"lr": 0.01, "data": {"root": Path("data/bluemarble")}, "crop": (256, 256)},
    }
    defaults.update(kwargs)
    return build_checkpoint(model, **defaults)


def _two_class_map() -> LabelMap:
    return LabelMap.from_dict(
        {
            "classes": [
                {"id": 0, "name": "a", "color": [0, 0, 1]},
                {"id": 1, "name": "b", "color": [0, 0, 2]},
            ]
        }
    )


def test_round_trip_preserves_everything(tmp_path: Path, label_map: LabelMap) -> None:
    optimizer_model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(optimizer_model.parameters(), lr=0.01)
    optimizer_model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    payload = _payload(
        label_map,
        metrics={"miou": np.float64(0.5), "per_class": [None, 0.25]},
        training_state={
            "optimizer": optimizer.state_dict(),
            "epoch": 3,
            "torch_rng": torch.get_rng_state(),
            "np_rng": np.random.default_rng(0).bit_generator.state,
        },
    )
    path = tmp_path / "run" / "best.pt"  # the folder does not exist yet

    save_checkpoint(payload, path)
    # Anyone can read it with the safe loader alone.
    raw = torch.load(path, weights_only=True)
    loaded = load_checkpoint(path)

    assert raw["schema_version"] == loaded["schema_version"] == SCHEMA_VERSION
    assert loaded["arch"] == {
        "name": "deeplabv3",
        "backbone": MBV3,
        "num_classes": 3,
        "aux_loss": True,
        "in_channels": 3,
    }
    assert loaded["label_map"] == label_map.to_dict()
    assert loaded["normalization"] == {
        "mean": [0.1, 0.2, 0.3],
        "std": [0.4, 0.5, 0.6],
        "scale": 255.0,
    }
    assert loaded["bands"] == BandSpec.rgb().to_dict()
    assert loaded["config"] == {"lr": 0.01, "data": {"root": "data/bluemarble"}, "crop": (256, 256)}
    assert loaded["metrics"] == {"miou": 0.5, "per_class": [None, 0.25]}
    assert type(loaded["metrics"]["miou"]) is float
    assert set(loaded["versions"]) == {"torch", "torchvision", "satseg"}
    assert datetime.fromisoformat(loaded["created_at"]).utcoffset().total_seconds() == 0
    for key, value in payload["state_dict"].items():
        assert torch.equal(loaded["state_dict"][key], value), key
    assert loaded["training_state"]["epoch"] == 3
    restored = torch.optim.AdamW(optimizer_model.parameters(), lr=0.01)
    restored.load_state_dict(loaded["training_state"]["optimizer"])
    assert torch.equal(
        loaded["training_state"]["torch_rng"], payload["training_state"]["torch_rng"]
    )
    assert not [p for p in path.parent.iterdir() if p.name != "best.pt"]


def test_model_from_checkpoint_drops_aux_and_matches_outputs(
    tmp_path: Path, label_map: LabelMap
) -> None:
    torch.manual_seed(0)
    model = build_model(MBV3, num_classes=3, aux_loss=True).eval()
    payload = build_checkpoint(
        model,
        backbone=MBV3,
        aux_loss=True,
        label_map=label_map,
        normalization=Normalization(),
        config={},
    )
    save_checkpoint(payload, tmp_path / "m.pt")

    rebuilt, labels, norm = model_from_checkpoint(load_checkpoint(tmp_path / "m.pt"))

    assert rebuilt.aux_classifier is None
    assert not rebuilt.training
    assert labels == label_map
    assert norm == Normalization()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(rebuilt(x)["out"], model(x)["out"])


def test_unsafe_pickle_is_refused_and_never_runs(tmp_path: Path, label_map: LabelMap) -> None:
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self) -> tuple:
            return (Path.touch, (marker,))

    payload = _payload(label_map)
    payload["config"] = {"evil": Payload()}
    path = tmp_path / "evil.pt"
    torch.save(payload, path)  # bypasses build_checkpoint's checks, as an attacker would

    with pytest.raises(CheckpointError, match=r"evil\.pt.*unsafe pickle"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("keep", [0, 100, 0.5])
def test_truncated_file_is_reported(tmp_path: Path, label_map: LabelMap, keep: float) -> None:
    path = tmp_path / "best.pt"
    save_checkpoint(_payload(label_map), path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(CheckpointError, match=r"best\.pt.*(empty|truncated|corrupt)"):
        load_checkpoint(path)


def test_text_and_missing_files(tmp_path: Path) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("this is not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.pt"):
        load_checkpoint(text)
    with pytest.raises(CheckpointError, match=r"absent\.pt not found"):
        load_checkpoint(tmp_path / "absent.pt")
    with pytest.raises(CheckpointError, match="not a file"):
        load_checkpoint(tmp_path)


def test_bare_state_dict_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "weights.pth"
    torch.save(build_model(MBV3, num_classes=3).state_dict(), path)
    with pytest.raises(CheckpointError, match="no schema_version"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p.update(schema_version=2), "schema_version 2.*newer"),
        (lambda p: p.pop("label_map"), r"lacks keys \['label_map'\]"),
        (lambda p: p["arch"].update(backbone="vgg"), "unknown backbone 'vgg'"),
        (lambda p: p["arch"].update(num_classes=2), "arch has 2 classes but the label map has 3"),
        (lambda p: p["label_map"].update(ignore_index=1), "invalid label_map"),
        (lambda p: p["normalization"].update(std=[0, 1, 1]), "invalid normalization"),
        (lambda p: p["state_dict"].pop("classifier.4.weight"), "no classifier.4.weight"),
    ],
)
def test_invalid_contents_name_the_file_and_reason(
    tmp_path: Path, label_map: LabelMap, edit, message: str
) -> None:
    payload = _payload(label_map)
    edit(payload)
    path = tmp_path / "bad.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=rf"bad\.pt.*{message}"):
        load_checkpoint(path)


def test_head_that_does_not_match_the_label_map(tmp_path: Path, label_map: LabelMap) -> None:
    # A 2-class head saved with the 3-class label map (e.g. a hand-edited checkpoint).
    two_class = _payload(_two_class_map())
    payload = _payload(label_map)
    payload["state_dict"] = two_class["state_dict"]
    path = tmp_path / "mismatch.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"mismatch\.pt.*head has 2 outputs.*3 classes"):
        load_checkpoint(path)


def test_build_refuses_head_label_mismatch(label_map: LabelMap) -> None:
    model = build_model(MBV3, num_classes=2)
    with pytest.raises(ValueError, match="2 outputs but the label map has 3"):
        build_checkpoint(
            model,
            backbone=MBV3,
            aux_loss=False,
            label_map=label_map,
            normalization=Normalization(),
            config={},
        )


def test_logit_offsets_round_trip_and_are_absent_unless_given(
    tmp_path: Path, label_map: LabelMap
) -> None:
    save_checkpoint(_payload(label_map, logit_offsets=(0, 0, -1.5)), tmp_path / "adjusted.pt")
    loaded = load_checkpoint(tmp_path / "adjusted.pt")
    assert logit_offsets_from_checkpoint(loaded) == [0.0, 0.0, -1.5]
    assert "logit_offsets" not in _payload(label_map)
    assert logit_offsets_from_checkpoint(_payload(label_map)) is None


@pytest.mark.parametrize(
    ("offsets", "message"),
    [
        ([0.0, -1.0], "one number per class \\(3\\), got 2"),
        ([0.0, float("inf"), 0.0], "finite"),
        ([0.0, True, 0.0], "numbers"),
        ("0 0 0", "a list of 3 numbers"),
    ],
)
def test_build_refuses_logit_offsets_that_are_not_a_number_per_class(
    label_map: LabelMap, offsets: object, message: str
) -> None:
    with pytest.raises(ValueError, match=f"logit_offsets must .*{message}"):
        _payload(label_map, logit_offsets=offsets)


def test_state_dict_that_does_not_fit_the_architecture(label_map: LabelMap) -> None:
    payload = _payload(label_map)
    payload["state_dict"]["classifier.1.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="does not fit deeplabv3/mobilenet_v3_large"):
        model_from_checkpoint(payload)


@pytest.mark.parametrize(
    "config",
    [{"args": argparse.Namespace(lr=0.1)}, {"mean": np.zeros(3)}],
)
def test_build_refuses_values_weights_only_cannot_read(label_map: LabelMap, config: dict) -> None:
    with pytest.raises(TypeError, match=r"config\['(args|mean)'\]"):
        _payload(label_map, config=config)


def test_failed_write_keeps_old_file_and_leaves_no_tmp(
    tmp_path: Path, label_map: LabelMap, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.pt"
    path.write_bytes(b"previous checkpoint")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shared.files.os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(_payload(label_map), path)
    assert path.read_bytes() == b"previous checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_interrupted_serialisation_keeps_old_file(
    tmp_path: Path, label_map: LabelMap, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.pt"
    path.write_bytes(b"previous checkpoint")
    real_save = torch.save

    def save_then_interrupt(obj: object, f) -> None:
        real_save(obj, f)  # half the work done, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod.torch, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_payload(label_map), path)
    assert path.read_bytes() == b"previous checkpoint"
    assert os.listdir(tmp_path) == ["last.pt"]


def test_save_replaces_existing_file(tmp_path: Path, label_map: LabelMap) -> None:
    path = tmp_path / "last.pt"
    first = _payload(label_map, metrics={"epoch": 1})
    second = _payload(label_map, metrics={"epoch": 2})
    save_checkpoint(first, path)
    save_checkpoint(second, path)
    assert load_checkpoint(path)["metrics"] == {"epoch": 2}
    assert os.listdir(tmp_path) == ["last.pt"]


_KILLED_WRITER = """
import sys, time
import torch
from shared import checkpoint

def slow_save(payload, f):
    f.write(b"PK\\x03\\x04 half a checkpoint")
    f.flush()
    print("writing", flush=True)
    time.sleep(60)

checkpoint.torch.save = slow_save
checkpoint.save_checkpoint({"x": torch.zeros(1)}, sys.argv[1])
"""


def test_writer_killed_mid_write_keeps_old_file_and_next_write_cleans_up(
    tmp_path: Path, label_map: LabelMap
) -> None:
    import signal
    import subprocess
    import sys

    path = tmp_path / "last.pt"
    save_checkpoint(_payload(label_map), path)
    before = path.read_bytes()

    writer = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "writing"
        writer.send_signal(signal.SIGKILL)
    finally:
        writer.wait(timeout=30)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.pt"]
    assert len(leftovers) == 1 and leftovers[0].endswith(".tmp")
    assert path.read_bytes() == before
    assert load_checkpoint(path)["schema_version"] == SCHEMA_VERSION

    save_checkpoint(_payload(label_map, metrics={"miou": 0.5}), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert load_checkpoint(path)["metrics"] == {"miou": 0.5}


# --------------------------------------------------------------------------- input bands

RELIEF = BandSpec(
    tuple(Band(n, i) for i, n in enumerate(("red", "green", "blue", "relief"), start=1)), "uint8"
)
RELIEF_NORM = Normalization(mean=(90.0, 95.0, 80.0, 40.0), std=(50.0, 45.0, 40.0, 60.0), scale=1.0)


def test_multiband_checkpoint_records_and_rebuilds_its_bands(
    tmp_path: Path, label_map: LabelMap
) -> None:
    torch.manual_seed(0)
    model = build_model(MBV3, num_classes=3, in_channels=4).eval()
    payload = build_checkpoint(
        model,
        backbone=MBV3,
        aux_loss=False,
        label_map=label_map,
        normalization=RELIEF_NORM,
        config={},
        bands=RELIEF,
    )
    save_checkpoint(payload, tmp_path / "relief.pt")
    loaded = load_checkpoint(tmp_path / "relief.pt")
    assert loaded["arch"]["in_channels"] == 4
    assert bands_from_checkpoint(loaded) == RELIEF
    rebuilt, _, norm = model_from_checkpoint(loaded)
    assert norm == RELIEF_NORM
    x = torch.randn(1, 4, 64, 64)
    with torch.inference_mode():
        assert torch.equal(rebuilt(x)["out"], model(x)["out"])


def test_checkpoint_from_before_bands_loads_as_rgb(tmp_path: Path, label_map: LabelMap) -> None:
    payload = _payload(label_map)
    # What every checkpoint written before bands existed looks like.
    del payload["bands"], payload["arch"]["in_channels"]
    payload["normalization"] = {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}
    torch.save(payload, tmp_path / "old.pt")
    loaded = load_checkpoint(tmp_path / "old.pt")
    assert bands_from_checkpoint(loaded) == BandSpec.rgb()
    model, _, norm = model_from_checkpoint(loaded)
    assert norm.scale == 255.0 and norm.channels == 3
    with torch.inference_mode():
        assert model(torch.zeros(1, 3, 64, 64))["out"].shape == (1, 3, 64, 64)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p["arch"].update(in_channels=0), "arch in_channels 0 is invalid"),
        (lambda p: p["arch"].update(in_channels=4), "normalization has 3 bands but the model"),
        (lambda p: p["bands"]["bands"].pop(), "bands lists 2 \\(red, green\\) but the model"),
        (lambda p: p["bands"].update(dtype="int64"), "invalid bands: band dtype 'int64'"),
    ],
)
def test_invalid_band_records_are_named(
    tmp_path: Path, label_map: LabelMap, edit, message: str
) -> None:
    payload = _payload(label_map)
    edit(payload)
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=rf"bad\.pt.*{message}"):
        load_checkpoint(tmp_path / "bad.pt")


def test_build_refuses_bands_or_normalization_of_another_count(label_map: LabelMap) -> None:
    model = build_model(MBV3, num_classes=3, in_channels=4)
    with pytest.raises(ValueError, match="model reads 4 bands but the band spec lists none"):
        build_checkpoint(
            model,
            backbone=MBV3,
            aux_loss=False,
            label_map=label_map,
            normalization=RELIEF_NORM,
            config={},
        )
    with pytest.raises(ValueError, match="model reads 4 bands but the normalization has 3"):
        build_checkpoint(
            model,
            backbone=MBV3,
            aux_loss=False,
            label_map=label_map,
            normalization=Normalization(),
            config={},
            bands=RELIEF,
        )


@pytest.mark.parametrize("old", sorted(BACKBONE_ALIASES))
def test_a_checkpoint_saved_under_an_old_backbone_id_loads_and_predicts_the_same(
    tmp_path: Path, label_map: LabelMap, old: str
) -> None:
    torch.manual_seed(0)
    model = build_model(old, num_classes=label_map.num_classes).eval()
    payload = build_checkpoint(
        model,
        backbone=old,
        aux_loss=False,
        label_map=label_map,
        normalization=Normalization(mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6)),
        config={},
    )
    assert payload["arch"]["backbone"] == BACKBONE_ALIASES[old]  # new checkpoints: new names
    payload["arch"]["backbone"] = old  # what the code before the rename wrote
    save_checkpoint(payload, tmp_path / "old.pt")
    loaded = load_checkpoint(tmp_path / "old.pt")
    assert loaded["arch"]["backbone"] == old  # the checkpoint is read, not rewritten
    rebuilt, _, _ = model_from_checkpoint(loaded)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 96)
    with torch.inference_mode():
        expected, got = model(x)["out"], rebuilt(x)["out"]
    assert torch.equal(got, expected)
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_a_checkpoint_of_an_unknown_backbone_is_refused_naming_the_current_ones(
    tmp_path: Path, label_map: LabelMap
) -> None:
    payload = _payload(label_map)
    payload["arch"]["backbone"] = "mobilenet_v3_large_fine3"
    save_checkpoint(payload, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="unknown backbone 'mobilenet_v3_large_fine3'"):
        load_checkpoint(tmp_path / "bad.pt")
