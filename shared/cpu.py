"""What this CPU is and computes in hardware, from its model name and feature flags in
``/proc/cpuinfo``."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where it does not exist)."""
    return frozenset((_cpuinfo_field("flags") or "").split())


def cpu_model() -> str:
    """The CPU's model name, as ``/proc/cpuinfo`` or else the platform names it."""
    return _cpuinfo_field("model name") or platform.processor() or "unknown CPU"


def has_int8_matmul() -> bool:
    """True on CPUs with integer dot-product units (AVX-512 VNNI, AVX-VNNI or AMX-INT8), where
    int8 convolutions run several times faster than float32 ones."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX-BF16).

    Without it, oneDNN emulates bf16 and autocast is slower than fp32.
    """
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def _cpuinfo_field(name: str) -> str | None:
    """The value of the first ``name`` line of ``/proc/cpuinfo`` (None where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name):
            return line.split(":", 1)[1].strip()
    return None
