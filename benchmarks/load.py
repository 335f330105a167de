"""Load test: N concurrent clients against a running service on loopback for T seconds.

    python -m benchmarks.load --url http://127.0.0.1:8000 --clients 8 --seconds 30 \
        --image data/bluemarble/TEST_SET/IMAGES/r0684_c4328.jpg [--format rle] [--json PATH]

Every client loops: POST /segment, wait for the answer, repeat, until the time is up (the loop is
bounded in time and in requests, and stops by itself). It prints the throughput held, latency
percentiles of the successful answers, and the count of answers by status (503 with
Retry-After is the service shedding load, not failing). Only loopback targets are accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import httpx

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
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


async def _client(
    http: httpx.AsyncClient,
    url: str,
    body: bytes,
    deadline: float,
    max_requests: int,
    counter: list[int],
    statuses: Counter[str],
    latencies: list[float],
) -> None:
    while time.monotonic() < deadline and counter[0] < max_requests:
        counter[0] += 1
        start = time.perf_counter()
        try:
            response = await http.post(url, files={"image": ("tile.jpg", body, "image/jpeg")})
            statuses[str(response.status_code)] += 1
            if response.status_code == 200:
                latencies.append((time.perf_counter() - start) * 1000)
        except httpx.HTTPError as exc:
            statuses[type(exc).__name__] += 1


async def run_load(
    base_url: str, image: bytes, *, clients: int, seconds: float, fmt: str, max_requests: int
) -> dict:
    """Drive ``clients`` concurrent loops for ``seconds``; return the summary dict."""
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    counter = [0]
    url = f"{base_url.rstrip('/')}/segment?format={fmt}"
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        start = time.monotonic()
        deadline = start + seconds
        await asyncio.gather(
            *(
                _client(http, url, image, deadline, max_requests, counter, statuses, latencies)
                for _ in range(clients)
            )
        )
        elapsed = time.monotonic() - start
    ok = statuses.get("200", 0)
    return {
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
    }


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
    summary = asyncio.run(
        run_load(
            args.url,
            image,
            clients=args.clients,
            seconds=args.seconds,
            fmt=args.format,
            max_requests=args.max_requests,
        )
    )
    latency = summary["latency_ms"]
    print(
        f"{summary['clients']} clients, {summary['seconds']} s: {summary['requests']} requests, "
        f"{summary['ok']} ok ({summary['ok_per_s']}/s); latency ms p50 {latency['p50']} "
        f"p95 {latency['p95']} p99 {latency['p99']}; by status {summary['by_status']}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
