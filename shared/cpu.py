"""What this CPU computes in hardware, from the feature flags of ``/proc/cpuinfo``."""

from __future__ import annotations

from pathlib import Path


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where it does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def has_int8_matmul() -> bool:
    """True on CPUs with integer dot-product units (AVX-512 VNNI, AVX-VNNI or AMX-INT8), where
    int8 convolutions run several times faster than float32 ones."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX-BF16).

    Without it, oneDNN emulates bf16 and autocast is slower than fp32.
    """
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
