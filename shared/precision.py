"""Numeric precisions: their names, their autocast dtypes, and which one a device runs.

``fp32`` runs everywhere; ``bf16`` on GPUs that have it and on CPUs (fast only with AVX512-BF16
or AMX); ``fp16`` on CUDA only; ``int8`` (inference only) on the CPU.
"""

from __future__ import annotations

import torch

from shared.cpu import cpu_has_native_bf16

# What autocast or a weight cast can run.
FLOAT_PRECISIONS = ("fp32", "bf16", "fp16")
# What training accepts: "auto" picks per device.
TRAINING_PRECISIONS = ("auto", *FLOAT_PRECISIONS)
# What inference accepts: "auto" picks per device, "int8" quantises (CPU).
INFERENCE_PRECISIONS = ("auto", *FLOAT_PRECISIONS, "int8")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``precision``; None for fp32 and int8 (no autocast)."""
    return AUTOCAST_DTYPES.get(precision)


def training_precision(name: str, device: torch.device) -> str:
    """``auto`` -> bf16 where the device computes it natively, fp16 (+GradScaler) on CUDA without
    bf16, fp32 otherwise.

    Raises:
        ValueError: fp16 off CUDA (slow, and no gain over bf16), or bf16 on a GPU without it.
    """
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if name not in FLOAT_PRECISIONS:
        raise ValueError(
            f"unknown precision {name!r}; allowed: auto, {', '.join(FLOAT_PRECISIONS)}"
        )
    if name == "fp16" and device.type != "cuda":
        raise ValueError("fp16 needs CUDA; use bf16 or fp32 on the CPU")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU has no bf16; use fp16 or auto")
    return name
