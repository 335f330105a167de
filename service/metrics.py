"""Prometheus metrics of one service process, served at ``GET /metrics``.

One process per container is the supported shape: ``python -m service`` runs a single uvicorn
process that holds one model and batches every request it receives, so its registry sees every
request. Several uvicorn workers would each load their own model and each answer a scrape with
its own counts only; scale out with more containers (replicas) instead, each scraped on its own.
For that reason the registry is per app, not prometheus-client's global one or its
multiprocess mode: two apps in one process (tests) never mix their counts either.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

# Why a request was turned away, keyed by the error code of the answer.
REFUSAL_REASONS = {
    "overloaded": "overload",
    "over_memory_budget": "memory",
    "timeout": "deadline",
    "body_too_large": "body_size",
    "image_too_large": "pixels",
    "decoded_too_large": "decoded_bytes",
    "too_many_bands": "bands",
    "unauthorized": "auth",
}

# Seconds; a 256 px tile answers in tens of milliseconds, a whole scene in tens of seconds.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServiceMetrics:
    """Every metric the service exports, on a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "satseg_requests", "HTTP requests answered, by route and status.",
            ["route", "status"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "satseg_request_duration_seconds", "Time to answer a request, by route.",
            ["route"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inference = Histogram(
            "satseg_inference_seconds",
            "Time one request spent waiting for and running the model (its tiles blended).",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.forward = Histogram(
            "satseg_forward_seconds", "Time of one forward pass of the model.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_tiles = Histogram(
            "satseg_batch_tiles", "Tiles in one forward pass (dynamic batch size).",
            buckets=_BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.refused = Counter(
            "satseg_requests_refused", "Requests turned away, by reason.", ["reason"], registry=r
        )
        for reason in REFUSAL_REASONS.values():
            self.refused.labels(reason)  # present at 0 from the start
        self.queue_depth = Gauge(
            "satseg_queue_depth", "Tile batches waiting for the model.", registry=r
        )
        self.admitted = Gauge(
            "satseg_requests_admitted", "Requests admitted and not yet answered.", registry=r
        )
        self.memory_reserved = Gauge(
            "satseg_memory_reserved_bytes",
            "Estimated working memory of the requests admitted now.", registry=r,
        )  # fmt: skip
        self.memory_budget = Gauge(
            "satseg_memory_budget_bytes", "Working-memory budget of admitted requests.", registry=r
        )
        self.model_load = Gauge(
            "satseg_model_load_seconds", "Time the model in use took to load and warm up.",
            registry=r,
        )  # fmt: skip
        self.model_info = Gauge(
            "satseg_model_info", "The model in use (value 1): checkpoint sha256 and how it runs.",
            ["sha256", "arch", "backbone", "precision", "device"], registry=r,
        )  # fmt: skip
        self.reloads = Counter(
            "satseg_model_reloads", "Model reloads, by result (swapped or refused).",
            ["result"], registry=r,
        )  # fmt: skip
        for result in ("swapped", "refused"):
            self.reloads.labels(result)

    def watch(
        self,
        *,
        queue_depth: Callable[[], float],
        admitted: Callable[[], float],
        memory_reserved: Callable[[], float],
    ) -> None:
        """Read the gauges from the engine at scrape time rather than tracking every change."""
        self.queue_depth.set_function(queue_depth)
        self.admitted.set_function(admitted)
        self.memory_reserved.set_function(memory_reserved)

    def observe_request(self, route: str, status: int, seconds: float, code: str | None) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        reason = REFUSAL_REASONS.get(code or "")
        if reason is not None:
            self.refused.labels(reason).inc()

    def set_model(
        self,
        *,
        sha256: str,
        arch: str,
        backbone: str,
        precision: str,
        device: str,
        load_seconds: float,
    ) -> None:
        """Name the model now in use; the previous one's series goes away."""
        self.model_info.clear()
        self.model_info.labels(sha256, arch, backbone, precision, device).set(1)
        self.model_load.set(load_seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
