"""PACS path throughput: instances/s from the first C-STORE to the last written-back result.

    python -m benchmarks.pacs [--instances 200] [--repository bundled|tiny] [--size 480x640]
                              [--out benchmarks/results/pacs.json]

A real Orthanc (Debian) and the real worker process (``python -m service.pacs run``, two job threads, the
model in-process) on 127.0.0.1. The phantom instances (single- and multi-frame, raw and JPEG, Secondary
Capture) are stored into Orthanc first, untimed, as the scanner sends them to the PACS too; then the clock
starts, they are C-STOREd to the receiver, and it stops when every job is done: result stored, Orthanc
metadata set and the Comprehensive SR stored by STOW-RS. Reported beside it, in the same run: the rate at
which the receiver acknowledged them (durably queued), each instance's time from receipt to done (p50, p95),
and the bare pipeline (``Pipeline.cluster`` on the same bytes, one thread, no queue, no PACS): the ratio is
what the queue, the DICOM transfer and the write-back cost. Sender, Orthanc and worker share the machine's
cores: compare ratios within a run. Needs the dev environment (it builds its instances with the test
helpers in tests/pacs) and Orthanc.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "pacs.json"


def _repository(name: str, scratch: Path) -> Path:
    from service.card import CARD_FILENAME

    bundled = ROOT / "model_repository"
    if name == "bundled" and (bundled / CARD_FILENAME).is_file():
        return bundled
    from tests.service.conftest import build_tiny_repository

    return build_tiny_repository(scratch / "tiny-repository")


def _bare_pipeline(repository: Path, data: list[bytes]) -> float:
    """Instances/s of Pipeline.cluster alone, one at a time, after a warm-up."""
    from service.pipeline import load_pipeline
    from service.settings import Settings

    pipeline = load_pipeline(Settings(model_repository=repository))
    for blob in data[:5]:
        pipeline.cluster([blob])
    t0 = time.perf_counter()
    for blob in data:
        pipeline.cluster([blob])
    return len(data) / (time.perf_counter() - t0)


def run(
    instances: int = 200, repository: str = "bundled", size: tuple[int, int] = (480, 640)
) -> dict[str, Any]:
    from tests.pacs.phantoms import IMAGE_KINDS, make_instance
    from tests.pacs.servers import Orthanc, WorkerProcess, cstore

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="fusc-bench-pacs-") as tmp:
        scratch = Path(tmp)
        repo = _repository(repository, scratch)
        batch = [
            make_instance(IMAGE_KINDS[i % len(IMAGE_KINDS)], 50_000 + i, size=size) for i in range(instances)
        ]
        worker = WorkerProcess(scratch, repo, env={})
        orthanc = Orthanc(scratch, receiver_port=worker.receiver_port)
        worker.env.update(
            {
                "FUSC_LOG_LEVEL": "INFO",
                "FUSC_PACS_ORTHANC_URL": orthanc.url,
                "FUSC_PACS_DICOMWEB_URL": orthanc.dicomweb,
                "FUSC_PACS_WRITEBACK": "metadata,sr",
                "FUSC_PACS_SR_STORE": "stow",
                "FUSC_PACS_WORKERS": "2",
            }
        )
        try:
            orthanc.start()
            for inst in batch:
                orthanc.upload(inst.data)
            worker.start()
            t0 = time.perf_counter()
            statuses = cstore(batch, worker.receiver_port)
            t_acked = time.perf_counter()
            if set(statuses.values()) != {0x0000}:
                raise RuntimeError(f"C-STORE statuses {set(statuses.values())}")
            counts = worker.wait_settled(expected=instances, timeout_s=1800)
            t_done = time.perf_counter()
            if counts["done"] != instances:
                raise RuntimeError(f"not every job is done: {counts}")
            queue = worker.queue()
            jobs = queue.jobs("done")
            queue.close()
            latency = np.array([j["updated_at"] - j["received_at"] for j in jobs])
        finally:
            worker.stop()
            orthanc.stop()
        bare = _bare_pipeline(repo, [i.data for i in batch])
    end_to_end = instances / (t_done - t0)
    kinds = {k: sum(1 for i in batch if i.kind == k) for k in IMAGE_KINDS}
    result = {
        "benchmark": "pacs",
        "what": "C-STORE to written-back result (Orthanc metadata + Comprehensive SR by STOW-RS)",
        "instances": instances,
        "kinds": kinds,
        "frame_size": list(size),
        "repository": repository if repo.name == "model_repository" else "tiny",
        "worker_threads": 2,
        "end_to_end_instances_per_s": round(end_to_end, 2),
        "cstore_acknowledged_per_s": round(instances / (t_acked - t0), 2),
        "seconds_total": round(t_done - t0, 2),
        "latency_s": {
            "p50": round(float(np.percentile(latency, 50)), 3),
            "p95": round(float(np.percentile(latency, 95)), 3),
        },
        "bare_pipeline_instances_per_s": round(bare, 2),
        "ratio_pacs_to_bare_pipeline": round(end_to_end / bare, 3),
        "machine": {
            "cores": len(os.sched_getaffinity(0)),
            "cpu": platform.processor() or platform.machine(),
            "load_average_start": [round(v, 2) for v in load_start],
            "load_average_end": [round(v, 2) for v in os.getloadavg()],
            "note": "sender, Orthanc and worker on the same shared cores",
        },
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pacs", description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--repository", choices=("bundled", "tiny"), default="bundled")
    parser.add_argument("--size", default="480x640", help="frame size HxW of the phantoms")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    height, width = (int(v) for v in args.size.lower().split("x"))
    result = run(args.instances, args.repository, (height, width))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
