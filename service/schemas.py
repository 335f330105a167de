"""Request options and response models; they are what ``/docs`` shows."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field


class SegmentFormat(StrEnum):
    """How ``/segment`` returns the predicted mask."""

    png = "png"
    rle = "rle"
    geotiff = "geotiff"
    probabilities = "probabilities"
    geojson = "geojson"


class EvaluateFormat(StrEnum):
    """Whether ``/evaluate`` also returns the masks it scored."""

    png = "png"
    rle = "rle"


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. `corrupt_image`.")
    message: str = Field(description="What went wrong, for a person.")


class ErrorResponse(BaseModel):
    """The body of every error answer."""

    error: ErrorDetail


class Rle(BaseModel):
    """COCO compressed RLE, column-major; `pycocotools.mask.decode` reads it."""

    size: list[int] = Field(description="[height, width]", min_length=2, max_length=2)
    counts: str = Field(description="COCO compressed run lengths.")


class ClassMask(BaseModel):
    id: int
    name: str
    area: int = Field(description="Pixels of this class in the mask.")
    fraction: float = Field(description="area / (height * width).")
    rle: Rle


class Timing(BaseModel):
    """Milliseconds spent in each step of the request."""

    decode: float = Field(description="Reading the uploaded bytes into pixels.")
    inference: float = Field(description="Waiting for and running the model, tiles blended.")
    encode: float = Field(description="Turning the class-id mask into the answer.")
    total: float


class MaskRle(BaseModel):
    """A class-id mask as one RLE per class, in label order (classes with no pixels too).

    Pixels of no class (``ignore_index``, e.g. nodata) are in no RLE.
    """

    height: int
    width: int
    classes: list[ClassMask]


class SegmentRle(MaskRle):
    """`/segment?format=rle`."""

    timing_ms: Timing
    warnings: list[str] = Field(
        default_factory=list,
        description="Why the answer may be unreliable, e.g. an input at another scale than "
        "the training data (also in the X-SatSeg-Warning header).",
    )
    preview: str | None = Field(
        None,
        description="With `preview=true`: the input as an RGB PNG data URL (for a multi-band "
        "model, the bands named red, green and blue, else its first three), for display.",
    )


class ClassScore(BaseModel):
    id: int
    name: str
    iou: float | None = Field(description="null when absent from truth and prediction.")
    dice: float | None
    precision: float | None = Field(description="null when nothing was predicted as this class.")
    recall: float | None = Field(description="null when the truth has no pixel of this class.")
    support_pixels: int = Field(description="Pixels of this class in the truth.")
    predicted_pixels: int


class Scores(BaseModel):
    pixel_accuracy: float | None = Field(
        description="Correct pixels / labelled pixels; null when every pixel is ignore_index."
    )
    miou: float | None = Field(description="Mean IoU over classes present in truth or prediction.")
    mean_dice: float | None
    per_class: list[ClassScore]
    confusion_matrix: list[list[int]] = Field(
        description="Rows are truth, columns prediction, in class-id order; ignore_index "
        "pixels are left out."
    )


class PairResult(BaseModel):
    index: int = Field(description="Position of the pair in the request, from 0.")
    image: str | None = Field(description="Uploaded file name of the image.")
    mask: str | None = Field(description="Uploaded file name of the mask.")
    height: int
    width: int
    scores: Scores
    prediction: MaskRle | None = Field(
        None, description="The predicted mask as RLE, present when `format=rle`."
    )
    truth: MaskRle | None = Field(
        None,
        description="The ground-truth mask as scored, as RLE, present when `format=rle`; "
        "ignore_index pixels (and nodata pixels of a GeoTIFF image) are in no class.",
    )
    preview: str | None = Field(
        None,
        description="With `format=rle&preview=true`: the image as an RGB PNG data URL, as "
        "`/segment` gives it.",
    )


class EvaluateResponse(BaseModel):
    num_pairs: int
    pairs: list[PairResult]
    aggregate: Scores = Field(description="Scores of the confusion matrix summed over all pairs.")
    timing_ms: Timing
    warnings: list[str] = Field(
        default_factory=list,
        description="Why scores may be unreliable, e.g. an image at another scale than the "
        "training data (also in the X-SatSeg-Warning header).",
    )


class LabelClassInfo(BaseModel):
    id: int
    name: str
    color: list[int] = Field(description="[r, g, b] used in the PNG palette.")


class ArchInfo(BaseModel):
    name: str
    backbone: str
    num_classes: int
    aux_loss: bool


class CheckpointInfo(BaseModel):
    path: str
    sha256: str = Field(
        description="sha256 of the checkpoint file: the model's version, also "
        "sent as the X-Model-Version header of every answer."
    )
    load_seconds: float = Field(description="Time the model took to load and warm up.")
    schema_version: int | None
    created_at: str | None = Field(description="ISO-8601 UTC time the checkpoint was written.")
    metrics: dict[str, Any] = Field(description="Training metrics stored with the checkpoint.")
    config: dict[str, Any] = Field(description="Training configuration stored with it.")
    versions: dict[str, Any]


class ModelInfo(BaseModel):
    arch: ArchInfo
    classes: list[LabelClassInfo]
    ignore_index: int
    normalization: dict[str, Any] = Field(
        description="Per-band `(x / scale - mean) / std`, applied to the bands as read."
    )
    bands: dict[str, Any] = Field(
        description="The bands the model reads, in order (`name`, 1-based source `index`), "
        "their `dtype` and the training data's `nodata` rule."
    )
    gsd_m: float | None = Field(
        None, description="Ground sample distance of the training data in metres per pixel."
    )
    logit_offsets: dict[str, float] | None = Field(
        None,
        description="Added to each class's logit before the class is chosen (the checkpoint's "
        "logit adjustment, minus log of the class weight it was trained with); null: none.",
    )
    checkpoint: CheckpointInfo
    device: str
    precision: str = Field(description="Resolved precision: fp32, bf16, fp16 or int8.")
    precision_reason: str = Field(
        description="Why this precision serves: set explicitly, the hardware, or the int8 "
        "agreement gate's verdict with its measurements."
    )
    int8_agreement: dict[str, Any] | None = Field(
        None,
        description="When int8 was checked: its agreement with float32 on the check crops, "
        "`pixel` (share of pixels with the same class), `class_iou` (per class, IoU of the "
        "pixels each gives it; null where neither does) and `class_pixels` (float32's count).",
    )
    tile: int
    overlap: int
    flips: bool = Field(description="Whether each tile is averaged over its flips (SATSEG_FLIPS).")


class Health(BaseModel):
    status: str = Field("ok", description="Always `ok` while the process serves requests.")


class QueueInfo(BaseModel):
    in_flight: int = Field(description="Requests admitted and not yet answered.")
    capacity: int = Field(description="Most requests admitted at once (SATSEG_MAX_QUEUE).")


class Ready(BaseModel):
    status: str = Field("ready", description="`ready` when the model answers requests.")
    queue: QueueInfo


class ReloadRequest(BaseModel):
    """Body of `POST /admin/reload`; empty or absent: reload SATSEG_CHECKPOINT."""

    checkpoint: str | None = Field(
        None,
        max_length=1024,
        description="A checkpoint file inside SATSEG_CHECKPOINT_DIR, as a path relative to it.",
    )


class ReloadResponse(BaseModel):
    status: str = Field("swapped", description="`swapped`: the new model answers from now on.")
    sha256: str = Field(description="sha256 of the checkpoint now in use.")
    previous_sha256: str | None = Field(description="sha256 of the model it replaced.")
    path: str
    load_seconds: float = Field(description="Time to load and warm up the new model.")
