"""Memory under large uploads: the service's resident memory while 7000x7000 PNGs of 49 MB arrive at once.

    python -m benchmarks.memory [--concurrency 32] [--uploads 200] [--side 7000] [--repository tiny]
                                [--out benchmarks/results/memory.json]

Starts ``bentoml serve`` with the default settings, sends one wave of ``--concurrency`` uploads at once, then
``--uploads`` more at that concurrency, sampling the resident memory of all the server's processes every
50 ms. The service must answer each with 200, or 503 with Retry-After (admission), keep its peak under
1.5 GiB and be ready afterwards. The image is generated (noise, so it does not compress), never stored.
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

from benchmarks.server import MemorySampler, big_png, real_images, repository, scratch, serve

LIMIT_BYTES = int(1.5 * 2**30)
MIB = 2**20


async def upload_many(url: str, data: bytes, total: int, concurrency: int) -> list[dict[str, Any]]:
    """``total`` POST /v1/cluster of ``data``, ``concurrency`` at a time; status, Retry-After, seconds."""
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(180.0), limits=limits) as client:

        async def one() -> dict[str, Any]:
            async with gate:
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/cluster", files={"image": ("big.png", data, "image/png")})
                except httpx.HTTPError as exc:
                    return {"status": 0, "error": type(exc).__name__, "s": time.perf_counter() - t0}
                code = r.json().get("error", {}).get("code") if r.status_code != 200 else None
                return {
                    "status": r.status_code,
                    "retry_after": r.headers.get("retry-after"),
                    "code": code,
                    "s": time.perf_counter() - t0,
                }

        return await asyncio.gather(*(one() for _ in range(total)))


def summarise(answers: list[dict[str, Any]]) -> dict[str, Any]:
    statuses = Counter(a["status"] for a in answers)
    shed = [a for a in answers if a["status"] == 503]
    ok_s = sorted(a["s"] for a in answers if a["status"] == 200)
    return {
        "answers": len(answers),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "codes": dict(Counter(a.get("code") for a in answers if a.get("code"))),
        "503_with_retry_after": sum(1 for a in shed if a.get("retry_after")),
        "only_200_or_503_with_retry_after": all(
            a["status"] == 200 or (a["status"] == 503 and a.get("retry_after")) for a in answers
        ),
        "seconds_200_median": round(ok_s[len(ok_s) // 2], 3) if ok_s else None,
        "seconds_200_max": round(ok_s[-1], 3) if ok_s else None,
    }


def run(concurrency: int, uploads: int, side: int, repo_name: str, env: dict[str, str] | None = None) -> dict:
    workdir = scratch()
    data = big_png(side)
    small = real_images(1)[0]
    with serve(repository(repo_name, workdir), workdir, env) as server:
        sampler = MemorySampler(server).start()
        time.sleep(1.0)
        baseline = server.rss_bytes()
        t0 = time.monotonic()
        wave = asyncio.run(upload_many(server.url, data, concurrency, concurrency))
        t1 = time.monotonic()
        steady = asyncio.run(upload_many(server.url, data, uploads, concurrency))
        t2 = time.monotonic()
        time.sleep(1.0)
        sampler.stop()
        ready = httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
        small_ok = httpx.post(
            f"{server.url}/v1/cluster", files={"image": ("s.png", small, "image/png")}, timeout=30
        ).status_code
        after = server.rss_bytes()
        processes = server.processes()
    start = sampler.samples[0][0] if sampler.samples else 0.0
    wave_peak = max((b for t, b in sampler.samples if t - start <= t1 - t0 + 1.0), default=0)
    result = {
        "benchmark": "memory",
        "image": {"side": side, "bytes": len(data)},
        "concurrency": concurrency,
        "uploads": uploads,
        "repository": repo_name,
        "settings_env": env or {},
        "server_processes": processes,
        "rss_mib": {
            "baseline": round(baseline / MIB, 1),
            "peak_wave": round(wave_peak / MIB, 1),
            "peak_overall": round(sampler.peak / MIB, 1),
            "after": round(after / MIB, 1),
            "limit": LIMIT_BYTES / MIB,
        },
        "wave": {**summarise(wave), "seconds": round(t1 - t0, 1)},
        "steady": {**summarise(steady), "seconds": round(t2 - t1, 1)},
        "ready_after": ready,
        "small_image_after": small_ok,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "nice": os.nice(0),
    }
    result["pass"] = bool(
        sampler.peak <= LIMIT_BYTES
        and result["wave"]["only_200_or_503_with_retry_after"]
        and result["steady"]["only_200_or_503_with_retry_after"]
        and ready
        and small_ok == 200
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--uploads", type=int, default=200)
    parser.add_argument("--side", type=int, default=7000)
    parser.add_argument("--repository", choices=["tiny", "bundled"], default="tiny")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/memory.json"))
    args = parser.parse_args()
    result = run(args.concurrency, args.uploads, args.side, args.repository)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
