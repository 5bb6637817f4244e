"""The model part of the benchmark, on any ONNX Runtime execution provider: backbone + head throughput at
batch 1 and batched, fp32 and int8, their agreement, the backbone's multiply-adds and the machine's measured
fp32 GEMM rate; and the Triton ``onnxruntime`` backend config for a GPU.

    python -m benchmarks.core [--providers cpu|cuda|tensorrt] [--inputs x.npy] [--out core.json]
                              [--triton-config DIR]

Only numpy, onnx and onnxruntime: it reads the model card as JSON (no pydantic, no service import), so the
same code runs on a GPU machine that has nothing of the service's runtime (benchmarks/gpu.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import onnxruntime as ort

        ort_version, providers = ort.__version__, ort.get_available_providers()
    except ImportError:
        ort_version, providers = None, []
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "nice": os.nice(0),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": ort_version,
        "providers": providers,
        "platform": platform.platform(),
    }


def card_json(repository: Path) -> dict[str, Any]:
    return json.loads((Path(repository) / "model_card.json").read_text())


def model_path(repository: Path, model: dict[str, Any]) -> Path:
    return Path(repository) / model["name"] / str(model.get("version", 1)) / "model.onnx"


# ------------------------------------------------------------------------------------------- machine
def gemm_rate(n: int = 2048, seconds: float = 3.0) -> dict[str, Any]:
    """numpy's fp32 matrix product (its BLAS, all the threads it takes) on n x n: GFLOP/s, best of runs."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
    a @ b  # warm-up
    best, runs, t0 = 0.0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or runs < 3:
        t = time.perf_counter()
        a @ b
        best = max(best, 2.0 * n**3 / (time.perf_counter() - t) / 1e9)
        runs += 1
    return {"n": n, "runs": runs, "gflop_per_s": round(best, 1), "blas_threads": "numpy default"}


def macs(path: Path, input_name: str, shape: tuple[int, ...]) -> dict[str, Any]:
    """Multiply-adds of one image through an ONNX model: every Conv, Gemm and MatMul, with the output shapes
    read from a real run (the graph computes its padding from shapes, so static inference cannot)."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    model = onnx.load(str(path))
    weights = {i.name: numpy_helper.to_array(i).shape for i in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    for n in nodes:
        model.graph.output.append(
            onnx.helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None)
        )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = session.run([n.output[0] for n in nodes], {input_name: np.zeros((1, *shape), np.float32)})
    total, by_op = 0, {}
    for node, out in zip(nodes, outs, strict=True):
        w = weights.get(node.input[1])
        if w is None:
            continue
        per_output = int(np.prod(w[1:])) if node.op_type == "Conv" else int(w[0])
        count = int(np.prod(out.shape)) * per_output
        total += count
        by_op[node.op_type] = by_op.get(node.op_type, 0) + count
    return {"macs_per_image": total, "gflop_per_image": round(2 * total / 1e9, 4), "by_op": by_op}


# --------------------------------------------------------------------------------------------- models
def session(path: Path, providers: list[str], threads: int = 0) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    available = set(ort.get_available_providers())
    return ort.InferenceSession(str(path), options, providers=[p for p in providers if p in available])


def _stats(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3)}


def throughput(run, x: np.ndarray, batch: int, seconds: float) -> dict[str, Any]:
    """Images/s of ``run`` on batches of ``batch`` rows of ``x`` (cycled), one call after another."""
    reps = int(np.ceil(batch / len(x)))
    xb = np.ascontiguousarray(np.concatenate([x] * reps)[:batch])
    run(xb)
    run(xb)  # warm-up: first calls allocate (and build engines on a GPU)
    lat, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < seconds or len(lat) < 5:
        t = time.perf_counter()
        run(xb)
        lat.append((time.perf_counter() - t) * 1e3)
    return {
        "batch": batch,
        "calls": len(lat),
        "images_per_s": round(batch * len(lat) / (sum(lat) / 1e3), 1),
    } | (_stats(lat))


def bench_models(
    repository: Path,
    x: np.ndarray,
    *,
    providers: list[str],
    seconds: float = 3.0,
    batches: tuple[int, ...] = (1, 32),
    threads: int = 0,
) -> dict[str, Any]:
    """Backbone + head of each precision the card lists, and int8's agreement with fp32 on ``x``."""
    card = card_json(repository)
    head = card["head"]
    head_s = session(model_path(repository, head), providers, threads)
    out: dict[str, Any] = {"providers_asked": providers, "model_version": card["version"]}
    embeddings: dict[str, np.ndarray] = {}
    for precision, key in (("fp32", "backbone"), ("int8", "backbone_int8")):
        bb = card.get(key)
        if not bb:
            out[precision] = {"skipped": f"the model card lists no {key}"}
            continue
        bb_s = session(model_path(repository, bb), providers, threads)

        def run(xb: np.ndarray, bb_s=bb_s, bb=bb) -> np.ndarray:
            emb = bb_s.run([bb["output_name"]], {bb["input_name"]: xb})[0]
            return head_s.run([head["output_name"]], {head["input_name"]: emb})[0]

        result: dict[str, Any] = {"providers_used": bb_s.get_providers()}
        for b in batches:
            result[f"batch_{b}"] = throughput(run, x, b, seconds)
        embeddings[precision] = np.concatenate(
            [
                bb_s.run([bb["output_name"]], {bb["input_name"]: x[i : i + 64]})[0]
                for i in range(0, len(x), 64)
            ]
        )
        out[precision] = result
    if len(embeddings) == 2:
        e32, e8 = embeddings["fp32"], embeddings["int8"]
        c32 = head_s.run([head["output_name"]], {head["input_name"]: e32})[0]
        c8 = head_s.run([head["output_name"]], {head["input_name"]: e8})[0]
        cos = (e32 * e8).sum(1) / np.maximum(np.linalg.norm(e32, axis=1) * np.linalg.norm(e8, axis=1), 1e-12)
        confident = c32.max(1) >= card.get("naming", {}).get("min_confidence", 0.9)
        same = c32.argmax(1) == c8.argmax(1)
        out["int8_vs_fp32"] = {
            "images": len(x),
            "cluster_agreement": round(float(same.mean()), 4),
            "cluster_agreement_confident": round(float(same[confident].mean()), 4)
            if confident.any()
            else None,
            "confident_images": int(confident.sum()),
            "cosine_mean": round(float(cos.mean()), 5),
            "cosine_min": round(float(cos.min()), 5),
        }
        best = max(batches)
        out["int8_speedup_batched"] = round(
            out["int8"][f"batch_{best}"]["images_per_s"] / out["fp32"][f"batch_{best}"]["images_per_s"], 3
        )
        out["int8_speedup_batch_1"] = round(
            out["int8"]["batch_1"]["images_per_s"] / out["fp32"]["batch_1"]["images_per_s"], 3
        )
    return out


# ------------------------------------------------------------------------------------ Triton on a GPU
def triton_gpu_config(
    card: dict[str, Any], model: dict[str, Any], *, max_batch_size: int, tensorrt: bool
) -> str:
    """config.pbtxt of the backbone on the NGC image's ``onnxruntime`` backend, on the GPU, with dynamic
    batching; with ``tensorrt`` its TensorRT execution accelerator (fp16; a QDQ model keeps its int8)."""
    size, d = card["preprocess"]["size"], card["embedding_dim"]
    lines = [
        f'name: "{model["name"]}"',
        'backend: "onnxruntime"',
        f"max_batch_size: {max_batch_size}",
        f'input [{{ name: "{model["input_name"]}" data_type: TYPE_FP32 dims: [1, {size}, {size}] }}]',
        f'output [{{ name: "{model["output_name"]}" data_type: TYPE_FP32 dims: [{d}] }}]',
        f"dynamic_batching {{ preferred_batch_size: [{max_batch_size // 2}, {max_batch_size}] "
        "max_queue_delay_microseconds: 500 }",
        "instance_group [{ kind: KIND_GPU count: 2 }]",
    ]
    if tensorrt:
        lines += [
            "optimization { execution_accelerators { gpu_execution_accelerator: [ {",
            '  name: "tensorrt"',
            '  parameters { key: "precision_mode" value: "FP16" }',
            '  parameters { key: "max_workspace_size_bytes" value: "1073741824" }',
            '  parameters { key: "trt_engine_cache_enable" value: "1" }',
            "} ] } }",
        ]
    lines.append(f'parameters {{ key: "fusc_sha256" value: {{ string_value: "{model["sha256"]}" }} }}')
    return "\n".join(lines) + "\n"


def write_triton_configs(
    repository: Path, out: Path, *, max_batch_size: int = 64, tensorrt: bool = True
) -> list[str]:
    card = card_json(repository)
    written = []
    for key in ("backbone", "backbone_int8"):
        model = card.get(key)
        if model:
            path = Path(out) / f"{model['name']}.config.pbtxt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(triton_gpu_config(card, model, max_batch_size=max_batch_size, tensorrt=tensorrt))
            written.append(str(path))
    return written


def synthetic_inputs(card: dict[str, Any], n: int = 256, seed: int = 0) -> np.ndarray:
    """Stand-ins for model inputs where no images are at hand: a bright disc on speckle, in [-1, 1]."""
    size = card["preprocess"]["size"]
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    x = np.empty((n, 1, size, size), np.float32)
    for i in range(n):
        cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.3)
        img = rng.uniform(0, 0.4, (size, size)) + 0.5 * (((yy - cy) ** 2 + (xx - cx) ** 2) < r**2)
        x[i, 0] = np.clip(img, 0, 1) * 2 - 1
    return x


def _or_skip(fn, *args) -> dict[str, Any]:
    try:
        return fn(*args)
    except ImportError as exc:
        return {"skipped": f"{exc.name} is not installed"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.core", description=__doc__.splitlines()[0])
    ap.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    ap.add_argument("--providers", choices=sorted(PROVIDERS), default="cpu")
    ap.add_argument("--inputs", type=Path, help=".npy of model inputs [N,1,S,S] (default: synthetic)")
    ap.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "core.json")
    ap.add_argument("--triton-config", type=Path, help="write the GPU onnxruntime-backend configs here")
    args = ap.parse_args(argv)

    card = card_json(args.repository)
    inputs = "synthetic"
    if args.inputs and args.inputs.is_file():
        x, inputs = np.load(args.inputs).astype(np.float32), str(args.inputs)
    else:
        x = synthetic_inputs(card)
    size = card["preprocess"]["size"]
    bb = card["backbone"]
    result: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "inputs": {"source": inputs, "images": len(x)},
        "gemm_fp32": gemm_rate(),
        "backbone_macs": _or_skip(macs, model_path(args.repository, bb), bb["input_name"], (1, size, size)),
        "models": bench_models(
            args.repository,
            x,
            providers=PROVIDERS[args.providers],
            seconds=args.seconds,
            batches=tuple(args.batches),
        ),
    }
    if args.triton_config:
        result["triton_configs"] = write_triton_configs(args.repository, args.triton_config)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["models"], indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
