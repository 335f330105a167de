"""The runtimes a user would pick instead of the engine, on the same weights and inputs.

The checkpoint's DeepLabV3 (main head only, as the engine runs it) is exported to ONNX once and
run by ONNX Runtime (fp32) and OpenVINO (fp32; its default precision, which is bf16 on CPUs with
AMX or AVX512-BF16; and int8 quantised by NNCF on the engine's own calibration crops). Each is a
``Run``: ``(N, 3, H, W)`` uint8 -> ``(N, H, W)`` class ids, normalisation included, like the
baseline and the engine. They are optional (``pip install -e ".[bench]"``); a runtime that is not
installed, or fails to load the model, is reported with the reason instead of a number.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared.model import MainLogits
from shared.preprocess import Normalization, normalize

Run = Callable[[torch.Tensor], torch.Tensor]
# Each runtime's modules (import name -> pip name, for the message when one is missing).
_ONNX = {"onnx": "onnx", "onnxscript": "onnxscript"}
REQUIRED_BY_RUNTIME: dict[str, dict[str, str]] = {
    "onnx runtime fp32": {**_ONNX, "onnxruntime": "onnxruntime"},
    "openvino fp32": {**_ONNX, "openvino": "openvino"},
    "openvino default": {**_ONNX, "openvino": "openvino"},
    "openvino int8 (nncf)": {**_ONNX, "openvino": "openvino", "nncf": "nncf"},
}


class PeerUnavailable(RuntimeError):
    """The runtime is not installed here, or could not build the model."""


def missing(runtime: str) -> str | None:
    """Why ``runtime`` cannot run here (the packages to install), or None."""
    absent = [pip for module, pip in REQUIRED_BY_RUNTIME[runtime].items() if not _installed(module)]
    if not absent:
        return None
    return f'not installed: {", ".join(absent)} (pip install -e ".[bench]")'


def export_onnx(model: nn.Module, path: Path, size: int) -> Path:
    """Write ``model`` (fp32 eval DeepLabV3) as ONNX with dynamic batch, height and width."""
    if not _installed("onnx"):
        raise PeerUnavailable('not installed: onnx (pip install -e ".[bench]")')
    net = MainLogits(model).eval()
    aux = getattr(model, "aux_classifier", None)
    model.aux_classifier = None
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                net,
                (torch.zeros(1, 3, size, size),),
                str(path),
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={
                    "input": {0: "n", 2: "h", 3: "w"},
                    "logits": {0: "n", 2: "h", 3: "w"},
                },
                opset_version=17,
                dynamo=False,
            )
    finally:
        model.aux_classifier = aux
    return path


def onnxruntime_run(onnx_path: Path, norm: Normalization, threads: int) -> Run:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def run(batch: torch.Tensor) -> torch.Tensor:
        x = normalize(batch, norm).numpy()
        (logits,) = session.run(None, {"input": x})
        return torch.from_numpy(logits.argmax(axis=1))

    return run


def openvino_model(onnx_path: Path):  # -> openvino.Model
    import openvino as ov

    return ov.Core().read_model(str(onnx_path))


def openvino_run(model, norm: Normalization, threads: int, precision: str | None) -> Run:
    """``precision`` "f32" pins fp32; None keeps OpenVINO's default (bf16 where the CPU has it)."""
    import openvino as ov
    import openvino.properties as props
    import openvino.properties.hint as hints

    config: dict[str, object] = {props.inference_num_threads: threads}
    if precision is not None:
        config[hints.inference_precision] = getattr(ov.Type, precision)
    compiled = ov.Core().compile_model(model, "CPU", config)
    request = compiled.create_infer_request()

    def run(batch: torch.Tensor) -> torch.Tensor:
        x = normalize(batch, norm).numpy()
        logits = request.infer({0: x})[compiled.output(0)]
        return torch.from_numpy(np.asarray(logits).argmax(axis=1))

    return run


def nncf_int8_model(model, calibration: Sequence[torch.Tensor]):  # -> openvino.Model
    """OpenVINO model quantised by NNCF's post-training quantisation on ``calibration``
    (normalised float32 batches: the engine's own calibration crops)."""
    import nncf

    items = [b[i : i + 1].numpy() for b in calibration for i in range(b.shape[0])]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return nncf.quantize(model, nncf.Dataset(items), subset_size=len(items))


def peer_runs(
    model: nn.Module,
    norm: Normalization,
    calibration: Sequence[torch.Tensor],
    workdir: Path,
    *,
    size: int,
    threads: int,
) -> dict[str, Run | str]:
    """Each peer runtime's ``Run``, or the reason it is unavailable."""
    runs: dict[str, Run | str] = {}
    onnx_path: Path | None = None
    try:
        onnx_path = export_onnx(model, workdir / "model.onnx", size)
    except Exception as exc:  # noqa: BLE001 - the export's own error is the reason to report
        if isinstance(exc, PeerUnavailable):  # each runtime names every package it lacks
            return {name: missing(name) or str(exc) for name in REQUIRED_BY_RUNTIME}
        return dict.fromkeys(REQUIRED_BY_RUNTIME, f"ONNX export failed: {exc!r}")
    builders: dict[str, Callable[[], Run]] = {
        "onnx runtime fp32": lambda: onnxruntime_run(onnx_path, norm, threads),
        "openvino fp32": lambda: openvino_run(openvino_model(onnx_path), norm, threads, "f32"),
        "openvino default": lambda: openvino_run(openvino_model(onnx_path), norm, threads, None),
        "openvino int8 (nncf)": lambda: openvino_run(
            nncf_int8_model(openvino_model(onnx_path), calibration), norm, threads, None
        ),
    }
    for name, build in builders.items():
        reason = missing(name)
        if reason is not None:
            runs[name] = reason
            continue
        try:
            runs[name] = build()
        except Exception as exc:  # noqa: BLE001 - reported beside the others, not fatal
            runs[name] = f"failed: {type(exc).__name__}: {exc}"
    return runs


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
