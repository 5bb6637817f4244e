"""The per-image PyTorch pipeline a researcher would write for the same model: the baseline of `make bench`.

PIL decodes each file, the project's own ``clean_frame`` + ``normalize`` clean it (the card's settings), and
the torch EfficientNet-Lite (training/models/efficientnet.py) with the bundled run's weights
(``runs/bundled/checkpoint.pt``: backbone and cluster head) embeds and assigns it, one image at a time, in
eager mode under ``torch.inference_mode``. Its answers are checked against the ONNX models of the card, so
that the comparison is with the same model, not a lookalike.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = ROOT / "runs" / "bundled" / "checkpoint.pt"


class EagerModel:
    """normalize(backbone(x)) -> softmax(head(.)): what training/export.py exports, in torch."""

    def __init__(self, checkpoint: Path, arch: str) -> None:
        import torch

        from training.models.efficientnet import EfficientNetLite

        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        self.torch = torch
        self.backbone = EfficientNetLite(arch).eval()
        self.backbone.load_state_dict(state["backbone"], strict=True)
        head = state["head"]
        self.head = torch.nn.Linear(head["weight"].shape[1], head["weight"].shape[0]).eval()
        self.head.load_state_dict(head, strict=True)

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            emb = torch.nn.functional.normalize(self.backbone(torch.from_numpy(x)), dim=1)
            probs = torch.softmax(self.head(emb), dim=1)
        return emb.numpy(), probs.numpy()


def pil_decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("L"), dtype=np.uint8)


def available(checkpoint: Path = DEFAULT_CHECKPOINT) -> str | None:
    """None when the eager pipeline can run; else why not."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return "torch is not installed (make setup-dev)"
    if not Path(checkpoint).is_file():
        return f"no run checkpoint at {checkpoint} (made by `make train-bundled`)"
    return None


def bench_eager(
    files: list[bytes], repository: Path, checkpoint: Path = DEFAULT_CHECKPOINT, *, max_images: int = 100
) -> dict[str, Any]:
    """Images/s of the eager pipeline over ``files`` (one at a time), its stage times, and its agreement with
    the card's ONNX models on the same cleaned inputs."""
    import torch

    from benchmarks.core import card_json, model_path, session
    from service.clean import CleanConfig, clean_frame, normalize

    card = card_json(repository)
    cfg = CleanConfig.model_validate(card["preprocess"])
    arch = card.get("provenance", {}).get("backbone_arch") or "efficientnet-lite0"
    model = EagerModel(checkpoint, arch)
    files = files[:max_images]
    x0 = normalize(clean_frame(pil_decode(files[0]), cfg), cfg)[None]
    # torch's default intra-op threads (one per core) or one: whichever is faster here is the baseline (on a
    # machine shared with other work, two spinning OpenMP threads can be 100x slower than one).
    probe = {}
    for threads in sorted({torch.get_num_threads(), 1}, reverse=True):
        torch.set_num_threads(threads)
        model(x0)
        t = time.perf_counter()
        for _ in range(5):
            model(x0)
        probe[threads] = round((time.perf_counter() - t) / 5 * 1e3, 2)
    torch.set_num_threads(min(probe, key=probe.get))
    stages: dict[str, list[float]] = {"decode": [], "clean": [], "model": []}
    inputs, outputs = [], []
    t_start = time.perf_counter()
    for data in files:
        t0 = time.perf_counter()
        frame = pil_decode(data)
        t1 = time.perf_counter()
        x = normalize(clean_frame(frame, cfg), cfg)[None]
        t2 = time.perf_counter()
        emb, probs = model(x)
        t3 = time.perf_counter()
        stages["decode"].append((t1 - t0) * 1e3)
        stages["clean"].append((t2 - t1) * 1e3)
        stages["model"].append((t3 - t2) * 1e3)
        inputs.append(x[0])
        outputs.append((emb[0], probs[0]))
    elapsed = time.perf_counter() - t_start
    # The same model? The card's ONNX backbone + head on the very same inputs.
    x = np.stack(inputs)
    bb, head = card["backbone"], card["head"]
    onnx_emb = session(model_path(repository, bb), ["CPUExecutionProvider"]).run(
        [bb["output_name"]], {bb["input_name"]: x}
    )[0]
    onnx_probs = session(model_path(repository, head), ["CPUExecutionProvider"]).run(
        [head["output_name"]], {head["input_name"]: onnx_emb}
    )[0]
    emb = np.stack([o[0] for o in outputs])
    probs = np.stack([o[1] for o in outputs])
    mean = {k: round(float(np.mean(v)), 3) for k, v in stages.items()}
    total = sum(mean.values())
    return {
        "images": len(files),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "model_ms_by_threads": probe,
        "checkpoint": str(Path(checkpoint).relative_to(ROOT))
        if Path(checkpoint).is_relative_to(ROOT)
        else str(checkpoint),
        "images_per_s": round(len(files) / elapsed, 2),
        "mean_ms": mean,
        "preprocess_share": round((mean["decode"] + mean["clean"]) / total, 3),
        "same_model_as_onnx": {
            "max_abs_embedding_diff": float(np.abs(emb - onnx_emb).max()),
            "cluster_agreement": round(float((probs.argmax(1) == onnx_probs.argmax(1)).mean()), 4),
        },
    }


def bench_torch_device(
    x: np.ndarray,
    checkpoint: Path = DEFAULT_CHECKPOINT,
    *,
    device: str = "cuda",
    arch: str = "efficientnet-lite0",
    batches: tuple[int, ...] = (1, 32, 256),
    seconds: float = 3.0,
) -> dict[str, Any]:
    """The same torch model on ``device`` (a GPU): images/s at each batch in fp32 and under fp16 autocast,
    inputs already on the device (the model alone), synchronised after every call."""
    import torch

    model = EagerModel(checkpoint, arch)
    backbone, head = model.backbone.to(device), model.head.to(device)
    torch.backends.cudnn.benchmark = True
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    out: dict[str, Any] = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else device,
    }
    for dtype in ("fp32", "fp16_autocast"):
        for b in batches:
            xb = torch.from_numpy(np.concatenate([x] * int(np.ceil(b / len(x))))[:b]).to(device)

            def call(xb=xb, dtype=dtype) -> None:
                with torch.inference_mode(), torch.autocast(device.split(":")[0], enabled=dtype != "fp32"):
                    head(torch.nn.functional.normalize(backbone(xb), dim=1)).softmax(1)
                sync()

            for _ in range(3):
                call()
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds or n < 5:
                call()
                n += 1
            elapsed = time.perf_counter() - t0
            out[f"{dtype}_batch_{b}"] = {
                "images_per_s": round(b * n / elapsed, 1),
                "ms_per_call": round(elapsed / n * 1e3, 3),
            }
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m benchmarks.eager", description="the torch model on a device")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    ap.add_argument("--inputs", type=Path, help=".npy of model inputs [N,1,S,S] (default: synthetic)")
    ap.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    from benchmarks.core import card_json, synthetic_inputs

    card = card_json(args.repository)
    x = np.load(args.inputs) if args.inputs and args.inputs.is_file() else synthetic_inputs(card)
    why = available(args.checkpoint)
    if why:
        result: dict[str, Any] = {"skipped": why}
    else:
        arch = card.get("provenance", {}).get("backbone_arch") or "efficientnet-lite0"
        result = bench_torch_device(
            x.astype(np.float32), args.checkpoint, device=args.device, arch=arch, seconds=args.seconds
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
