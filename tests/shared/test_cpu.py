from __future__ import annotations

from pathlib import Path

import pytest

import shared.cpu as cpu


def fake_cpuinfo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, flags: str) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n\n")
    real_path = Path

    def path(name: str) -> Path:
        return info if name == "/proc/cpuinfo" else real_path(name)

    monkeypatch.setattr(cpu, "Path", path)


def test_flags_come_from_proc_cpuinfo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_cpuinfo(monkeypatch, tmp_path, "fpu sse avx2 avx512f")
    assert cpu.cpu_flags() == frozenset({"fpu", "sse", "avx2", "avx512f"})
    assert cpu.has_int8_matmul() is False and cpu.cpu_bf16_is_fast() is False


@pytest.mark.parametrize("flag", ["avx512_vnni", "avx_vnni", "amx_int8"])
def test_int8_units(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, flag: str) -> None:
    fake_cpuinfo(monkeypatch, tmp_path, f"avx2 {flag}")
    assert cpu.has_int8_matmul() is True and cpu.cpu_bf16_is_fast() is False


def test_bf16_is_fast_only_with_a_matrix_unit(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake_cpuinfo(monkeypatch, tmp_path, "avx512f amx_bf16")
    assert cpu.cpu_bf16_is_fast() is True and cpu.has_int8_matmul() is False
    # The dot-product instruction alone runs bf16 slower than fp32 (measured).
    fake_cpuinfo(monkeypatch, tmp_path, "avx512f avx512_bf16")
    assert cpu.cpu_bf16_is_fast() is False


def test_model_name_comes_from_proc_cpuinfo(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake_cpuinfo(monkeypatch, tmp_path, "avx2")
    assert cpu.cpu_model() == "test"


def test_no_cpuinfo_names_the_platform_processor(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(cpu, "Path", lambda name: tmp_path / "missing")
    monkeypatch.setattr(cpu.platform, "processor", lambda: "x86_64")
    assert cpu.cpu_model() == "x86_64"


def test_no_cpuinfo_means_no_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(cpu, "Path", lambda name: tmp_path / "missing")
    assert cpu.cpu_flags() == frozenset() and cpu.cpu_bf16_is_fast() is False
