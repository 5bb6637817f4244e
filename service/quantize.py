"""The int8 backbone: a static QDQ copy of the fp32 backbone, calibrated on what the model really sees.

    python -m service.quantize [--repository model_repository] [--data ../shared/data] [--phantoms 100]

Calibration images are real frames (HC18, FETAL_PLANES_DB from the shared data folder, when present) and
phantoms (``training.data.phantoms``, written as PNG files), each run through the service's own
``decode_image`` + ``preprocess``. The result is written beside the fp32 backbone as
``fusc_backbone_int8/1/model.onnx`` (with a Triton config) and listed in the model card with its SHA-256,
its calibration and its agreement with fp32 on held-out images (other images than the calibration ones).

How (each step measured on the bundled EfficientNet-Lite0, see docs/benchmarks.md):

1. the "SAME" padding amounts, which the exported graph computes from shapes at run time, become
   constants (the spatial size is fixed by the card), so that the graph is plain Conv/Clip/Pad/Add;
2. ``onnxruntime.quantization.quantize_static``: QDQ, int8 weights per output channel, uint8 activations
   per tensor, MinMax calibration; the stem and the first block stay fp32 (``--fp32-until``): their weights'
   rounding error (folded batch norm, 3x3 depthwise filters) is what the rest of the network amplifies most,
   and they hold ~2 % of the multiply-adds;
3. bias correction (Nagel et al. 2019, "Data-Free Quantization", the empirical variant): conv by conv in
   graph order, the mean per-channel shift of the int8 model's output from the fp32 one on the calibration
   images is taken out of the conv's int32 bias.

Needs ``onnx`` and the training package (the phantom generator), not torch; the service never imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import shlex
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.card import (
    CARD_FILENAME,
    Calibration,
    ModelCard,
    QuantizedModel,
    load_card,
    sha256_file,
)
from service.clean import preprocess
from service.decode import decode_image

logger = logging.getLogger("fusc.quantize")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data"
INT8_SUFFIX = "_int8"
# Real images: every STEP-th HC18 frame from offset 0 calibrates and from offset STEP/2 is held out;
# FETAL_PLANES_DB (97 frames) alternates. Phantoms: one seed calibrates, another is held out; neither is the
# training's seed 0.
HC18_STEP = 10
CALIBRATION_PHANTOM_SEED = 101
HELD_OUT_PHANTOM_SEED = 202
# Nodes before the first node whose name starts with this stay fp32 (default: the stem and block 0).
DEFAULT_FP32_UNTIL = "/backbone/_blocks.1/"
BATCH = 16


# ----------------------------------------------------------------------------------------------- images
@dataclass
class ImageSet:
    """Model inputs float32 [N,1,S,S] with the source of each row."""

    x: np.ndarray
    sources: list[str]
    counts: dict[str, int] = field(default_factory=dict)


def _real_files(data: Path, held_out: bool) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    hc18 = sorted((data / "hc18" / "images").glob("*.png"))
    fpdb = sorted((data / "fetal_planes_db" / "images").glob("*.png"))
    if hc18:
        out["hc18"] = hc18[HC18_STEP // 2 if held_out else 0 :: HC18_STEP]
    if fpdb:
        out["fetal_planes_db"] = fpdb[1 if held_out else 0 :: 2]
    return out


def _phantom_pngs(n: int, seed: int) -> Iterator[bytes]:
    from training.data.phantoms import generate_dataset

    with tempfile.TemporaryDirectory(prefix="fusc-quantize-") as tmp:
        out = generate_dataset(tmp, n, seed=seed, progress=False)
        for path in sorted((out / "images").glob("*.png")):
            yield path.read_bytes()


def image_set(card: ModelCard, data: Path | None, n_phantoms: int, *, held_out: bool) -> ImageSet:
    """The calibration images (``held_out=False``) or the disjoint held-out ones, as the service sees them:
    encoded bytes -> ``decode_image`` -> ``preprocess`` with the card's settings."""
    tensors: list[np.ndarray] = []
    sources: list[str] = []
    counts: dict[str, int] = {}
    real = _real_files(data, held_out) if data is not None and data.is_dir() else {}
    blobs: list[tuple[str, bytes]] = [(name, p.read_bytes()) for name, paths in real.items() for p in paths]
    seed = HELD_OUT_PHANTOM_SEED if held_out else CALIBRATION_PHANTOM_SEED
    blobs += [("phantoms", b) for b in _phantom_pngs(n_phantoms, seed)] if n_phantoms else []
    for name, blob in blobs:
        tensors.append(preprocess(decode_image(blob), card.preprocess))
        sources.append(name)
        counts[name] = counts.get(name, 0) + 1
    if not tensors:
        raise ValueError("no calibration images: no real data found and --phantoms 0")
    return ImageSet(np.stack(tensors).astype(np.float32), sources, counts)


# ------------------------------------------------------------------------------------------ graph prep
def fold_static_pads(model: Any, input_name: str, shape: tuple[int, ...]) -> Any:
    """Replace every Pad amount that the graph computes from shapes by a constant, then drop the nodes that
    computed it. The amounts are evaluated at two batch sizes and must agree (they depend on the spatial
    size only, which the card fixes)."""
    import onnx
    from onnx import numpy_helper

    names = [n.input[1] for n in model.graph.node if n.op_type == "Pad" and len(n.input) > 1]
    constant = {i.name for i in model.graph.initializer}
    names = sorted({n for n in names if n and n not in constant})
    if not names:
        return model
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in names:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    runs = [session.run(names, {input_name: np.zeros((b, *shape), np.float32)}) for b in (1, 3)]
    for name, a, b in zip(names, *runs, strict=True):
        if not np.array_equal(a, b):
            return model  # padding that depends on the batch: leave the graph as it is
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(a, np.int64), f"{name}_folded"))
        for node in model.graph.node:
            if node.op_type == "Pad" and node.input[1] == name:
                node.input[1] = f"{name}_folded"
    # Dead-code elimination: keep the nodes that some graph output still needs.
    needed = {o.name for o in model.graph.output}
    keep = []
    for node in reversed(model.graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    del model.graph.node[:]
    model.graph.node.extend(reversed(keep))
    inits = [i for i in model.graph.initializer if i.name in needed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    return model


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over an array, in equal batches."""

    def __init__(self, input_name: str, x: np.ndarray) -> None:
        self._batches = iter([{input_name: x[i : i + BATCH]} for i in range(0, len(x), BATCH)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def rewind(self) -> None:  # pragma: no cover - part of the reader protocol, unused here
        raise NotImplementedError


def _session(model: Path | Any, threads: int = 0) -> ort.InferenceSession:
    """A CPU session on an ONNX file or an in-memory ModelProto."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_batched(session: ort.InferenceSession, input_name: str, x: np.ndarray, out: str) -> np.ndarray:
    return np.concatenate([session.run([out], {input_name: x[i : i + 64]})[0] for i in range(0, len(x), 64)])


# --------------------------------------------------------------------------------------- bias correction
def _with_outputs(model: Any, names: list[str]) -> ort.InferenceSession:
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in names:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return _session(probe)


def _channel_means(session: ort.InferenceSession, input_name: str, x: np.ndarray, names: list[str]) -> list:
    sums: list[np.ndarray] = [np.zeros(0)] * len(names)
    count = [0] * len(names)
    for i in range(0, len(x), 64):
        outs = session.run(names, {input_name: x[i : i + 64]})
        for k, o in enumerate(outs):
            axes = (0, *range(2, o.ndim))
            sums[k] = o.sum(axis=axes, dtype=np.float64) + (sums[k] if count[k] else 0.0)
            count[k] += int(np.prod([o.shape[a] for a in axes]))
    return [s / c for s, c in zip(sums, count, strict=True)]


def correct_biases(fp32: Any, int8: Any, input_name: str, x: np.ndarray) -> int:
    """Empirical bias correction of every quantized Conv of ``int8`` (in place), in graph order: its mean
    per-channel output on ``x`` is brought back to the fp32 model's. Returns the convs corrected."""
    from onnx import numpy_helper

    convs = {n.name: n.output[0] for n in fp32.graph.node if n.op_type == "Conv"}
    if not convs:
        return 0
    outputs = list(convs.values())
    means = _channel_means(_with_outputs(fp32, outputs), input_name, x, outputs)
    reference = dict(zip(convs, means, strict=True))
    inits = {i.name: i for i in int8.graph.initializer}
    producer = {o: n for n in int8.graph.node for o in n.output}
    done = 0
    for node in list(int8.graph.node):
        if node.op_type != "Conv" or node.name not in reference or len(node.input) < 3:
            continue
        dq = producer.get(node.input[2])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue  # a conv left in fp32
        (mean,) = _channel_means(_with_outputs(int8, [node.output[0]]), input_name, x, [node.output[0]])
        shift = mean - reference[node.name]
        bias, scale = inits[dq.input[0]], numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
        corrected = numpy_helper.to_array(bias).astype(np.int64) - np.round(shift / scale).astype(np.int64)
        bias.CopyFrom(numpy_helper.from_array(corrected.astype(np.int32), bias.name))
        done += 1
    return done


# ------------------------------------------------------------------------------------------- agreement
def agreement(
    repository: Path, card: ModelCard, int8_path: Path, images: ImageSet, threads: int = 0
) -> dict[str, Any]:
    """Cluster ids (the card's fp32 head on each embedding) and embedding cosine, int8 vs fp32."""
    bb, head = card.backbone, card.head
    fp32 = run_batched(_session(bb.path(repository), threads), bb.input_name, images.x, bb.output_name)
    int8 = run_batched(_session(int8_path, threads), bb.input_name, images.x, bb.output_name)
    head_session = _session(head.path(repository), threads)
    p32 = head_session.run([head.output_name], {head.input_name: fp32})[0]
    p8 = head_session.run([head.output_name], {head.input_name: int8})[0]
    same = p32.argmax(1) == p8.argmax(1)
    unit = np.linalg.norm(fp32, axis=1) * np.linalg.norm(int8, axis=1)
    cosine = (fp32 * int8).sum(1) / np.maximum(unit, 1e-12)
    confident = p32.max(1) >= card.naming.min_confidence
    # The fp32 model against itself with Gaussian noise of half a gray level on its input: how stable its
    # cluster ids are to a change of the size of int8's rounding, the floor against which to read the rest.
    step = 1.0 / (255.0 * card.preprocess.std)
    rng = np.random.default_rng(0)
    noisy_x = images.x + rng.normal(0.0, step / 2, images.x.shape).astype(np.float32)
    noisy = run_batched(_session(bb.path(repository), threads), bb.input_name, noisy_x, bb.output_name)
    pn = head_session.run([head.output_name], {head.input_name: noisy})[0]
    by_source = {
        s: round(float(same[[x == s for x in images.sources]].mean()), 4) for s in sorted(set(images.sources))
    }
    return {
        "images": len(same),
        "cluster_agreement": round(float(same.mean()), 4),
        "cluster_agreement_by_source": by_source,
        # Answers that carry a view name (fp32 confidence >= the card's naming threshold).
        "cluster_agreement_confident": round(float(same[confident].mean()), 4) if confident.any() else None,
        "confident_images": int(confident.sum()),
        "cosine_mean": round(float(cosine.mean()), 5),
        "cosine_min": round(float(cosine.min()), 5),
        "fp32_vs_fp32_with_half_gray_level_noise": round(float((p32.argmax(1) == pn.argmax(1)).mean()), 4),
    }


# -------------------------------------------------------------------------------------------- quantize
def _config_pbtxt(repository: Path, card: ModelCard, name: str) -> str:
    source = repository / card.backbone.name / "config.pbtxt"
    if source.is_file():
        return source.read_text().replace(f'name: "{card.backbone.name}"', f'name: "{name}"')
    size, d = card.preprocess.size, card.embedding_dim
    return (
        f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 64\n'
        f'input [{{ name: "{card.backbone.input_name}" data_type: TYPE_FP32 dims: [1, {size}, {size}] }}]\n'
        f'output [{{ name: "{card.backbone.output_name}" data_type: TYPE_FP32 dims: [{d}] }}]\n'
        "dynamic_batching { max_queue_delay_microseconds: 2000 }\ninstance_group [{ kind: KIND_AUTO }]\n"
    )


def quantize_backbone(
    repository: Path,
    data: Path | None = DEFAULT_DATA,
    *,
    phantoms: int = 100,
    fp32_until: str | None = DEFAULT_FP32_UNTIL,
    bias_correction: bool = True,
    command: str = "",
) -> QuantizedModel:
    """Write ``<backbone>_int8/1/model.onnx`` (+ config.pbtxt) into ``repository`` and list it in the card."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    repository = Path(repository)
    card = load_card(repository, verify=True)
    bb = card.backbone
    size = card.preprocess.size
    have_real = data is not None and bool(_real_files(Path(data), False))
    calibration = image_set(card, Path(data) if have_real else None, phantoms, held_out=False)
    held_out = image_set(card, Path(data) if have_real else None, phantoms, held_out=True)
    logger.info("calibrating on %s; held out %s", calibration.counts, held_out.counts)

    target = QuantizedModel(
        name=f"{bb.name}{INT8_SUFFIX}",
        version=bb.version,
        input_name=bb.input_name,
        output_name=bb.output_name,
        sha256="",
        source_sha256=bb.sha256,
    )
    out_path = target.path(repository)
    with tempfile.TemporaryDirectory(prefix="fusc-quantize-") as tmp:
        folded_path, prepared_path, raw_path = (Path(tmp) / n for n in ("folded", "prepared", "raw"))
        fp32 = fold_static_pads(onnx.load(str(bb.path(repository))), bb.input_name, (1, size, size))
        onnx.save(fp32, str(folded_path))
        quant_pre_process(str(folded_path), str(prepared_path))
        prepared = onnx.load(str(prepared_path))
        nodes = list(prepared.graph.node)
        start = next((i for i, n in enumerate(nodes) if fp32_until and n.name.startswith(fp32_until)), 0)
        excluded = [n.name for n in nodes[:start]]
        # quantize_static prints its progress; the log says what matters.
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                str(prepared_path),
                str(raw_path),
                _Reader(bb.input_name, calibration.x),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=excluded,
            )
        int8 = onnx.load(str(raw_path))
        corrected = correct_biases(prepared, int8, bb.input_name, calibration.x) if bias_correction else 0
        logger.info("bias correction on %d convs", corrected)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(int8, str(out_path))
    (out_path.parent.parent / "config.pbtxt").write_text(_config_pbtxt(repository, card, target.name))

    measured = agreement(repository, card, out_path, held_out)
    measured["held_out"] = (
        f"HC18 every {HC18_STEP}th frame from {HC18_STEP // 2}, FETAL_PLANES_DB odd positions, "
        f"{phantoms} phantoms of seed {HELD_OUT_PHANTOM_SEED}: none of them calibrated"
        if have_real
        else f"{phantoms} phantoms of seed {HELD_OUT_PHANTOM_SEED} (no real images: {data} absent)"
    )
    note = "" if have_real else f"phantoms only: no real images under {data}"
    quantized = target.model_copy(
        update={
            "sha256": sha256_file(out_path),
            "fp32_nodes": excluded,
            "bias_correction": bias_correction,
            "calibration": Calibration(
                method="MinMax",
                images=calibration.counts,
                selection=(
                    f"HC18 every {HC18_STEP}th frame from 0, FETAL_PLANES_DB even positions, "
                    f"{phantoms} phantoms of seed {CALIBRATION_PHANTOM_SEED}; each through decode_image + "
                    "preprocess with the card's settings"
                ),
                phantom_seed=CALIBRATION_PHANTOM_SEED,
                note=note,
            ),
            "agreement": measured,
            "command": command,
            "onnxruntime_version": ort.__version__,
            "created": datetime.now(timezone.utc),
        }
    )
    card.model_copy(update={"backbone_int8": quantized}).write(repository)
    load_card(repository, verify=True)  # what was written must verify
    return quantized


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m service.quantize", description=__doc__.splitlines()[0])
    ap.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    ap.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="folder holding hc18/ and fetal_planes_db/"
    )
    ap.add_argument(
        "--phantoms", type=int, default=100, help="phantoms to calibrate on (and as many held out)"
    )
    ap.add_argument(
        "--fp32-until",
        default=DEFAULT_FP32_UNTIL,
        help="nodes before the first one whose name starts with this stay fp32 ('' quantizes everything)",
    )
    ap.add_argument("--no-bias-correction", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    shown = "python -m service.quantize " + shlex.join(argv if argv is not None else sys.argv[1:])
    q = quantize_backbone(
        args.repository,
        args.data,
        phantoms=args.phantoms,
        fp32_until=args.fp32_until or None,
        bias_correction=not args.no_bias_correction,
        command=shown.strip(),
    )
    a = q.agreement
    print(
        f"wrote {q.path(args.repository)} ({q.path(args.repository).stat().st_size / 2**20:.1f} MiB) and "
        f"{args.repository / CARD_FILENAME}: cluster agreement with fp32 {a['cluster_agreement']:.4f} on "
        f"{a['images']} held-out images, cosine mean {a['cosine_mean']:.4f} (min {a['cosine_min']:.4f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
