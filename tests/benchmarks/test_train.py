"""Smoke test of ``python -m benchmarks.train --quick`` on a tiny dataset and model: it runs
both loops and writes the JSON fields. Nothing here is timed."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from benchmarks import train
from tests.trainer.conftest import make_dataset
from trainer.config import load_config

REPO = Path(__file__).resolve().parents[2]


def test_quick_train_benchmark_writes_its_fields(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", n_train=10, size=64)
    out = tmp_path / "train.json"
    overrides = [
        f"data.root={data}",
        "data.image_size=32",
        "data.num_workers=0",
        "data.oversample={}",
        "train.batch_size=2",
        "train.device=cpu",
        "train.threads=1",
        "train.precision=fp32",
    ]
    args = ["--quick", "--steps", "2", "--warmup", "1", "--json", str(out), *overrides]
    threads = torch.get_num_threads()
    try:
        assert train.main(args) == 0
    finally:
        torch.set_num_threads(threads)  # train.threads=1 is process-wide
    result = json.loads(out.read_text())
    for loop in ("trainer", "plain"):
        assert result[loop]["steps"] == 2 and result[loop]["images"] == 4
        assert result[loop]["images_per_s"] > 0
        assert 0.0 <= result[loop]["data_wait_share"] <= 1.0
    assert result["trainer_over_plain"] > 0
    quick = load_config(REPO / "trainer/configs/quickstart.yaml", [])
    assert result["backbone"] == quick.model.backbone and result["batch_size"] == 2
    assert "machine" in result and "targets" in result
    # The trainer's run folder was a temporary one: no handler may still write to it, or the
    # next log line anywhere in this process fails on the deleted file.
    leftover = [
        h.baseFilename
        for h in logging.getLogger().handlers
        if isinstance(h, logging.FileHandler) and h.baseFilename.endswith("train.log")
    ]
    assert leftover == []
