"""The model card: one versioned pydantic document written by training and read by the service.

It carries everything the service needs to reproduce the training-time preprocessing and to trust the
ONNX files beside it (their SHA-256), plus provenance and measured quality for the people who deploy it.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from service.clean import CleanConfig
from service.errors import ModelRepositoryError

CARD_FILENAME = "model_card.json"
BACKBONE_NAME = "fusc_backbone"
HEAD_NAME = "fusc_head"
ENSEMBLE_NAME = "fusc_ensemble"


class OnnxModel(BaseModel):
    """One ONNX model in Triton layout: ``<repository>/<name>/<version>/model.onnx``."""

    name: str
    version: int = 1
    input_name: str
    output_name: str
    sha256: str

    def path(self, repository: Path) -> Path:
        return Path(repository) / self.name / str(self.version) / "model.onnx"


class Calibration(BaseModel):
    """The images a static int8 model was calibrated on, each run through the service's decode + clean."""

    method: str = "MinMax"
    images: dict[str, int] = Field(default_factory=dict)  # source -> count
    selection: str = ""
    phantom_seed: int = 0
    note: str = ""


class QuantizedModel(OnnxModel):
    """An int8 copy of the backbone (``make quantize``), chosen with ``FUSC_PRECISION=int8``.

    It is made from the fp32 backbone whose SHA-256 is ``source_sha256``: a card whose fp32 backbone has
    changed since (a new training) no longer matches it and is refused until it is quantized again.
    """

    precision: Literal["int8"] = "int8"
    source_sha256: str
    format: str = "QDQ"
    weights: str = "int8, per output channel, symmetric"
    activations: str = "uint8, per tensor, asymmetric"
    # Nodes left in fp32 on purpose (their quantization error is amplified by the rest of the network).
    fp32_nodes: list[str] = Field(default_factory=list)
    bias_correction: bool = False
    calibration: Calibration = Field(default_factory=Calibration)
    # Measured against the fp32 backbone on held-out images: cluster-id agreement, embedding cosine.
    agreement: dict[str, Any] = Field(default_factory=dict)
    command: str = ""
    onnxruntime_version: str = ""
    created: datetime | None = None


class Provenance(BaseModel):
    command: str = ""
    datasets: list[str] = Field(default_factory=list)
    num_images: int = 0
    ssl_method: str = ""
    backbone_arch: str = ""
    epochs: dict[str, int] = Field(default_factory=dict)
    seed: int = 0
    # How the run held subjects out (its readers + ``training.data.readers.subject_split`` redraw the same
    # split), and the phantom views it trained on (a view missing here is one the model never saw).
    test_fraction: float = 0.0
    split_seed: int = 0
    data: list[str] = Field(default_factory=list)
    phantoms: int = 0
    phantom_seed: int = 0
    phantom_views: list[str] = Field(default_factory=list)
    git_commit: str = ""
    torch_version: str = ""
    device: str = ""
    note: str = ""


class OODBank(BaseModel):
    """A file in the repository (``<repository>/<path>``, a float16 .npy [M, D] of unit-norm training
    embeddings) that the ``knn_cosine`` check compares each embedding with; its SHA-256 is verified."""

    path: str = "ood_bank.npy"
    sha256: str
    count: int


class OODCalibration(BaseModel):
    """Out-of-distribution check on the embedding; an image whose ``score`` falls below ``threshold`` is
    flagged.

    - ``knn_cosine`` (current): score = mean cosine similarity of the embedding to its ``k`` nearest
      training embeddings in ``bank``; ``threshold`` is the ``quantile`` of the score over images of
      ``calibrated_on`` (held-out subjects when the run had them, never images of the bank itself), so
      about that share of in-distribution images is flagged.
    - ``centroid_cosine`` (older cards): score = cosine similarity to the nearest training cluster centroid.
    """

    method: Literal["centroid_cosine", "knn_cosine"] = "centroid_cosine"
    centroids: list[list[float]] = Field(default_factory=list)
    bank: OODBank | None = None
    k: int = Field(5, ge=1)
    threshold: float
    quantile: float
    calibrated_on: str = "training images"


class Naming(BaseModel):
    """When an answer carries a view name: its cluster is named, it is not out of distribution, and its
    confidence is at least ``min_confidence``; otherwise ``view`` is null and ``view_reason`` says why."""

    min_confidence: float = Field(0.9, ge=0, le=1)


class ModelCard(BaseModel):
    schema_version: Literal[1] = 1
    name: str = "fusc"
    version: str
    created: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    demonstration_only: bool = True
    preprocess: CleanConfig
    embedding_dim: int
    num_clusters: int
    cluster_names: dict[int, str] = Field(default_factory=dict)
    backbone: OnnxModel
    head: OnnxModel
    # Optional int8 backbone beside the fp32 one (service/quantize.py); the fp32 one stays the default.
    backbone_int8: QuantizedModel | None = None
    provenance: Provenance = Field(default_factory=Provenance)
    ood: OODCalibration | None = None
    naming: Naming = Field(default_factory=Naming)
    quality: dict[str, Any] = Field(default_factory=dict)

    def backbone_for(self, precision: str) -> OnnxModel:
        """The backbone that ``FUSC_PRECISION`` asks for; a clear error when the card has no int8 one."""
        if precision == "fp32":
            return self.backbone
        if precision == "int8":
            if self.backbone_int8 is None:
                raise ModelRepositoryError(
                    "FUSC_PRECISION=int8 but the model card lists no int8 backbone: "
                    "run `make quantize` (python -m service.quantize) on this repository, or use fp32"
                )
            return self.backbone_int8
        raise ModelRepositoryError(f"unknown precision {precision!r}: fp32 or int8")

    def view_name(self, cluster: int) -> str | None:
        return self.cluster_names.get(cluster)

    def write(self, repository: Path) -> Path:
        path = Path(repository) / CARD_FILENAME
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify_int8(card: ModelCard, repository: Path) -> None:
    """The int8 backbone is optional (a Triton copy of the repository may leave it out), but when its file
    is there it must match the card, and it must have been made from this card's fp32 backbone."""
    q = card.backbone_int8
    if q is None:
        return
    if q.source_sha256 != card.backbone.sha256:
        raise ModelRepositoryError(
            f"the int8 backbone was quantized from an fp32 backbone with SHA-256 {q.source_sha256[:12]}…, "
            f"not this card's {card.backbone.sha256[:12]}…: run `make quantize` again"
        )
    path = q.path(repository)
    if path.is_file() and sha256_file(path) != q.sha256:
        raise ModelRepositoryError(
            f"{path} does not match the SHA-256 in the model card: run `make quantize` again or restore it"
        )


def load_card(repository: Path, *, verify: bool = True) -> ModelCard:
    """Read and validate the card; with ``verify`` refuse a repository whose ONNX files do not match it."""
    repository = Path(repository)
    path = repository / CARD_FILENAME
    if not path.is_file():
        raise ModelRepositoryError(f"no {CARD_FILENAME} in model repository {repository}")
    try:
        card = ModelCard.model_validate(json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise ModelRepositoryError(f"{path} is not a valid model card: {exc}") from exc
    if verify:
        for model in (card.backbone, card.head):
            onnx_path = model.path(repository)
            if not onnx_path.is_file():
                raise ModelRepositoryError(f"model card names {onnx_path}, which does not exist")
            digest = sha256_file(onnx_path)
            if digest != model.sha256:
                raise ModelRepositoryError(
                    f"{onnx_path} has SHA-256 {digest[:12]}…, the model card expects {model.sha256[:12]}…: "
                    "the repository was changed after export; re-export or restore it"
                )
        _verify_int8(card, repository)
        bank = card.ood.bank if card.ood is not None else None
        if bank is not None:
            bank_path = repository / bank.path
            if not bank_path.is_file():
                raise ModelRepositoryError(f"model card names OOD bank {bank_path}, which does not exist")
            if sha256_file(bank_path) != bank.sha256:
                raise ModelRepositoryError(
                    f"{bank_path} does not match the SHA-256 in the model card: re-export or restore it"
                )
    return card
