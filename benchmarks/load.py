"""Load: the service's capacity, its latency at 80 % of it, and five minutes at twice it.

    python -m benchmarks.load [--capacity-s 30] [--steady-s 60] [--overload-s 300] [--repository tiny]
                              [--images 64] [--out benchmarks/results/load.json]

1. capacity: a closed loop (``--concurrency`` callers, each sending its next image when answered) on real
   images (HC18 and FETAL_PLANES_DB from the shared data folder; synthetic frames without it): images/s.
2. 80 %: an open loop at a constant 0.8 x capacity requests/s: p50 and p99 of the answers; the target is
   p99 <= 3 x p50 (a queue that stays short).
3. 2x: an open loop at twice the capacity, a minute of warm-up then ``--overload-s``: every answer must be
   200 or 503 (the excess shed by admission, with Retry-After); p99 of the 200s; resident memory of the
   server's processes, whose growth from the first to the last 30 s must stay under 10 %.

The client runs on the same machine as the server and takes some of its CPU: compare ratios within a run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.server import MemorySampler, real_images, repository, scratch, serve

MIB = 2**20


def _client(url: str, connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(60.0), limits=limits)


async def _post(client: httpx.AsyncClient, data: bytes) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        r = await client.post("/v1/cluster", files={"image": ("u.png", data, "image/png")})
        status, retry = r.status_code, r.headers.get("retry-after")
    except httpx.HTTPError as exc:
        status, retry = 0, type(exc).__name__
    return {"status": status, "retry_after": retry, "s": time.perf_counter() - t0, "t": t0}


async def closed_loop(
    url: str, images: list[bytes], concurrency: int, seconds: float
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    deadline = time.perf_counter() + seconds
    async with _client(url, concurrency) as client:

        async def caller(k: int) -> None:
            i = k
            while time.perf_counter() < deadline:
                out.append(await _post(client, images[i % len(images)]))
                i += concurrency

        await asyncio.gather(*(caller(k) for k in range(concurrency)))
    return out


async def open_loop(
    url: str, images: list[bytes], rate: float, seconds: float, connections: int = 1024
) -> tuple[list[dict[str, Any]], float]:
    """Requests sent at a constant ``rate`` whatever the answers; (answers, the client's worst lateness)."""
    out: list[dict[str, Any]] = []
    tasks: set[asyncio.Task[None]] = set()
    late = 0.0
    async with _client(url, connections) as client:
        start = time.perf_counter()
        n = int(rate * seconds)
        for i in range(n):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                late = max(late, -delay)

            async def send(data: bytes) -> None:
                out.append(await _post(client, data))

            task = asyncio.create_task(send(images[i % len(images)]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    return out, late


def _latency(answers: list[dict[str, Any]]) -> dict[str, Any]:
    ok = np.array([a["s"] for a in answers if a["status"] == 200])
    statuses = Counter(a["status"] for a in answers)
    out: dict[str, Any] = {
        "answers": len(answers),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "only_200_or_503": set(statuses) <= {200, 503},
        "503_with_retry_after": sum(1 for a in answers if a["status"] == 503 and a["retry_after"]),
    }
    if len(ok):
        p50, p99 = (float(np.percentile(ok, q)) for q in (50, 99))
        out.update(p50_ms=round(p50 * 1000, 1), p99_ms=round(p99 * 1000, 1), p99_over_p50=round(p99 / p50, 2))
    return out


def stage_quantiles(metrics_before: str, metrics_after: str, stage: str) -> dict[str, float | None]:
    """p50 and p99 (ms, bucket upper bounds) of one stage's latency between two /metrics scrapes: how long
    the work itself took, without the queueing in front of it."""

    def buckets(text: str) -> dict[float, float]:
        out: dict[float, float] = {}
        for line in text.splitlines():
            if line.startswith("fusc_stage_latency_seconds_bucket") and f'stage="{stage}"' in line:
                le = line.split('le="', 1)[1].split('"', 1)[0]
                out[float(le)] = out.get(float(le), 0.0) + float(line.rsplit(" ", 1)[1])
        return out

    a, b = buckets(metrics_before), buckets(metrics_after)
    bounds = sorted(b)
    counts = [b[le] - a.get(le, 0.0) for le in bounds]
    total = counts[-1] if counts else 0.0
    result: dict[str, float | None] = {"n": total}
    for q in (0.5, 0.99):
        hit = next((le for le, c in zip(bounds, counts, strict=True) if total and c >= q * total), None)
        result[f"p{int(q * 100)}_ms_at_most"] = None if hit is None else round(hit * 1000, 1)
    return result


def run(
    repo_name: str = "tiny",
    n_images: int = 64,
    concurrency: int = 16,
    capacity_s: float = 30.0,
    steady_s: float = 60.0,
    overload_s: float = 300.0,
    env: dict[str, str] | None = None,
    warmup_s: float = 60.0,
) -> dict[str, Any]:
    images = real_images(n_images)
    workdir = scratch()
    result: dict[str, Any] = {
        "benchmark": "load",
        "repository": repo_name,
        "images": len(images),
        "mean_image_kib": round(sum(map(len, images)) / len(images) / 1024, 1),
        "settings_env": env or {},
        "load_average_1m_before": round(os.getloadavg()[0], 2),
        "nice": os.nice(0),
    }
    with serve(repository(repo_name, workdir), workdir, env) as server:
        asyncio.run(closed_loop(server.url, images, concurrency, 5.0))  # warm-up: measured rates settle
        t0 = time.perf_counter()
        answers = asyncio.run(closed_loop(server.url, images, concurrency, capacity_s))
        elapsed = time.perf_counter() - t0
        capacity = sum(a["status"] == 200 for a in answers) / elapsed
        result["capacity"] = {
            "concurrency": concurrency,
            "seconds": round(elapsed, 1),
            "images_per_s": round(capacity, 2),
            **_latency(answers),
        }

        rate = 0.8 * capacity
        before = httpx.get(f"{server.url}/metrics", timeout=10).text
        answers, late = asyncio.run(open_loop(server.url, images, rate, steady_s))
        after = httpx.get(f"{server.url}/metrics", timeout=10).text
        at80 = _latency(answers)
        result["at_80_percent"] = {
            "rate_per_s": round(rate, 2),
            "client_late_s": round(late, 3),
            **at80,
            # The same ratio for the work alone (per image, no queueing): on a machine shared with other
            # work, a high ratio here says the CPU was taken away, not that requests queued.
            "server_stage_latency": {s: stage_quantiles(before, after, s) for s in ("decode", "clean")},
        }
        result["at_80_percent"]["pass"] = bool(at80.get("p99_over_p50", 99) <= 3.0)

        rate = 2.0 * capacity
        # A minute at that rate first: the working set of a full admission queue and of the connections
        # of 2x the traffic builds up once (measured here, ~10 % over the 80 % phase); growth is judged
        # on the five minutes after it, where a leak would show.
        sampler = MemorySampler(server, interval_s=0.5).start()
        asyncio.run(open_loop(server.url, images, rate, warmup_s))
        sampler.stop()
        warmup_rss = [
            round(sampler.mean_between(t, t + 10.0) / MIB, 1) for t in np.arange(0.0, warmup_s, 10.0)
        ]
        sampler = MemorySampler(server, interval_s=0.5).start()
        answers, late = asyncio.run(open_loop(server.url, images, rate, overload_s))
        sampler.stop()
        over = _latency(answers)
        first = sampler.mean_between(0.0, 30.0)
        warm = sampler.mean_between(30.0, 60.0)
        last = sampler.mean_between(overload_s - 30.0, overload_s)
        growth = last / first - 1.0
        timeline = [
            round(sampler.mean_between(t, t + 30.0) / MIB, 1) for t in np.arange(0.0, overload_s, 30.0)
        ]
        ok_rate = sum(a["status"] == 200 for a in answers) / overload_s
        result["at_2x"] = {
            "rate_per_s": round(rate, 2),
            "seconds": overload_s,
            "client_late_s": round(late, 3),
            "answered_200_per_s": round(ok_rate, 2),
            **over,
            "rss_mib": {
                "first_30s": round(first / MIB, 1),
                "last_30s": round(last / MIB, 1),
                "peak": round(sampler.peak / MIB, 1),
            },
            "warmup_s": warmup_s,
            "warmup_rss_mib_per_10s": warmup_rss,
            "rss_mib_per_30s": timeline,
            "rss_growth": round(growth, 4),
            "rss_growth_after_first_30s": round(last / warm - 1.0, 4),
        }
        result["at_2x"]["pass"] = bool(over["only_200_or_503"] and growth < 0.10)
        result["ready_after"] = httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
    result["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    result["pass"] = bool(
        result["at_80_percent"]["pass"] and result["at_2x"]["pass"] and result["ready_after"]
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", choices=["tiny", "bundled"], default="tiny")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--capacity-s", type=float, default=30.0)
    parser.add_argument("--steady-s", type=float, default=60.0)
    parser.add_argument("--overload-s", type=float, default=300.0)
    parser.add_argument("--env", action="append", default=[], help="FUSC_X=Y for the server (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/load.json"))
    args = parser.parse_args()
    env = dict(e.split("=", 1) for e in args.env)
    result = run(
        args.repository, args.images, args.concurrency, args.capacity_s, args.steady_s, args.overload_s, env
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
