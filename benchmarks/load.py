"""Load test: N concurrent clients against a running service on loopback for T seconds.

    python -m benchmarks.load --url http://127.0.0.1:8000 --clients 8 --seconds 30 \
        --image data/bluemarble/TEST_SET/IMAGES/r0684_c4328.jpg [--format rle] [--json PATH]

Every client loops: POST /segment, wait for the answer, repeat, until the time is up (the loop is
bounded in time and in requests, and stops by itself). It prints the throughput held, latency
percentiles of the successful answers, and the count of answers by status (503 with
Retry-After is the service shedding load, not failing). Only loopback targets are accepted.

``--reload-at S`` swaps the model in the middle of the run: at S seconds it sends
``POST /admin/reload`` with the admin key from ``$SATSEG_ADMIN_KEY`` (and
``--reload-checkpoint NAME`` as the body's checkpoint, if given), then reports the answers by
model version (``X-Model-Version``) and how many broke the swap's order: answers of the new model
that finished before the reload was sent, and answers of the old model to requests sent after
the reload had answered (both must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import ipaddress
import json
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx

from benchmarks import stats

LOOPBACK_NAMES = {"localhost"}


def is_loopback(url: str) -> bool:
    """Whether ``url`` points at this machine (127.0.0.0/8, ::1 or localhost)."""
    host = urlparse(url).hostname or ""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation; None for no values."""
    return stats.percentile(values, q) if values else None


@dataclass(frozen=True)
class Answer:
    """One request of the run: when it was sent and answered (time.monotonic()), its status,
    the model version that answered, and the sha256 of the body of a 200."""

    sent: float
    answered: float
    status: str
    version: str | None
    body_sha256: str | None


@dataclass
class Reload:
    """The model swap of a run: when ``POST /admin/reload`` was sent and answered."""

    at_s: float
    checkpoint: str | None
    key: str
    sent: float | None = None
    answered: float | None = None
    status: int | None = None
    old_version: str | None = None  # from the reload's answer
    new_version: str | None = None
    # The clients keep sending until this long after the reload answered, however long the
    # reload took (the run's seconds are a minimum), so the new model always gets requests.
    load_after_s: float = 0.0
    # ... and it is sent no sooner than this many answers came back (a slow start still has
    # answers of the old model before the swap).
    after_answers: int = 0

    def pending(self, now: float) -> bool:
        """Whether clients should keep sending for this reload at ``now``."""
        return self.answered is None or now < self.answered + self.load_after_s


async def _client(
    http: httpx.AsyncClient,
    url: str,
    body: bytes,
    running: Callable[[float], bool],
    max_requests: int,
    counter: list[int],
    answers: list[Answer],
) -> None:
    while running(time.monotonic()) and counter[0] < max_requests:
        counter[0] += 1
        sent = time.monotonic()
        try:
            response = await http.post(url, files={"image": ("tile.jpg", body, "image/jpeg")})
        except httpx.HTTPError as exc:
            answers.append(Answer(sent, time.monotonic(), type(exc).__name__, None, None))
            continue
        digest = hashlib.sha256(response.content).hexdigest() if response.is_success else None
        version = response.headers.get("x-model-version")
        answers.append(Answer(sent, time.monotonic(), str(response.status_code), version, digest))


async def _reload(
    http: httpx.AsyncClient, base_url: str, start: float, reload: Reload, answers: list[Answer]
) -> None:
    await asyncio.sleep(max(0.0, start + reload.at_s - time.monotonic()))
    while len(answers) < reload.after_answers:
        await asyncio.sleep(0.05)
    body = {"checkpoint": reload.checkpoint} if reload.checkpoint else None
    reload.sent = time.monotonic()
    try:
        response = await http.post(
            f"{base_url.rstrip('/')}/admin/reload", json=body, headers={"X-API-Key": reload.key}
        )
    finally:
        reload.answered = time.monotonic()
    reload.status = response.status_code
    if response.is_success:
        swap = response.json()
        reload.old_version, reload.new_version = swap["previous_sha256"], swap["sha256"]


def swap_order_breaks(answers: list[Answer], reload: Reload) -> dict[str, int]:
    """Answers that contradict an atomic swap: the new model before the reload was sent, the
    old model for a request sent after the reload answered (both 0 when the swap is right)."""
    old, new = reload.old_version, reload.new_version
    if reload.sent is None or reload.answered is None or old is None or old == new:
        return {"new_model_before_reload": 0, "old_model_after_reload": 0}
    return {
        "new_model_before_reload": sum(
            a.version == new and a.answered < reload.sent for a in answers
        ),
        "old_model_after_reload": sum(
            a.version == old and a.sent > reload.answered for a in answers
        ),
    }


async def run_load(
    base_url: str,
    image: bytes,
    *,
    clients: int,
    seconds: float,
    fmt: str,
    max_requests: int,
    reload: Reload | None = None,
    answers: list[Answer] | None = None,
) -> dict:
    """Drive ``clients`` concurrent loops for ``seconds`` (and a reload at ``reload.at_s``);
    return the summary dict. ``answers``, if given, receives every answer."""
    answers = [] if answers is None else answers
    counter = [0]
    url = f"{base_url.rstrip('/')}/segment?format={fmt}"
    limits = httpx.Limits(max_connections=clients + 1)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        start = time.monotonic()
        deadline = start + seconds

        def running(now: float) -> bool:
            return now < deadline or (reload is not None and reload.pending(now))

        tasks = [
            _client(http, url, image, running, max_requests, counter, answers)
            for _ in range(clients)
        ]
        if reload is not None:
            tasks.append(_reload(http, base_url, start, reload, answers))
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - start
    statuses = Counter(a.status for a in answers)
    latencies = [(a.answered - a.sent) * 1000 for a in answers if a.status == "200"]
    ok = statuses.get("200", 0)
    summary = {
        "url": url,
        "clients": clients,
        "seconds": round(elapsed, 2),
        "requests": sum(statuses.values()),
        "ok": ok,
        "ok_per_s": round(ok / elapsed, 3) if elapsed else None,
        "latency_ms": {
            "p50": _round(percentile(latencies, 50)),
            "p95": _round(percentile(latencies, 95)),
            "p99": _round(percentile(latencies, 99)),
            "mean": _round(statistics.fmean(latencies)) if latencies else None,
        },
        "by_status": dict(sorted(statuses.items())),
        "by_model_version": dict(
            sorted(Counter((a.version or "none")[:12] for a in answers).items())
        ),
    }
    if reload is not None:
        summary["reload"] = {
            "at_s": reload.at_s,
            "status": reload.status,
            "seconds": round((reload.answered or 0) - (reload.sent or 0), 2),
            **swap_order_breaks(answers, reload),
        }
    return summary


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--image", required=True, help="image file to send")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--max-requests", type=int, default=100_000, help="hard cap on requests")
    parser.add_argument("--format", default="png", choices=("png", "rle"))
    parser.add_argument("--json", default=None, help="where to write the summary")
    parser.add_argument(
        "--reload-at", type=float, default=None, help="POST /admin/reload after this many s"
    )
    parser.add_argument(
        "--reload-checkpoint", default=None, help="checkpoint inside SATSEG_CHECKPOINT_DIR"
    )
    args = parser.parse_args(argv)
    if not is_loopback(args.url):
        print(f"error: {args.url} is not a loopback address", file=sys.stderr)
        return 2
    if not 1 <= args.clients <= 256 or not 0 < args.seconds <= 600:
        print("error: --clients must be 1..256 and --seconds 0..600", file=sys.stderr)
        return 2
    try:
        image = Path(args.image).read_bytes()
    except OSError as exc:
        print(f"error: cannot read {args.image}: {exc.strerror}", file=sys.stderr)
        return 2
    reload = None
    if args.reload_at is not None:
        key = os.environ.get("SATSEG_ADMIN_KEY", "")
        if not key or not 0 <= args.reload_at < args.seconds:
            print(
                "error: --reload-at needs $SATSEG_ADMIN_KEY and a time within --seconds",
                file=sys.stderr,
            )
            return 2
        reload = Reload(args.reload_at, args.reload_checkpoint, key)
    summary = asyncio.run(
        run_load(
            args.url,
            image,
            clients=args.clients,
            seconds=args.seconds,
            fmt=args.format,
            max_requests=args.max_requests,
            reload=reload,
        )
    )
    latency = summary["latency_ms"]
    print(
        f"{summary['clients']} clients, {summary['seconds']} s: {summary['requests']} requests, "
        f"{summary['ok']} ok ({summary['ok_per_s']}/s); latency ms p50 {latency['p50']} "
        f"p95 {latency['p95']} p99 {latency['p99']}; by status {summary['by_status']}; "
        f"by model version {summary['by_model_version']}"
    )
    if "reload" in summary:
        print(f"reload: {summary['reload']}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
