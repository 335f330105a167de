"""Checkpoints whose answer is known in advance, to tell one served model from another."""

from __future__ import annotations

from pathlib import Path

import torch

from shared.checkpoint import load_checkpoint, save_checkpoint


def constant_checkpoint(base: Path, class_id: int, path: Path) -> Path:
    """``base`` with a head that predicts ``class_id`` at every pixel: zero weights and a bias
    of 10 for that class (0 for the others), so the logits are constant whatever the input."""
    ckpt = load_checkpoint(base)
    state = ckpt["state_dict"]
    state["classifier.4.weight"] = torch.zeros_like(state["classifier.4.weight"])
    bias = torch.zeros_like(state["classifier.4.bias"])
    bias[class_id] = 10.0
    state["classifier.4.bias"] = bias
    save_checkpoint(ckpt, path)
    return path
