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


def cpu_bf16_is_fast() -> bool:
    """Whether this CPU has a bf16 matrix unit (AMX-BF16), where bf16 runs faster than fp32.

    AVX512-BF16 alone (its dot-product instruction, no matrix unit) is not enough: on such a
    CPU (Xeon without AMX exposed), the quick model trained at 10.1 images/s in bf16 against
    13.1 in fp32, and served a 512 px batch of 4 in 0.37 s against 0.28 s (benchmarks/RESULTS.md).
    """
    return "amx_bf16" in cpu_flags()


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
