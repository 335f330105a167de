"""Numeric precisions: their names, their autocast dtypes, and which one a device runs.

``fp32`` runs everywhere; ``bf16`` on GPUs that have it and on CPUs (faster than fp32 only with
a bf16 matrix unit, AMX); ``fp16`` on CUDA only; ``int8`` (inference only) on the CPU.
"""

from __future__ import annotations

import torch

from shared.cpu import cpu_bf16_is_fast, has_int8_matmul

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


def resolve_precision(
    name: str, device: torch.device, *, training: bool = False, optimize: bool = False
) -> str:
    """The precision ``device`` runs ``name`` at; ``auto`` picks the fastest that keeps results.

    ``auto`` on CUDA: bf16 where the GPU has it, else fp16 for training (with a GradScaler) and
    fp32 for inference. On the CPU: int8 for an ``optimize``d inference model where the CPU has
    int8 dot-product units, else bf16 where it has a bf16 matrix unit (AMX), else fp32.

    Raises:
        ValueError: an unknown name (int8 in training), fp16 off CUDA, int8 off the CPU, or bf16
            on a GPU without it.
    """
    allowed = TRAINING_PRECISIONS if training else INFERENCE_PRECISIONS
    if name not in allowed:
        raise ValueError(f"unknown precision {name!r}; allowed: {', '.join(allowed)}")
    if device.type == "cuda":
        if name == "int8":
            raise ValueError("int8 inference runs on the CPU; use bf16 or fp16 on CUDA")
        if name == "bf16" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"bf16 asked for but {torch.cuda.get_device_name(device)} lacks it")
        if name == "auto":
            fallback = "fp16" if training else "fp32"
            return "bf16" if torch.cuda.is_bf16_supported() else fallback
        return name
    if name == "fp16":
        use = "training" if training else "inference"
        raise ValueError(f"fp16 {use} needs CUDA; use bf16 or fp32 on the CPU")
    if name == "auto":
        if optimize and not training and has_int8_matmul():
            return "int8"
        return "bf16" if cpu_bf16_is_fast() else "fp32"
    return name
