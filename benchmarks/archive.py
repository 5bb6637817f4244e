"""Archive runs on this machine: the process pool against one process, measured in the same run (alternating,
on the same images); and, for a finished run, its agreement with the HTTP service and the recall of its
IVF-PQ similar-image index.

    python -m benchmarks.archive [--images 2000] [--repeats 3]   -> benchmarks/results/archive.json
    python -m benchmarks.archive agree RUN_DIR [--n 200] [--out FILE.json]
    python -m benchmarks.archive recall RUN_DIR [--queries 500] [--out FILE.json]

The throughput images come from benchmarks.make_archive (phantoms as PNG and DICOM, real images of
../shared/data when present, a few corrupt files). Images/s are measured over whole sessions (worker
start-up and model loading included, listing and consolidation not) and steadily (after each engine's first
committed chunk); the target is about the steady ratio, as an archive is long enough to hide the start.
On a machine shared with other work the figures are noisy: the load average is recorded before and after,
and only the ratio within one run means much.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import make_archive
from service.archive import store
from service.archive.run import RunOptions, run_archive
from service.settings import DEFAULT_MODEL_REPOSITORY, available_cores

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "archive.json"


def _shown(path: Path) -> str:
    """A path as a result file records it: relative to the project when inside it (no machine's layout)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


TARGET_POOL_OVER_SINGLE = 1.7


def _one(source: Path, out: Path, workers: int, repo: Path) -> dict[str, Any]:
    opts = RunOptions(
        out=out, model_repository=repo, workers=workers, map_method="none", report=False, progress=False
    )
    t0 = time.perf_counter()
    manifest = run_archive(str(source), opts)
    wall = time.perf_counter() - t0
    (session,) = manifest.extra["sessions"]
    return {
        "workers": workers,
        "images": session["images"],
        "session_s": session["seconds"],
        "images_per_s": session["images_per_s"],
        "steady_images_per_s": session.get("steady_images_per_s"),
        "start_s": session.get("first_part_s"),
        "wall_s_with_listing_and_consolidation": round(wall, 2),
    }


def throughput(images: int, repeats: int, workers: int, repo: Path, data: Path | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fusc-archive-bench-") as tmp:
        src = Path(tmp) / "src"
        n_real = images // 4 if data is not None and Path(data).is_dir() else 0
        counts = make_archive.build(
            src,
            phantoms=images - n_real - images // 10,
            phantom_dicom=images // 10,
            real=data if n_real else None,
            real_limit=n_real,
            real_dicom=min(20, n_real),
            seed=5,
            progress=False,
        )
        load_before = os.getloadavg()
        runs: list[dict[str, Any]] = []
        for r in range(repeats):
            for w in (1, workers) if r % 2 == 0 else (workers, 1):  # alternate the order, against drift
                runs.append({"repeat": r, **_one(src, Path(tmp) / f"run-{r}-{w}", w, repo)})
        load_after = os.getloadavg()

    def median(key: str, w: int) -> float:
        return statistics.median(x[key] for x in runs if x["workers"] == w)

    single, pool = median("images_per_s", 1), median("images_per_s", workers)
    steady_single, steady_pool = median("steady_images_per_s", 1), median("steady_images_per_s", workers)
    ratio = steady_pool / steady_single
    return {
        "images": counts,
        "workers": workers,
        "ort_threads_per_worker": 1,
        # Steady: after each engine's first committed chunk (its workers started, models loaded).
        "single_process_steady_images_per_s": round(steady_single, 2),
        "pool_steady_images_per_s": round(steady_pool, 2),
        "pool_over_single": round(ratio, 3),
        # Whole sessions, start-up included (a pool spawns its workers and loads the model in each).
        "single_process_images_per_s": round(single, 2),
        "pool_images_per_s": round(pool, 2),
        "pool_over_single_with_start_up": round(pool / single, 3),
        "target_pool_over_single": TARGET_POOL_OVER_SINGLE,
        "meets_target": ratio >= TARGET_POOL_OVER_SINGLE,
        "runs": runs,
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in load_after],
    }


def agree(run_dir: Path, n: int = 200, seed: int = 0) -> dict[str, Any]:
    """``n`` random items of a finished run, and every failed one (up to 100), posted to the real local
    service on the run's model repository: cluster ids (or error codes) compared one by one."""
    import httpx

    from service.archive.report import spec_of
    from service.archive.sources import Reader
    from service.localserver import run_service

    run = store.load_run(run_dir)
    rows = run.table.to_pylist()
    sample = random.Random(seed).sample(range(len(rows)), min(n, len(rows)))
    # Failed items are rare in a real archive: all of them (up to 100) are compared too, by error code.
    failed = [i for i, r in enumerate(rows) if r["error_code"] is not None and i not in set(sample)]
    sample += failed[:100]
    reader = Reader(spec_of(run.manifest), max_bytes=64 * 2**20)
    same = differ = 0
    mismatches = []
    with run_service(Path(run.manifest.model_repository)) as server, httpx.Client(timeout=60) as client:
        for i in sample:
            row = rows[i]
            data = reader.read(row["source"])
            r = client.post(
                f"{server.url}/v1/cluster", files={"image": ("x", data, "application/octet-stream")}
            )
            body = r.json()
            got = body["cluster"] if r.status_code == 200 else body["error"]["code"]
            want = row["cluster"] if row["error_code"] is None else row["error_code"]
            if got == want:
                same += 1
            else:
                differ += 1
                mismatches.append({"row": i, "archive": want, "http": got})
    return {
        "run_model_version": run.manifest.model_version,
        "sample": len(sample),
        "answered_in_sample": sum(rows[i]["error_code"] is None for i in sample),
        "failed_in_sample": sum(rows[i]["error_code"] is not None for i in sample),
        "identical": same,
        "different": differ,
        "mismatches": mismatches[:20],
        "compared": "cluster id of answered items, error code of failed ones (POST /v1/cluster, one each)",
    }


def recall(run_dir: Path, queries: int = 500, seed: int = 0) -> dict[str, Any]:
    """recall@10 of the IVF-PQ index against exact search on the run's own embeddings (each query's own
    row left out of both lists); leaves the index of the size's own choice in place."""
    from service.archive.similar import SimilarIndex, build_index, choose_kind

    run = store.load_run(run_dir)
    emb = np.asarray(run.embeddings, np.float32)
    q = np.random.default_rng(seed).choice(len(emb), min(queries, len(emb)), replace=False)
    out: dict[str, Any] = {"count": len(emb), "dim": int(emb.shape[1]), "queries": len(q)}
    results = {}
    for kind in ("flat", "ivfpq"):
        t0 = time.perf_counter()
        meta = build_index(run_dir, kind=kind)
        build_s = time.perf_counter() - t0
        index = SimilarIndex.load(run_dir)
        t0 = time.perf_counter()
        _, ids = index.search_ids(emb[q], 11)
        per_query_ms = (time.perf_counter() - t0) * 1000 / len(q)
        results[kind] = ids
        if kind == "ivfpq":  # the compressed codes alone, without the exact re-ranking, for comparison
            _, raw = index.index.search(np.ascontiguousarray(emb[q]), 11)
            results["ivfpq_codes_only"] = raw
        out[kind] = {
            "build_s": round(build_s, 2),
            "search_ms_per_query": round(per_query_ms, 3),
            **{k: v for k, v in meta.model_dump().items() if k in ("nlist", "m", "nbits", "nprobe")},
            "index_bytes": (Path(run_dir) / "index" / "index.faiss").stat().st_size,
        }
    for name, key in (("ivfpq", "ivfpq_recall_at_10"), ("ivfpq_codes_only", "ivfpq_codes_only_recall_at_10")):
        hits = []
        for row, approx, exact in zip(q, results[name], results["flat"], strict=True):
            a = [i for i in approx if i != row][:10]
            e = [i for i in exact if i != row][:10]
            hits.append(len(set(a) & set(e)) / 10)
        out[key] = round(float(np.mean(hits)), 4)
    out["target"] = 0.95
    build_index(run_dir, kind=choose_kind(len(emb)))
    return out


def _write(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.archive", description=__doc__.splitlines()[0])
    ap.add_argument("command", nargs="?", choices=("throughput", "agree", "recall"), default="throughput")
    ap.add_argument("run", nargs="?", type=Path, help="a finished run folder (agree, recall)")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=max(2, available_cores()))
    ap.add_argument("--model-repository", type=Path, default=DEFAULT_MODEL_REPOSITORY)
    ap.add_argument("--data", type=Path, default=make_archive.DEFAULT_DATA)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    machine = {"cores": available_cores(), "cpu_count": os.cpu_count()}
    stamp = datetime.now(timezone.utc).isoformat()
    if args.command == "agree":
        result = {"when": stamp, "machine": machine, **agree(args.run, args.n)}
    elif args.command == "recall":
        result = {"when": stamp, "machine": machine, **recall(args.run, args.queries)}
    else:
        result = {
            "when": stamp,
            "machine": machine,
            "model_repository": _shown(args.model_repository),
            **throughput(args.images, args.repeats, args.workers, args.model_repository, args.data),
        }
    _write(result, args.out or (RESULT if args.command == "throughput" else Path(f"{args.command}.json")))
    print(json.dumps({k: v for k, v in result.items() if k not in ("runs", "mismatches")}, indent=2))
    return result


if __name__ == "__main__":
    main()
