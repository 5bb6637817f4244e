"""Timings of the data path on real images: decode, clean (at work size and at full size, same run), and
ONNX Runtime embed+assign throughput of the bundled model; writes one JSON file.

    python -m benchmarks.run [--out benchmarks/results/latest.json] [--data ../shared/data] [--per-set 150]

Numbers from a shared or loaded machine are noisy: compare the ratios measured within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from service.clean import CleanConfig, clean_frame, preprocess
from service.decode import decode_image

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"
SETS = {"hc18": "hc18/images", "fetal_planes_db": "fetal_planes_db/images"}


def machine() -> dict:
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
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "onnxruntime": ort_version,
        "providers": providers,
        "platform": platform.platform(),
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


def bench_images(paths: list[Path], cfg: CleanConfig) -> dict:
    full = cfg.model_copy(update={"work_size": 1 << 14})  # never shrinks: the whole path at full size
    decode_ms, clean_ms, clean_full_ms, total_ms = [], [], [], []
    for path in paths:
        data = path.read_bytes()
        frame, d = _timed(decode_image, data)
        _, c = _timed(clean_frame, frame, cfg)
        _, cf = _timed(clean_frame, frame, full)
        decode_ms.append(d)
        clean_ms.append(c)
        clean_full_ms.append(cf)
        total_ms.append(d + c)
    work, fullres = _stats(clean_ms), _stats(clean_full_ms)
    return {
        "images": len(paths),
        "decode": _stats(decode_ms),
        "clean": work,
        "clean_full_size": fullres,
        "decode_plus_clean": _stats(total_ms),
        "images_per_s_decode_plus_clean": round(1e3 / float(np.mean(total_ms)), 2),
        "ratio_clean_full_over_work_p50": round(fullres["p50_ms"] / work["p50_ms"], 3),
    }


def bench_onnx(repository: Path, frames: list[np.ndarray], seconds: float = 6.0) -> dict:
    import onnxruntime as ort

    from service.card import load_card

    card = load_card(repository)
    opts = ort.SessionOptions()
    backbone = ort.InferenceSession(
        str(card.backbone.path(repository)), opts, providers=["CPUExecutionProvider"]
    )
    head = ort.InferenceSession(str(card.head.path(repository)), opts, providers=["CPUExecutionProvider"])
    x_all = np.stack([preprocess(f, card.preprocess) for f in frames])  # [N,1,S,S]

    def run(batch: np.ndarray) -> np.ndarray:
        emb = backbone.run([card.backbone.output_name], {card.backbone.input_name: batch})[0]
        return head.run([card.head.output_name], {card.head.input_name: emb})[0]

    out = {"model_version": card.version, "input_size": card.preprocess.size, "clusters": card.num_clusters}
    for bs in (1, 32):
        reps = int(np.ceil(bs / len(x_all)))
        batch = np.concatenate([x_all] * reps)[:bs]
        run(batch)  # warm-up: first call allocates
        lat, done, t0 = [], 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 2 or len(lat) < 3:
            _, ms = _timed(run, batch)
            lat.append(ms)
            done += bs
        out[f"batch_{bs}"] = {**_stats(lat), "images_per_s": round(done / (sum(lat) / 1e3), 1)}
    out["ratio_throughput_b32_over_b1"] = round(
        out["batch_32"]["images_per_s"] / out["batch_1"]["images_per_s"], 3
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "latest.json")
    ap.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="folder holding hc18/ and fetal_planes_db/"
    )
    ap.add_argument("--per-set", type=int, default=150, help="images timed per data set (evenly spaced)")
    ap.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    args = ap.parse_args(argv)

    # Time the preprocessing the served model really uses; the defaults when there is no model.
    card_path = args.model_repository / "model_card.json"
    if card_path.is_file():
        from service.card import load_card

        cfg = load_card(args.model_repository, verify=False).preprocess
    else:
        cfg = CleanConfig()
    result: dict = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "clean_config": {"size": cfg.size, "work_size": cfg.work_size},
        "datasets": {},
        "skipped": [],
        "note": "timings on a shared machine are noisy; compare ratios taken in the same run",
    }
    frames: list[np.ndarray] = []
    for name, sub in SETS.items():
        folder = args.data / sub
        paths = sorted(folder.glob("*.png")) if folder.is_dir() else []
        if not paths:
            result["skipped"].append(f"{name}: no images under {folder}")
            print(f"skip {name}: no images under {folder}")
            continue
        step = max(1, len(paths) // args.per_set)
        chosen = paths[::step][: args.per_set]
        print(f"{name}: timing decode + clean on {len(chosen)} of {len(paths)} images")
        result["datasets"][name] = bench_images(chosen, cfg)
        frames += [decode_image(p.read_bytes()) for p in chosen[:8]]

    card = args.model_repository / "model_card.json"
    if card.is_file() and frames:
        print(f"ONNX Runtime embed+assign on {args.model_repository}")
        result["onnx"] = bench_onnx(args.model_repository, frames)
    else:
        why = "no images to feed it" if card.is_file() else f"no {card}"
        result["skipped"].append(f"onnx: {why}")
        print(f"skip onnx: {why}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, r in result["datasets"].items():
        print(
            f"{name}: decode p50 {r['decode']['p50_ms']} ms, clean p50 {r['clean']['p50_ms']} ms "
            f"(full size {r['clean_full_size']['p50_ms']} ms, x{r['ratio_clean_full_over_work_p50']}), "
            f"{r['images_per_s_decode_plus_clean']} img/s"
        )
    if "onnx" in result:
        o = result["onnx"]
        print(f"onnx: b1 {o['batch_1']['images_per_s']} img/s, b32 {o['batch_32']['images_per_s']} img/s")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
