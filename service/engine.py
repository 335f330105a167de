"""The model on its device, shared by all requests: loading, admission, batching and tiling.

Each admitted request runs :func:`shared.pipeline.predict` on its own thread and submits its
tiles to one batcher thread, which runs tiles of equal shape together (up to
``batch_max_tiles`` or ``batch_timeout_ms``); a request past its deadline stops waiting (504) and
its tiles are dropped. ``reload`` warms a new model beside the current one and swaps it in;
requests in flight finish on the model they started with. The data flow and the swap:
docs/inference-path.md, "In the service".
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np
import torch

from service.errors import (
    DeadlineExceededError,
    DeviceOutOfMemoryError,
    MemoryBudgetError,
    NotReadyError,
    OverloadedError,
    ReloadInProgressError,
    ReloadRefusedError,
)
from service.memory import MemoryBudget, default_memory_budget
from service.metrics import ServiceMetrics
from service.settings import Settings
from shared.acceleration import FX_TRACE_LOCK, configure_threads
from shared.checkpoint import CheckpointError, bands_from_checkpoint, gsd_from_checkpoint
from shared.imaging import DecodedSize
from shared.inference import InferenceOptions, Predictor
from shared.pipeline import Prediction, Tiling, predict
from shared.raster import ArrayRaster

log = logging.getLogger("service.engine")

P = ParamSpec("P")
T = TypeVar("T")


class State(StrEnum):
    loading = "loading"
    ready = "ready"
    failed = "failed"
    draining = "draining"
    stopped = "stopped"


@dataclass(frozen=True)
class LoadedModel:
    """A warmed-up model and the checkpoint it came from."""

    predictor: Predictor
    path: Path
    sha256: str  # of the checkpoint file: the model's version in X-Model-Version and /model
    load_seconds: float


@dataclass(frozen=True)
class Ticket:
    """An admitted request: it holds one of ``max_queue`` slots until the answer is built, and
    the model current when it was admitted, which answers all of it."""

    deadline: float  # time.monotonic() value
    model: LoadedModel


@dataclass
class _Job:
    """A batch of tiles from one request, waiting for the batcher."""

    tiles: torch.Tensor  # (n, 3, h, w) uint8 on the device
    deadline: float
    future: Future[torch.Tensor] = field(default_factory=Future)
    predictor: Predictor | None = None  # the request's model; None: the current one

    @property
    def size(self) -> int:
        return int(self.tiles.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tiles.shape[1:])


def is_out_of_memory(exc: BaseException) -> bool:
    """A device allocation failure (CUDA's typed error or an allocator's RuntimeError)."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


class Engine:
    """Owns the :class:`Predictor`, the batcher thread and the thread pools of one app.

    Life cycle: ``start()`` (loading in the background) -> ready, or failed with a reason
    that ``/readyz`` reports; ``begin_drain()`` on shutdown (readiness 503, requests still
    served); ``stop()`` at the end.
    """

    def __init__(
        self,
        settings: Settings,
        load: Callable[[InferenceOptions], Predictor] | None = None,
    ) -> None:
        self.settings = settings
        self.options = InferenceOptions(
            device=settings.device,
            precision=settings.precision,
            tile=settings.tile,
            overlap=settings.overlap,
            tile_batch=settings.batch_max_tiles,
            flips=settings.flips,
            optimize=settings.optimize,
            calibration=str(settings.calibration_dir) if settings.calibration_dir else None,
        )
        self._custom_load = load
        self.memory = MemoryBudget(settings.memory_budget_bytes or default_memory_budget())
        self.metrics = ServiceMetrics()
        self.metrics.watch(
            queue_depth=lambda: self._queue.qsize() + len(self._held),
            admitted=lambda: self._in_flight,
            memory_reserved=lambda: self.memory.reserved,
        )
        self.metrics.memory_budget.set(self.memory.total)
        self.model: LoadedModel | None = None
        self._reloading = threading.Lock()  # one load at a time
        self.state = State.loading
        self.reason = f"loading the model from {settings.checkpoint}"
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._held: deque[_Job] = deque()  # jobs taken from the queue that did not fit a batch
        self._stop = threading.Event()
        self._loader: threading.Thread | None = None
        self._batcher: threading.Thread | None = None
        # Request threads mostly wait on the batcher; admission bounds them to max_queue.
        # The forward's thread count: the setting, else torch's default here (OMP_NUM_THREADS,
        # or the cores), read before any host thread sets its own to one.
        self.torch_threads = settings.torch_threads or torch.get_num_threads()
        # With OpenMP each thread that runs a parallel torch op gets its own team of worker
        # threads. Request threads (blending logits, argmax) and I/O threads would each start
        # one beside the batcher's and take the cores its forward pass is using, so they run
        # their torch work on their own thread; only the batcher (and loading) uses
        # SATSEG_TORCH_THREADS.
        self._request_pool = ThreadPoolExecutor(
            settings.max_queue, "satseg-request", initializer=_host_thread
        )
        self._io_pool = ThreadPoolExecutor(settings.workers, "satseg-io", initializer=_host_thread)

    # ----- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        """Load, warm up and start batching in a background thread; returns at once.

        Calling it again does nothing (one model per engine)."""
        if self._loader is not None:
            return
        self._loader = threading.Thread(target=self._load, name="satseg-loader", daemon=True)
        self._loader.start()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Block until loading has finished (ready or failed); True if it finished."""
        if self._loader is None:
            return False
        self._loader.join(timeout)
        return not self._loader.is_alive()

    @property
    def predictor(self) -> Predictor | None:
        """The current model's predictor (None until one is loaded)."""
        model = self.model
        return model.predictor if model is not None else None

    @property
    def model_version(self) -> str | None:
        """The sha256 of the current checkpoint, or None before one is loaded."""
        model = self.model
        return model.sha256 if model is not None else None

    def _read_model(self, path: Path) -> LoadedModel:
        """Hash, load and warm up the checkpoint at ``path`` (nothing current changes)."""
        start = time.perf_counter()
        configure_threads(self.torch_threads)  # calibration and warm-up run in this thread
        digest = _sha256(path)
        # All of it runs while the current model keeps serving; only the moments the new model
        # is traced by torch.fx pause the batcher (see FX_TRACE_LOCK in _run).
        if self._custom_load is not None:  # a loader given to the constructor
            predictor = self._custom_load(self.options)
        else:
            predictor = Predictor.from_checkpoint(path, self.options)
        predictor.warmup()
        return LoadedModel(predictor, path, digest, time.perf_counter() - start)

    def _load(self) -> None:
        path = self.settings.checkpoint
        try:
            model = self._read_model(path)
        except CheckpointError as exc:
            hint = "" if path.exists() else " Set SATSEG_CHECKPOINT to a trainer checkpoint"
            self._fail(f"checkpoint refused: {exc}{hint}")
            return
        except Exception as exc:  # a bad device/precision setting, a broken model...
            self._fail(f"could not load the model from {path}: {type(exc).__name__}: {exc}")
            return
        with self._lock:
            if self.state is not State.loading:  # stopped while loading
                return
            self._install(model)
        log.info(
            "model ready: %s (sha256 %s) on %s (%s; %s)",
            path,
            model.sha256[:12],
            model.predictor.device,
            model.predictor.precision,
            model.predictor.precision_reason,
        )

    def _install(self, model: LoadedModel) -> None:
        """Make ``model`` the current one (caller holds the lock); start the batcher once."""
        self.model = model
        if self._batcher is None:
            self._batcher = threading.Thread(
                target=self._batch_loop, name="satseg-batcher", daemon=True
            )
            self._batcher.start()
        self.state = State.ready
        self.reason = "ready"
        info = self.model_labels(model)
        self.metrics.set_model(load_seconds=model.load_seconds, **info)

    # ----- model swap ------------------------------------------------------------------------

    def reload(self, path: Path | None = None) -> LoadedModel:
        """Load ``path`` (default ``SATSEG_CHECKPOINT``) beside the current model, warm it up,
        then make it current in one step; blocks until done (call it off the event loop).

        Works while ready and after a failed start (a good checkpoint makes the service ready).

        Raises:
            ReloadInProgressError: another load is running (409).
            ReloadRefusedError: the checkpoint failed to load or verify; the current model
                keeps serving (422).
            NotReadyError: the first load is still running, or the service is shutting down.
        """
        path = path or self.settings.checkpoint
        if not self._reloading.acquire(blocking=False):
            raise ReloadInProgressError("A model reload is already in progress; retry later.")
        try:
            with self._lock:
                if self.state not in (State.ready, State.failed):
                    raise self.not_ready_error()
            old = self.model_version
            try:
                model = self._read_model(path)
            except Exception as exc:  # noqa: BLE001 - any failure means: keep the old model
                detail = str(exc) if isinstance(exc, CheckpointError) else repr(exc)
                self.metrics.reloads.labels("refused").inc()
                log.error("model reload refused, the current model keeps serving: %s", detail)
                raise ReloadRefusedError(
                    f"checkpoint {path} refused, the current model keeps serving: {detail}"
                ) from None
            with self._lock:
                if self.state not in (State.ready, State.failed):
                    raise self.not_ready_error()
                self._install(model)
            self.metrics.reloads.labels("swapped").inc()
            log.info(
                "model swapped: %s -> %s (%s, loaded in %.1f s)",
                (old or "none")[:12],
                model.sha256[:12],
                path,
                model.load_seconds,
            )
            return model
        finally:
            self._reloading.release()

    def _fail(self, reason: str) -> None:
        # Stay up and say why: a restart loop would not fix a bad checkpoint.
        log.error("service not ready: %s", reason)
        with self._lock:
            if self.state is State.loading:
                self.state = State.failed
                self.reason = reason

    def begin_drain(self) -> None:
        """Report not-ready from now on while still serving what arrives (shutdown step 1)."""
        with self._lock:
            if self.state in (State.loading, State.ready):
                self.state = State.draining
                self.reason = "shutting down"

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is admitted; True if that happened within ``timeout``."""
        end = time.monotonic() + timeout
        with self._idle:
            while self._in_flight:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def stop(self) -> None:
        """Stop the batcher and fail whatever still waits for it (shutdown step 2)."""
        with self._lock:
            self.state = State.stopped
            self.reason = "stopped"
        self._stop.set()
        if self._batcher is not None:
            self._batcher.join(timeout=5)
        while True:
            try:
                self._held.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for job in self._held:
            _resolve(job, error=NotReadyError("The service is shutting down.", code="stopped"))
        self._held.clear()
        self._request_pool.shutdown(wait=False, cancel_futures=True)
        self._io_pool.shutdown(wait=False, cancel_futures=True)

    # ----- readiness and admission -----------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.state is State.ready

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def not_ready_error(self) -> NotReadyError:
        code = {
            State.loading: "loading",
            State.failed: "model_unavailable",
            State.draining: "shutting_down",
            State.stopped: "shutting_down",
        }.get(self.state, "not_ready")
        return NotReadyError(
            f"Not ready: {self.reason}.",
            code=code,
            headers={"Retry-After": str(self.settings.retry_after_s)},
        )

    @contextlib.contextmanager
    def admit(self) -> Iterator[Ticket]:
        """Take one of ``max_queue`` request slots for the duration of the block.

        Raises:
            NotReadyError: no model (loading, failed, stopped).
            OverloadedError: every slot is taken.
        """
        with self._lock:
            # Draining still serves: load balancers need a moment to notice readiness.
            model = self.model
            if self.state not in (State.ready, State.draining) or model is None:
                raise self.not_ready_error()
            if self._in_flight >= self.settings.max_queue:
                raise OverloadedError(
                    f"The service is at capacity ({self.settings.max_queue} requests in "
                    "progress); retry shortly.",
                    headers={"Retry-After": str(self.settings.retry_after_s)},
                )
            self._in_flight += 1
        try:
            yield Ticket(time.monotonic() + self.settings.request_timeout_s, model)
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    # ----- admission by memory ----------------------------------------------------------

    def working_memory(self, size: DecodedSize, upload_bytes: int, ticket: Ticket) -> int:
        """Estimated peak bytes one image of ``size`` holds while its request runs: the upload,
        the decoded samples, RGB + validity + mask (5 bytes a pixel, one more for the encoded
        answer), a band of blended logits as wide as the image, a batch of tiles in flight
        with their logits (float32), and for a multi-band model its band values (float32)."""
        classes = ticket.model.predictor.num_classes
        spec = bands_from_checkpoint(ticket.model.predictor.metadata)
        values = 0 if spec.reads_pictures() else 4 * spec.count * size.width * size.height
        tile, overlap, batch = self.options.tile, self.options.overlap, self.options.tile_batch
        pixels = size.width * size.height
        accumulator = 4 * classes * (tile + overlap) * size.width
        tiles = 4 * batch * (3 + classes) * tile * tile
        return upload_bytes + size.nbytes + 6 * pixels + accumulator + tiles + values

    @contextlib.asynccontextmanager
    async def reserve_memory(self, nbytes: int) -> AsyncIterator[None]:
        """Hold ``nbytes`` of the memory budget for the block.

        A request that does not fit waits up to ``memory_wait_s`` for others to finish (in the
        bounded queue: it holds its admission slot meanwhile).

        Raises:
            MemoryBudgetError: ``nbytes`` exceed the whole budget (413): it could never run.
            OverloadedError: it did not fit in time (503 + Retry-After).
        """
        budget = self.memory
        if nbytes > budget.total:
            raise MemoryBudgetError(
                f"This image needs an estimated {nbytes:,} bytes of working memory, more than "
                f"the service's whole budget of {budget.total:,} bytes "
                "(SATSEG_MEMORY_BUDGET_BYTES); send a smaller image or fewer bands."
            )
        # Polled on the event loop rather than waited for in a thread: a client that goes
        # away while waiting leaves no reservation behind.
        end = time.monotonic() + self.settings.memory_wait_s
        while not budget.try_reserve(nbytes, timeout=0):
            if time.monotonic() >= end:
                raise OverloadedError(
                    f"The service's working memory is taken ({budget.reserved:,} of "
                    f"{budget.total:,} bytes reserved; this request needs {nbytes:,}); "
                    "retry shortly.",
                    code="over_memory_budget",
                    headers={"Retry-After": str(self.settings.retry_after_s)},
                )
            await asyncio.sleep(0.02)
        try:
            yield
        finally:
            budget.release(nbytes)

    # ----- work ---------------------------------------------------------------------------

    async def run_io(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a decoding/encoding function on the I/O pool, off the event loop."""
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()  # log lines there keep the request id
        return await loop.run_in_executor(self._io_pool, lambda: context.run(fn, *args, **kwargs))

    async def segment(
        self,
        image: np.ndarray,
        ticket: Ticket,
        *,
        valid: np.ndarray | None = None,
        pixels: np.ndarray | None = None,
    ) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB -> ``(H, W)`` uint8 class ids, sharing forward passes. For a
        multi-band model, ``pixels`` holds the ``(H, W, B)`` band values it reads (``image`` is
        then a preview).

        Raises:
            DeadlineExceededError: the ticket's deadline passed (504).
            DeviceOutOfMemoryError: the device ran out of memory for this request (503).
            NotReadyError: the service stopped meanwhile.
        """
        return (await self.predict(image, ticket, valid=valid, pixels=pixels)).mask

    async def predict(
        self,
        image: np.ndarray,
        ticket: Ticket,
        *,
        valid: np.ndarray | None = None,
        probabilities: bool = False,
        pixels: np.ndarray | None = None,
    ) -> Prediction:
        """:meth:`segment` through :func:`shared.pipeline.predict`, with the batcher as the model
        call; ``valid`` False (nodata) pixels become ``ignore_index``, and ``probabilities``
        adds the per-class softmax x 255. Raises as :meth:`segment`."""
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()
        start = time.perf_counter()
        result = await loop.run_in_executor(
            self._request_pool,
            context.run,
            self._predict,
            ArrayRaster(image, valid, pixels=pixels),
            ticket,
            probabilities,
        )
        self.metrics.inference.observe(time.perf_counter() - start)
        return result

    def _predict(self, source: ArrayRaster, ticket: Ticket, probabilities: bool) -> Prediction:
        predictor = ticket.model.predictor
        try:
            with torch.inference_mode():
                return predict(
                    source,
                    lambda tiles: self._submit(tiles, ticket.deadline, predictor),
                    num_classes=predictor.num_classes,
                    tiling=Tiling(self.options.tile, self.options.overlap, self.options.tile_batch),
                    probabilities=probabilities,
                    ignore_index=predictor.label_map.ignore_index,
                )
        except Exception as exc:
            if is_out_of_memory(exc):  # the blend accumulator of a huge image, for example
                raise self._out_of_memory(exc) from exc
            raise

    def _submit(
        self, tiles: torch.Tensor, deadline: float, predictor: Predictor | None = None
    ) -> torch.Tensor:
        """Hand ``(n, 3, h, w)`` uint8 tiles to the batcher, to run on ``predictor`` (the
        request's model); wait for ``(n, C, h, w)`` logits."""
        if self._stop.is_set():
            raise self.not_ready_error()
        if time.monotonic() >= deadline:
            raise _deadline_error(self.settings.request_timeout_s)
        job = _Job(tiles, deadline, predictor=predictor)
        self._queue.put(job)
        try:
            return job.future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            job.future.cancel()  # the batcher skips it if it has not started on it yet
            raise _deadline_error(self.settings.request_timeout_s) from None

    def _out_of_memory(self, exc: BaseException) -> DeviceOutOfMemoryError:
        log.warning("device out of memory; the request is refused: %s", exc)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return DeviceOutOfMemoryError(
            "The device ran out of memory for this request; retry, or send a smaller image.",
            headers={"Retry-After": str(self.settings.retry_after_s)},
        )

    # ----- the batcher thread --------------------------------------------------------------

    def _batch_loop(self) -> None:
        threads = configure_threads(self.torch_threads)
        log.info("batcher: forward passes on %d torch thread(s)", threads)
        while not self._stop.is_set():
            jobs = self._collect()
            if jobs:
                self._run(jobs)

    def _next_job(self, timeout: float) -> _Job | None:
        if self._held:
            return self._held.popleft()
        try:
            return self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None

    def _collect(self) -> list[_Job]:
        """Wait for one job, then gather jobs of the same tile shape until ``batch_max_tiles``
        tiles are waiting or ``batch_timeout_ms`` have passed since the first."""
        first = self._next_job(timeout=0.1)
        while first is not None and not self._claim(first):
            first = self._next_job(timeout=0.0)
        if first is None:
            return []
        jobs, size, shape = [first], first.size, first.shape
        limit = self.settings.batch_max_tiles

        def fits(job: _Job) -> bool:
            # One model per forward pass: during a swap, old and new requests batch apart.
            same_model = job.predictor is first.predictor
            return job.shape == shape and same_model and size + job.size <= limit

        for job in list(self._held):
            if size >= limit:
                break
            if fits(job):
                self._held.remove(job)
                if self._claim(job):
                    jobs.append(job)
                    size += job.size
        end = time.monotonic() + self.settings.batch_timeout_ms / 1000
        while size < limit:
            left = end - time.monotonic()
            try:
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if not fits(job):
                self._held.append(job)  # a different shape waits for the next batch
            elif self._claim(job):
                jobs.append(job)
                size += job.size
        return jobs

    def _claim(self, job: _Job) -> bool:
        """Mark a job as running; False (and dropped) if its request gave up or timed out."""
        if not job.future.set_running_or_notify_cancel():
            return False
        if time.monotonic() >= job.deadline:
            job.future.set_exception(_deadline_error(self.settings.request_timeout_s))
            return False
        return True

    def _run(self, jobs: list[_Job]) -> None:
        predictor = jobs[0].predictor or self.predictor
        assert predictor is not None
        try:
            batch = jobs[0].tiles if len(jobs) == 1 else torch.cat([j.tiles for j in jobs])
            start = time.perf_counter()
            # torch.fx patches torch.nn.Module process-wide while it traces a model being
            # loaded beside this one; a forward pass then would be traced too.
            with FX_TRACE_LOCK:
                logits = predictor.run_batch(batch)
            self.metrics.forward.observe(time.perf_counter() - start)
            self.metrics.batch_tiles.observe(int(batch.shape[0]))
        except Exception as exc:
            # The batcher survives every failure; the requests in this batch get the error.
            if is_out_of_memory(exc):
                error: Exception = self._out_of_memory(exc)
            else:
                log.exception("forward pass failed")
                error = exc
            for job in jobs:
                _resolve(job, error=error)
            return
        start = 0
        for job in jobs:
            _resolve(job, result=logits[start : start + job.size])
            start += job.size

    # ----- description --------------------------------------------------------------------

    def model_info(self) -> dict[str, Any]:
        """What ``GET /model`` reports (plain data; the route validates it)."""
        from shared.codec import jsonable

        loaded = self.model
        if loaded is None:
            raise self.not_ready_error()
        predictor = loaded.predictor
        meta = predictor.metadata
        arch = dict(meta.get("arch") or {})
        label_map = predictor.label_map
        return {
            "arch": {
                "name": str(arch.get("name", "deeplabv3")),
                "backbone": str(arch.get("backbone", "unknown")),
                "num_classes": int(arch.get("num_classes", predictor.num_classes)),
                "aux_loss": bool(arch.get("aux_loss", False)),
            },
            "classes": [
                {"id": c.id, "name": c.name, "color": list(c.color)} for c in label_map.classes
            ],
            "ignore_index": label_map.ignore_index,
            "normalization": predictor.normalization.to_dict(),
            "bands": bands_from_checkpoint(meta).to_dict(),
            "gsd_m": gsd_from_checkpoint(meta),
            "logit_offsets": (
                None
                if predictor.logit_offsets is None
                else dict(zip(label_map.names, predictor.logit_offsets, strict=True))
            ),
            "checkpoint": {
                "path": str(loaded.path),
                "sha256": loaded.sha256,
                "load_seconds": round(loaded.load_seconds, 3),
                "schema_version": meta.get("schema_version"),
                "created_at": meta.get("created_at"),
                "metrics": jsonable(meta.get("metrics") or {}),
                "config": jsonable(meta.get("config") or {}),
                "versions": jsonable(meta.get("versions") or {}),
            },
            "device": str(predictor.device),
            "precision": predictor.precision,
            "precision_reason": predictor.precision_reason,
            "int8_agreement": (
                predictor.int8_agreement.to_dict([c.name for c in label_map.classes])
                if predictor.int8_agreement is not None
                else None
            ),
            "tile": self.options.tile,
            "overlap": self.options.overlap,
            "flips": self.options.flips,
        }

    @staticmethod
    def model_labels(model: LoadedModel) -> dict[str, str]:
        """The labels of ``satseg_model_info``: checkpoint sha256, architecture, precision."""
        arch = dict(model.predictor.metadata.get("arch") or {})
        return {
            "sha256": model.sha256,
            "arch": str(arch.get("name", "deeplabv3")),
            "backbone": str(arch.get("backbone", "unknown")),
            "precision": model.predictor.precision,
            "device": str(model.predictor.device),
        }


def _host_thread() -> None:
    """Initialiser of the request and I/O threads: their torch work runs on this thread alone
    (the intra-op thread count is per thread with OpenMP; the batcher sets its own)."""
    torch.set_num_threads(1)


def _sha256(path: Path) -> str:
    """The checkpoint file's sha256; ``unknown`` when there is no file (a loader given to the
    engine that builds its model another way)."""
    try:
        with path.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return "unknown"


def _resolve(
    job: _Job, *, result: torch.Tensor | None = None, error: BaseException | None = None
) -> None:
    # The request may have given up (cancelled) in the meantime; that is not an error.
    with contextlib.suppress(Exception):
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)  # type: ignore[arg-type]


def _deadline_error(timeout: float) -> DeadlineExceededError:
    return DeadlineExceededError(
        f"The request did not finish within its deadline of {timeout:g} s "
        "(SATSEG_REQUEST_TIMEOUT_S); the service may be overloaded."
    )
