from __future__ import annotations

import pytest
import torch

import shared.precision as precision
from shared.precision import autocast_dtype, resolve_precision

CPU = torch.device("cpu")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_on_the_cpu_is_bf16_only_where_the_cpu_multiplies_it(
    monkeypatch: pytest.MonkeyPatch, training: bool, native: bool, expected: str
) -> None:
    monkeypatch.setattr(precision, "cpu_bf16_is_fast", lambda: native)
    monkeypatch.setattr(precision, "has_int8_matmul", lambda: True)
    assert resolve_precision("auto", CPU, training=training) == expected


def test_training_never_picks_or_accepts_int8(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "has_int8_matmul", lambda: True)
    monkeypatch.setattr(precision, "cpu_bf16_is_fast", lambda: False)
    assert resolve_precision("auto", CPU, training=True, optimize=True) == "fp32"
    with pytest.raises(ValueError, match="allowed: auto, fp32, bf16, fp16$"):
        resolve_precision("int8", CPU, training=True)


def test_fp16_needs_cuda_for_training_and_inference() -> None:
    with pytest.raises(ValueError, match="fp16 training needs CUDA"):
        resolve_precision("fp16", CPU, training=True)
    with pytest.raises(ValueError, match="fp16 inference needs CUDA"):
        resolve_precision("fp16", CPU)


def test_autocast_dtypes() -> None:
    assert autocast_dtype("bf16") is torch.bfloat16 and autocast_dtype("fp16") is torch.float16
    assert autocast_dtype("fp32") is None and autocast_dtype("int8") is None
