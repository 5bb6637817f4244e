"""`make bench`: the whole data path on real images, every ratio measured in one run; writes
benchmarks/results/bench.json and docs/benchmarks.md.

    python -m benchmarks.run [--data ../shared/data] [--per-set 80] [--http-s 12]
                             [--skip-http] [--skip-triton]

1. decode + clean per image on one core (the service's functions; clean also at full size, for the ratio);
2. the per-image PyTorch eager pipeline a researcher would write for the same model (benchmarks/eager.py);
3. ONNX Runtime backbone + head, batch 1 and batched, fp32 and int8, and int8's agreement with fp32
   (benchmarks/core.py); the backbone's multiply-adds against the machine's measured fp32 GEMM rate;
4. the service over HTTP (`bentoml serve`, a closed loop of callers at concurrency 1, 16 and 64; int8 at 64);
5. Triton over HTTP and gRPC (the CPU tritonserver of .venv-triton, when there): backbone + head through the
   service's Triton backend, and the ensemble with encoded bytes over gRPC.

The client runs on the same cores as the server; on a machine shared with other work (load average above
1.5 at the start) the figures are noisy: compare the ratios measured within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import core
from service.clean import CleanConfig, clean_frame, preprocess
from service.decode import decode_image

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"
SETS = {"hc18": "hc18/images", "fetal_planes_db": "fetal_planes_db/images"}
INPUTS_NPY = ROOT / "build" / "bench_inputs.npy"  # model inputs of this run, for benchmarks/gpu.sh
SHARED_LOAD = 1.5
TARGETS = {
    "service_over_eager": 5.0,
    "http_over_single_core_decode_clean": 1.6,
    "int8_cluster_agreement": 0.99,
    "archive_pool_over_single": 1.7,
}


def _stats(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {
        "n": len(ms),
        "p50_ms": round(float(np.percentile(a, 50)), 3),
        "p95_ms": round(float(np.percentile(a, 95)), 3),
        "mean_ms": round(float(a.mean()), 3),
    }


def _timed(fn, *args) -> tuple[object, float]:
    t = time.perf_counter()
    out = fn(*args)
    return out, (time.perf_counter() - t) * 1e3


def bench_images(files: list[bytes], cfg: CleanConfig) -> dict:
    """decode + clean of each file on this (one) thread; clean at full size too, for the ratio."""
    full = cfg.model_copy(update={"work_size": 1 << 14})  # never shrinks: the whole path at full size
    decode_ms, clean_ms, clean_full_ms, total_ms = [], [], [], []
    for data in files:
        frame, d = _timed(decode_image, data)
        _, c = _timed(clean_frame, frame, cfg)
        _, cf = _timed(clean_frame, frame, full)
        decode_ms.append(d)
        clean_ms.append(c)
        clean_full_ms.append(cf)
        total_ms.append(d + c)
    work, fullres = _stats(clean_ms), _stats(clean_full_ms)
    return {
        "images": len(files),
        "decode": _stats(decode_ms),
        "clean": work,
        "clean_full_size": fullres,
        "decode_plus_clean": _stats(total_ms),
        "images_per_s_decode_plus_clean": round(1e3 / float(np.mean(total_ms)), 2),
        "ratio_clean_full_over_work_p50": round(fullres["p50_ms"] / work["p50_ms"], 3),
    }


def pick_files(data: Path, per_set: int) -> dict[str, list[bytes]]:
    """Evenly spaced real images of each set; phantom PNGs when there are none."""
    out: dict[str, list[bytes]] = {}
    for name, sub in SETS.items():
        paths = sorted((data / sub).glob("*.png")) if (data / sub).is_dir() else []
        if paths:
            step = max(1, len(paths) // per_set)
            out[name] = [p.read_bytes() for p in paths[::step][:per_set]]
    if not out:
        import tempfile

        from training.data.phantoms import generate_dataset

        with tempfile.TemporaryDirectory() as tmp:
            folder = generate_dataset(tmp, per_set, seed=303, progress=False) / "images"
            out["phantoms"] = [p.read_bytes() for p in sorted(folder.glob("*.png"))]
    return out


# ------------------------------------------------------------------------------------------- HTTP
def bench_http(
    repository: Path, files: list[bytes], concurrencies: list[int], seconds: float, env: dict[str, str]
) -> dict[str, Any]:
    from benchmarks.load import closed_loop
    from benchmarks.server import scratch, serve

    out: dict[str, Any] = {"settings_env": env}
    with serve(repository, scratch(), env) as server:
        asyncio.run(closed_loop(server.url, files, 16, 4.0))  # warm-up: thread pools, first batches
        for c in concurrencies:
            asyncio.run(closed_loop(server.url, files, c, 2.0))
            t0 = time.perf_counter()
            answers = asyncio.run(closed_loop(server.url, files, c, seconds))
            elapsed = time.perf_counter() - t0
            ok = [a["s"] for a in answers if a["status"] == 200]
            out[f"concurrency_{c}"] = {
                "seconds": round(elapsed, 1),
                "answers": len(answers),
                "ok": len(ok),
                "images_per_s": round(len(ok) / elapsed, 2),
                "p50_ms": round(float(np.percentile(ok, 50)) * 1e3, 1) if ok else None,
                "p99_ms": round(float(np.percentile(ok, 99)) * 1e3, 1) if ok else None,
            }
            print(f"  http c={c}: {out[f'concurrency_{c}']['images_per_s']} img/s", flush=True)
    return out


# ----------------------------------------------------------------------------------------- Triton
def _closed_loop_threads(call, items: list, concurrency: int, seconds: float) -> dict[str, Any]:
    done: list[float] = []
    errors = [0]
    deadline = time.perf_counter() + seconds

    def worker(k: int) -> None:
        i = k
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            try:
                call(items[i % len(items)])
                done.append(time.perf_counter() - t)
            except Exception:
                errors[0] += 1
            i += concurrency

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    return {
        "concurrency": concurrency,
        "calls_per_s": round(len(done) / elapsed, 2),
        "errors": errors[0],
        "p50_ms": round(float(np.percentile(done, 50)) * 1e3, 1) if done else None,
    }


def bench_triton(repository: Path, x: np.ndarray, files: list[bytes], seconds: float) -> dict[str, Any]:
    from service.backends import TritonBackend
    from service.card import load_card
    from service.triton.repository import BYTES_INPUT, PIPELINE_NAME, TritonRepositoryOptions
    from service.triton.repository import write_triton_repository as write_repo
    from service.triton.server import TritonServerError, default_venv, inspect_venv, start_cpu_server

    try:
        venv = inspect_venv(default_venv().resolve()).root
    except TritonServerError as exc:
        return {"skipped": f"no CPU tritonserver: {exc}"}
    from benchmarks.server import scratch

    work = scratch()
    repo = work / "triton-cpu"
    write_repo(repository, repo, TritonRepositoryOptions(variant="cpu", max_batch_size=64), force=True)
    card = load_card(repo)
    server = start_cpu_server(repo, venv=venv, workdir=work / "server")
    out: dict[str, Any] = {"server": "PyPI tritonserver (CPU, Python backend running ONNX Runtime)"}
    try:
        for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
            backend = TritonBackend(card, url=url, protocol=protocol, max_batch_size=64)
            backend.ready()
            r: dict[str, Any] = {}
            for batch in (1, 32):

                def run(xb: np.ndarray, backend=backend) -> np.ndarray:
                    return backend.assign(backend.embed(xb))

                r[f"batch_{batch}"] = core.throughput(run, x, batch, seconds)
            r["concurrency_16_batch_1"] = _closed_loop_threads(
                lambda xi, backend=backend: backend.assign(backend.embed(xi[None])), list(x), 16, seconds
            )
            out[protocol] = r
            print(
                f"  triton {protocol}: b1 {r['batch_1']['images_per_s']} b32 {r['batch_32']['images_per_s']}"
            )
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(server.grpc_url)

        def ensemble(data: bytes) -> None:
            batch = np.array([[data]], dtype=object)
            inp = grpcclient.InferInput(BYTES_INPUT, list(batch.shape), "BYTES")
            inp.set_data_from_numpy(batch)
            client.infer(PIPELINE_NAME, [inp], client_timeout=60)

        ensemble(files[0])
        out["grpc_ensemble_bytes"] = _closed_loop_threads(ensemble, files, 16, seconds)
        out["grpc_ensemble_bytes"]["note"] = (
            "encoded bytes -> fusc_preprocess (1 instance) -> backbone -> head"
        )
    finally:
        server.stop()
    return out


# ------------------------------------------------------------------------------------------- main
def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def summarize(r: dict[str, Any]) -> dict[str, Any]:
    """The ratios and the targets, from the figures of this run."""
    pre = r["preprocess"]
    single_core = pre["single_core_decode_plus_clean_images_per_s"]
    models = r["onnxruntime"]
    fp32 = models.get("fp32", {})
    best_batch = max((k for k in fp32 if k.startswith("batch_")), key=lambda k: int(k[6:]), default=None)
    fp32_batched = fp32[best_batch]["images_per_s"] if best_batch else None
    http = r.get("http", {})
    http_best = max(
        (v["images_per_s"] for k, v in http.items() if k.startswith("concurrency_")), default=None
    )
    eager = r.get("eager", {})
    gflop = r["backbone_macs"]["gflop_per_image"]
    gemm = r["gemm_fp32"]["gflop_per_s"]
    achieved = {
        k: round(gflop * models[k][best_batch]["images_per_s"], 1)
        for k in ("fp32", "int8")
        if best_batch and best_batch in models.get(k, {})
    }
    model_ms = 1e3 / fp32_batched if fp32_batched else None
    pre_ms = 1e3 / single_core
    agreement = models.get("int8_vs_fp32", {}).get("cluster_agreement")
    cores = r["machine"].get("cores_available") or r["machine"].get("cores") or 1
    s = {
        "single_core_decode_plus_clean_images_per_s": single_core,
        "eager_images_per_s": eager.get("images_per_s"),
        "onnx_fp32_batched_images_per_s": fp32_batched,
        "http_best_images_per_s": http_best,
        "service_over_eager": _ratio(http_best, eager.get("images_per_s")),
        # The most any service could reach here: decode + clean on every core, HTTP and the model for free.
        "service_over_eager_bound": _ratio(cores * single_core, eager.get("images_per_s")),
        "http_over_single_core_decode_clean": _ratio(http_best, single_core),
        "int8_cluster_agreement": agreement,
        "int8_speedup_batched": models.get("int8_speedup_batched"),
        "backbone_gflop_per_image": gflop,
        "gemm_fp32_gflop_per_s": gemm,
        "achieved_gflop_per_s": achieved,
        # int8 against the fp32 GEMM rate is a speed ratio, not a fraction of int8's own limit.
        "fraction_of_fp32_gemm": {k: round(v / gemm, 3) for k, v in achieved.items()},
        "preprocess_share_service": round(pre_ms / (pre_ms + model_ms), 3) if model_ms else None,
        "preprocess_share_eager": eager.get("preprocess_share"),
        "pacs_instances_per_s": r.get("pacs", {}).get("end_to_end_instances_per_s"),
        "archive_pool_images_per_s": r.get("archive", {}).get("pool_steady_images_per_s"),
        "archive_single_process_images_per_s": r.get("archive", {}).get("single_process_steady_images_per_s"),
        "archive_pool_over_single": r.get("archive", {}).get("pool_over_single"),
    }
    s["targets"] = {
        name: {"target": t, "measured": s[name], "met": None if s[name] is None else bool(s[name] >= t)}
        for name, t in TARGETS.items()
    }
    return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench.json")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="folder holding hc18/ and fetal_planes_db/"
    )
    ap.add_argument("--per-set", type=int, default=80, help="images per data set (evenly spaced)")
    ap.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    ap.add_argument("--model-s", type=float, default=3.0, help="seconds per ONNX Runtime measurement")
    ap.add_argument("--http-s", type=float, default=12.0, help="seconds per HTTP concurrency")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--skip-triton", action="store_true")
    ap.add_argument("--skip-pacs", action="store_true", help="the PACS path (needs Debian's Orthanc)")
    ap.add_argument("--skip-archive", action="store_true", help="archive runs: pool against one process")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    from service.card import load_card

    repo = args.model_repository
    card = load_card(repo, verify=True)
    cfg = card.preprocess
    m = core.machine()
    result: dict[str, Any] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": m,
        "shared_machine": bool(m["load_average"] and m["load_average"][0] > SHARED_LOAD),
        "model": {"version": card.version, "input_size": cfg.size, "arch": card.provenance.backbone_arch},
        "skipped": [],
    }
    print(f"load average at start: {m['load_average']}", flush=True)

    # 1. decode + clean, one core
    sets = pick_files(args.data, args.per_set)
    if "phantoms" in sets:
        result["skipped"].append(f"real images: none under {args.data}; phantoms instead")
    files = [f for fs in sets.values() for f in fs]
    result["datasets"] = {name: bench_images(fs, cfg) for name, fs in sets.items()}
    all_ms = [result["datasets"][n]["decode_plus_clean"]["mean_ms"] * len(fs) for n, fs in sets.items()]
    result["preprocess"] = {
        "images": len(files),
        "single_core_decode_plus_clean_images_per_s": round(1e3 * len(files) / sum(all_ms), 2),
    }
    print(f"decode+clean: {result['preprocess']}", flush=True)
    x = np.stack([preprocess(decode_image(f), cfg) for f in files]).astype(np.float32)
    INPUTS_NPY.parent.mkdir(parents=True, exist_ok=True)
    np.save(INPUTS_NPY, x)

    # 2. the eager PyTorch pipeline
    from benchmarks import eager

    why = eager.available()
    if why is None:
        result["eager"] = eager.bench_eager(files, repo)
        print(f"eager: {result['eager']['images_per_s']} img/s", flush=True)
    else:
        result["eager"] = {"skipped": why}
        result["skipped"].append(f"eager: {why}")

    # 3. ONNX Runtime, GEMM, multiply-adds
    result["gemm_fp32"] = core.gemm_rate()
    bb = card.backbone
    result["backbone_macs"] = core.macs(bb.path(repo), bb.input_name, (1, cfg.size, cfg.size))
    result["onnxruntime"] = core.bench_models(repo, x, providers=core.PROVIDERS["cpu"], seconds=args.model_s)
    print(f"onnxruntime: {json.dumps(result['onnxruntime'].get('int8_vs_fp32'))}", flush=True)

    # 4. HTTP
    if args.skip_http:
        result["skipped"].append("http: --skip-http")
    else:
        result["http"] = bench_http(repo, files, args.concurrency, args.http_s, {})
        if card.backbone_int8 is not None:
            result["http_int8"] = bench_http(
                repo, files, [max(args.concurrency)], args.http_s, {"FUSC_PRECISION": "int8"}
            )

    # 5. Triton
    if args.skip_triton:
        result["skipped"].append("triton: --skip-triton")
    else:
        result["triton"] = bench_triton(repo, x, files, seconds=4.0)
        if "skipped" in result["triton"]:
            result["skipped"].append(f"triton: {result['triton']['skipped']}")

    # 6. The PACS path: C-STORE to written-back result, against a real Orthanc (its own JSON as well)
    if args.skip_pacs:
        result["skipped"].append("pacs: --skip-pacs")
    elif shutil.which("Orthanc") is None:
        result["skipped"].append("pacs: no Orthanc on this machine (Debian package orthanc)")
    else:
        from benchmarks import pacs

        result["pacs"] = pacs.main([])
        print(f"pacs: {result['pacs'].get('end_to_end_instances_per_s')} instances/s", flush=True)

    # 7. Archive runs: the process pool against one process, same images, alternating repeats
    if args.skip_archive:
        result["skipped"].append("archive: --skip-archive")
    else:
        from benchmarks import archive

        result["archive"] = archive.main(["--images", "1000", "--repeats", "2"])
        print(f"archive: pool / single {result['archive'].get('pool_over_single')}", flush=True)

    result["summary"] = summarize(result)
    result["machine"]["load_average_end"] = core.machine()["load_average"]
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    from benchmarks.report import write_report

    write_report(result, args.doc, card)
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {args.out} and {args.doc} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
