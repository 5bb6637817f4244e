"""Fixtures for the service tests: a tiny but valid model repository built without torch, and test images.

``build_tiny_repository`` is a plain function so that the integration tests can build the same repository.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

# BentoML's /metrics reads prometheus_client's multiprocess files, as in a real server; the directory must
# be set before prometheus_client is first imported, so this comes before every other import.
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="fusc-prometheus-"))
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import pytest  # noqa: E402

from service.card import (  # noqa: E402
    BACKBONE_NAME,
    HEAD_NAME,
    ModelCard,
    OnnxModel,
    OODBank,
    OODCalibration,
    Provenance,
    load_card,
    sha256_file,
)
from service.clean import CleanConfig, preprocess  # noqa: E402
from service.decode import decode_image  # noqa: E402

if TYPE_CHECKING:
    import onnx

TINY_SIZE = 32
TINY_DIM = 16
TINY_K = 5
TINY_NAMES = {0: "brain", 1: "abdomen", 3: "femur"}  # cluster 2 and 4 stay unnamed on purpose
TINY_VERSION = "tiny-test-1"
_OPSET = 17
_IR_VERSION = 8  # old enough for any onnxruntime this project meets


def _onnx() -> ModuleType:
    # onnx is a training/dev dependency: only the repository builder needs it, so skip rather than fail.
    return pytest.importorskip("onnx")


def _save(graph: onnx.GraphProto, path: Path) -> None:
    onnx = _onnx()
    helper = onnx.helper
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
    model.ir_version = _IR_VERSION
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def tiny_backbone_graph(size: int, dim: int, rng: np.random.Generator) -> onnx.GraphProto:
    """image [N,1,S,S] -> Flatten -> MatMul -> Tanh -> L2 normalise -> embedding [N,D]."""
    onnx = _onnx()
    helper, TensorProto = onnx.helper, onnx.TensorProto
    weight = (rng.standard_normal((size * size, dim)) / size).astype(np.float32)
    nodes = [
        helper.make_node("Flatten", ["image"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["proj"]),
        helper.make_node("Tanh", ["proj"], ["act"]),
        helper.make_node("LpNormalization", ["act"], ["embedding"], axis=1, p=2),
    ]
    return helper.make_graph(
        nodes,
        "fusc_tiny_backbone",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, size, size])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", dim])],
        initializer=[onnx.numpy_helper.from_array(weight, "w")],
    )


def tiny_head_graph(dim: int, k: int, rng: np.random.Generator) -> onnx.GraphProto:
    """embedding [N,D] -> Gemm -> Softmax -> probs [N,K]; weights scaled so that answers are confident."""
    onnx = _onnx()
    helper, TensorProto = onnx.helper, onnx.TensorProto
    weight = (4.0 * rng.standard_normal((dim, k))).astype(np.float32)
    bias = (0.1 * rng.standard_normal(k)).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["embedding", "w", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    return helper.make_graph(
        nodes,
        "fusc_tiny_head",
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", dim])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", k])],
        initializer=[onnx.numpy_helper.from_array(weight, "w"), onnx.numpy_helper.from_array(bias, "b")],
    )


def build_tiny_repository(
    root: Path,
    *,
    size: int = TINY_SIZE,
    dim: int = TINY_DIM,
    k: int = TINY_K,
    seed: int = 0,
    version: str = TINY_VERSION,
) -> Path:
    """Write ONNX backbone + head in Triton layout under ``root`` and a model card with their SHA-256s."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    backbone = OnnxModel(name=BACKBONE_NAME, input_name="image", output_name="embedding", sha256="")
    head = OnnxModel(name=HEAD_NAME, input_name="embedding", output_name="probs", sha256="")
    _save(tiny_backbone_graph(size, dim, rng), backbone.path(root))
    _save(tiny_head_graph(dim, k, rng), head.path(root))
    card = ModelCard(
        version=version,
        preprocess=CleanConfig(size=size),
        embedding_dim=dim,
        num_clusters=k,
        cluster_names=dict(TINY_NAMES),
        backbone=backbone.model_copy(update={"sha256": sha256_file(backbone.path(root))}),
        head=head.model_copy(update={"sha256": sha256_file(head.path(root))}),
        provenance=Provenance(note="random weights for tests", seed=seed),
        quality={"note": "none: random weights"},
    )
    card.write(root)
    return root


def tiny_embeddings(repo: Path, images: list[bytes]) -> np.ndarray:
    """float32 [N, D]: the repository's backbone on each image, straight through onnxruntime."""
    card = load_card(repo)
    x = np.stack([preprocess(decode_image(d), card.preprocess) for d in images]).astype(np.float32)
    backbone = ort.InferenceSession(str(card.backbone.path(repo)), providers=["CPUExecutionProvider"])
    (emb,) = backbone.run([card.backbone.output_name], {card.backbone.input_name: x})
    return emb


def add_knn_ood(
    repo: Path,
    bank_images: list[bytes],
    calibration_images: list[bytes],
    *,
    k: int = 3,
    quantile: float = 0.05,
    provenance: Provenance | None = None,
) -> Path:
    """Give ``repo`` a ``knn_cosine`` OOD check, the way training calibrates one: a float16 bank of the
    ``bank_images`` embeddings, the threshold at ``quantile`` of the score of ``calibration_images``."""
    repo = Path(repo)
    bank = tiny_embeddings(repo, bank_images)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    path = repo / "ood_bank.npy"
    np.save(path, bank.astype(np.float16))
    stored = np.load(path).astype(np.float32)
    calib = tiny_embeddings(repo, calibration_images)
    sims = (calib / np.linalg.norm(calib, axis=1, keepdims=True)) @ stored.T
    scores = np.sort(sims, axis=1)[:, -min(k, len(stored)) :].mean(axis=1)
    card = load_card(repo)
    ood = OODCalibration(
        method="knn_cosine",
        bank=OODBank(path=path.name, sha256=sha256_file(path), count=len(bank)),
        k=k,
        threshold=float(np.quantile(scores, quantile)),
        quantile=quantile,
        calibrated_on="tiny test images",
    )
    update: dict[str, object] = {"ood": ood}
    if provenance is not None:
        update["provenance"] = provenance
    card.model_copy(update=update).write(repo)
    return repo


def expected_view(card: ModelCard, result: dict) -> tuple[str | None, str | None]:
    """(view, view_reason) that the answer rule gives for an answer's cluster, confidence and OOD flag."""
    name = card.view_name(result["cluster"])
    if result["ood"]:
        return None, "out_of_distribution"
    if name is None:
        return None, "cluster_unnamed"
    if result["confidence"] < card.naming.min_confidence:
        return None, "low_confidence"
    return name, None


def synthetic_frame(seed: int = 0, height: int = 120, width: int = 160) -> np.ndarray:
    """A gray frame shaped like an ultrasound sector with a bright ellipse: enough for clean() to chew on."""
    rng = np.random.default_rng(seed)
    frame = np.zeros((height, width), np.uint8)
    apex = (width // 2, 4)
    cv2.ellipse(frame, apex, (int(height * 0.95), int(height * 0.95)), 90, -35, 35, 60, thickness=-1)
    speckle = rng.integers(0, 50, size=frame.shape, dtype=np.uint8)
    frame = np.where(frame > 0, frame + speckle, 0).astype(np.uint8)
    centre = (int(width * rng.uniform(0.4, 0.6)), int(height * rng.uniform(0.45, 0.65)))
    axes = (int(width * rng.uniform(0.1, 0.2)), int(height * rng.uniform(0.1, 0.25)))
    cv2.ellipse(frame, centre, axes, float(rng.uniform(0, 180)), 0, 360, 220, thickness=3)
    return frame


def reference_probs(repo: Path, data: bytes) -> np.ndarray:
    """The answer computed straight from the ONNX files with onnxruntime, bypassing the service code."""
    card = load_card(repo)
    x = preprocess(decode_image(data), card.preprocess)[None].astype(np.float32)
    backbone = ort.InferenceSession(str(card.backbone.path(repo)), providers=["CPUExecutionProvider"])
    head = ort.InferenceSession(str(card.head.path(repo)), providers=["CPUExecutionProvider"])
    (emb,) = backbone.run([card.backbone.output_name], {card.backbone.input_name: x})
    (probs,) = head.run([card.head.output_name], {card.head.input_name: emb})
    return probs[0]


def png_bytes(frame: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", frame)
    assert ok
    return buf.tobytes()


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_repository(tmp_path_factory.mktemp("model_repository"))


@pytest.fixture(scope="session")
def good_png() -> bytes:
    return png_bytes(synthetic_frame(0))


@pytest.fixture(scope="session")
def other_pngs() -> list[bytes]:
    return [png_bytes(synthetic_frame(seed)) for seed in range(1, 6)]


class BrokenBackend:
    """A backend whose model call always fails, as a crashed or unreachable inference server would."""

    name = "broken"

    def embed(self, x: np.ndarray) -> np.ndarray:
        from service.errors import BackendUnavailableError

        raise BackendUnavailableError("the inference backend failed to run fusc_backbone")

    def assign(self, emb: np.ndarray) -> np.ndarray:
        raise AssertionError("not reached")

    def ready(self) -> bool:
        return False

    def describe(self) -> dict[str, object]:
        return {"name": self.name}


# The limits the API tests are written against.
APP_MAX_UPLOAD = 300_000  # small, so that the size limit can be hit cheaply
APP_MAX_BATCH = 4
APP_RETRY_AFTER_S = 7


@pytest.fixture(scope="session")
def service_app(tiny_repo: Path):
    """The BentoML service in-process (``FuscService.to_asgi()``, lifespan included) under Starlette's
    TestClient. One per session: BentoML registers its own metrics when the app is built, and a second
    build in the same process fails on the duplicates."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Starlette nudges towards httpx2 for its TestClient
        from starlette.testclient import TestClient

    from service.api import FuscService

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FUSC_MODEL_REPOSITORY", str(tiny_repo))
        mp.setenv("FUSC_MAX_UPLOAD_BYTES", str(APP_MAX_UPLOAD))
        mp.setenv("FUSC_MAX_BATCH_FILES", str(APP_MAX_BATCH))
        mp.setenv("FUSC_RETRY_AFTER_S", str(APP_RETRY_AFTER_S))
        with TestClient(FuscService.to_asgi(), raise_server_exceptions=False) as client:
            yield client
