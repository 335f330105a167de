"""Fixtures shared by every test package, and a guard that keeps tests off the network."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

_LOCAL_NAMES = {"localhost", "testserver", "", None}


def _is_local(host: object) -> bool:
    if host in _LOCAL_NAMES or host == socket.gethostname():
        return True
    try:
        address = ipaddress.ip_address(str(host).split("%")[0])
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refuse connections and name lookups beyond this machine, so an accidental download
    fails at once (as it would offline) instead of passing on a connected laptop."""
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def refuse(address: object) -> None:
        raise OSError(f"tests must not use the network (tried to reach {address!r})")

    def connect(self: socket.socket, address: object) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0]):  # type: ignore[index]
            refuse(address)
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: object) -> int:
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0]):  # type: ignore[index]
            refuse(address)
        return real_connect_ex(self, address)

    def getaddrinfo(host: object, *args: object, **kwargs: object) -> list:
        if not _is_local(host):
            raise socket.gaierror(socket.EAI_NONAME, f"tests must not resolve {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture(autouse=True)
def _no_satseg_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clear ``SATSEG_*`` variables, so a developer's shell cannot change what a test sees;
    a test that needs one sets it."""
    for name in [n for n in os.environ if n.startswith("SATSEG_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded numpy generator: the same "random" data on every run."""
    return np.random.default_rng(0)


@pytest.fixture
def label_map():  # -> shared.labels.LabelMap
    """The project's label mapping: ocean 0, land 1, lake 2; ignore_index 255."""
    from shared.labels import LabelMap

    return LabelMap.load()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a random-initialised 3-class DeepLabV3-MobileNetV3 checkpoint (written once per
    session through shared.checkpoint, as the trainer writes them). Treat it as read-only."""
    from benchmarks.common import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny.pt")


@pytest.fixture(scope="session")
def varied_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with a head whose answer varies across an image.

    A random-initialised DeepLabV3 predicts one class everywhere (its head bias dominates);
    with a zero bias and unit-variance head weights all three classes appear in the test
    scenes, so the mask, RLE and score tests compare something.
    """
    from shared.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint)
    weight = ckpt["state_dict"]["classifier.4.weight"]
    generator = torch.Generator().manual_seed(0)
    ckpt["state_dict"]["classifier.4.weight"] = torch.randn(weight.shape, generator=generator)
    ckpt["state_dict"]["classifier.4.bias"].zero_()
    path = tmp_path_factory.mktemp("varied") / "varied.pt"
    save_checkpoint(ckpt, path)
    return path


@pytest.fixture(scope="session")
def calibrated_checkpoint(
    varied_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The varied checkpoint with BatchNorm statistics measured on images, as training leaves them.

    A random-initialised MobileNetV3 with default BatchNorm statistics shrinks its activations
    layer by layer: the varied model's logits are about 1e-9, below float16's smallest number,
    so a half-precision forward returns zeros. Re-estimating the statistics on random images
    (a cumulative average over a few batches) keeps every layer at unit scale, as in a trained
    model, so half-precision paths can be compared with float32 on it.
    """
    from shared.checkpoint import load_checkpoint, save_checkpoint
    from shared.model import build_model
    from tests.toy_models import measure_batchnorm

    ckpt = load_checkpoint(varied_checkpoint)
    model = build_model("mobilenet_v3_large", num_classes=3, weights="none", aux_loss=False)
    model.load_state_dict(ckpt["state_dict"])
    generator = torch.Generator().manual_seed(0)
    measure_batchnorm(model, (torch.randn((4, 3, 64, 64), generator=generator) for _ in range(4)))
    ckpt["state_dict"] = model.state_dict()
    path = tmp_path_factory.mktemp("calibrated") / "calibrated.pt"
    save_checkpoint(ckpt, path)
    return path
