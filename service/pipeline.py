"""The whole data path for one request: bytes -> decode -> clean -> embed -> assign -> ClusterResult.

No HTTP here. The steps are public so that the service can schedule them (service/batching.py: a thread
pool for ``prepare``, batches across requests for ``infer``); ``prepare_each`` and ``answers`` are shared
by that path and by ``cluster``, which chains the steps for a list of images in one model call.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

import numpy as np
from pydantic import BaseModel
from threadpoolctl import threadpool_limits

from service import metrics
from service.backends import Backend, make_backend
from service.card import ModelCard, load_card
from service.clean import CleanConfig, preprocess
from service.decode import decode_image
from service.drift import ClusterMix
from service.errors import DecodeError, EmptyInputError, FuscError, ImageTooLargeError, ModelRepositoryError
from service.settings import Settings

logger = logging.getLogger("fusc.service")

TOP_K = 3


class PreprocessError(FuscError):
    """The frame decoded but cleaning failed (for instance, no ultrasound fan could be found)."""

    code = "preprocess_failed"
    http_status = 422


class TopCluster(BaseModel):
    cluster: int
    probability: float
    view: str | None


class Timings(BaseModel):
    """Milliseconds. decode/clean are this image's; embed/assign are those of the model batch it ran in."""

    decode: float
    clean: float
    embed: float
    assign: float


ViewReason = Literal["out_of_distribution", "cluster_unnamed", "low_confidence"]


class ClusterResult(BaseModel):
    """One image's answer. ``view`` is the cluster's name only when the image is in distribution, the
    cluster is named and ``confidence`` reaches the card's ``naming.min_confidence``; otherwise it is null
    and ``view_reason`` says why (the first that applies, in the order of ``ViewReason``)."""

    cluster: int
    confidence: float
    top: list[TopCluster]
    view: str | None
    view_reason: ViewReason | None
    # Out of distribution: None when the model card carries no OOD calibration.
    ood: bool | None
    ood_score: float | None
    model_version: str
    timings_ms: Timings


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody

    @classmethod
    def of(cls, exc: FuscError) -> ErrorResponse:
        return cls(error=ErrorBody(code=exc.code, message=exc.message))


class BatchResponse(BaseModel):
    results: list[ClusterResult | ErrorResponse]


class EmbedResult(BaseModel):
    """One image's embedding: the backbone's output, L2-normalised (unit length), as the head sees it."""

    embedding: list[float]
    dim: int
    model_version: str
    timings_ms: Timings


Kind = Literal["cluster", "embed"]
Answer = Union[ClusterResult, EmbedResult, FuscError]  # noqa: UP007 (a runtime alias)


@dataclass(frozen=True)
class Prepared:
    """One image ready for the model: the (1,S,S) tensor and what it cost to get there."""

    tensor: np.ndarray
    decode_ms: float
    clean_ms: float


@dataclass(frozen=True)
class Inference:
    embeddings: np.ndarray  # float32 [N,D], unit rows
    probs: np.ndarray  # float32 [N,K]
    ood_score: np.ndarray  # float32 [N]: the card's OOD score (see OODCalibration); nan: no calibration
    embed_ms: float  # of the whole model batch
    assign_ms: float

    def rows(self, start: int, stop: int) -> Inference:
        """Rows start..stop (one request's images of a shared batch), with the batch's timings."""
        return Inference(
            self.embeddings[start:stop],
            self.probs[start:stop],
            self.ood_score[start:stop],
            self.embed_ms,
            self.assign_ms,
        )


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def load_ood_bank(repository: Path, card: ModelCard) -> np.ndarray | None:
    """The ``knn_cosine`` bank as float32 [M, D] (unit-norm rows); None for cards without one.

    The file's SHA-256 is checked by ``load_card``; its shape is checked here, so that a bank from another
    model fails at start-up rather than in the first request.
    """
    if card.ood is None or card.ood.method != "knn_cosine":
        return None
    if card.ood.bank is None:
        raise ModelRepositoryError("the model card asks for knn_cosine OOD scoring but names no bank")
    path = Path(repository) / card.ood.bank.path
    try:
        bank = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ModelRepositoryError(f"the OOD bank {path} could not be read: {exc}") from exc
    if bank.ndim != 2 or bank.shape[1] != card.embedding_dim or len(bank) == 0:
        raise ModelRepositoryError(
            f"the OOD bank {path} has shape {bank.shape}, the model card expects [M, {card.embedding_dim}]"
        )
    if len(bank) != card.ood.bank.count:
        raise ModelRepositoryError(
            f"the OOD bank {path} has {len(bank)} rows, the model card says {card.ood.bank.count}"
        )
    bank = bank.astype(np.float32)
    if not np.isfinite(bank).all():
        raise ModelRepositoryError(f"the OOD bank {path} holds non-finite values")
    # Used as stored (unit rows to float16 precision), not renormalised: the threshold was calibrated
    # against these very rows (training.cluster.ood.knn_scores), and the scores must be the same numbers.
    return bank


def prepare_image(
    data: bytes,
    cfg: CleanConfig,
    max_bytes: int,
    max_pixels: int,
    input_shape: tuple[int, int, int],
    frame_index: int | None = None,
) -> Prepared:
    """decode + clean one image (``frame_index``: one frame of a multi-frame DICOM, else the first), with no
    state but its arguments (so that a worker process can run it); raises a FuscError that belongs to this
    image only. Records no metrics: see ``observe_prepared``."""
    if not data:
        raise EmptyInputError("the upload is empty: send the image bytes")
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"the upload is larger than the limit of {max_bytes} bytes")
    t0 = time.perf_counter()
    try:
        frame = decode_image(data, max_pixels=max_pixels, max_bytes=max_bytes, frame=frame_index)
    except FuscError:
        raise
    except Exception as exc:
        # Crafted bytes can trip a decoder in ways it does not classify; that is still the input's fault.
        # Only the exception type is logged: a decoder's message may quote header fields.
        logger.warning("decoder raised %s; answering corrupt_image", type(exc).__name__)
        raise DecodeError("the image could not be decoded; it may be corrupt or truncated") from exc
    t1 = time.perf_counter()
    try:
        tensor = preprocess(frame, cfg)
    except FuscError:
        raise
    except Exception as exc:
        logger.warning("preprocess raised %s; answering preprocess_failed", type(exc).__name__)
        raise PreprocessError("the image decoded but could not be prepared for the model") from exc
    del frame
    t2 = time.perf_counter()
    tensor = np.asarray(tensor, dtype=np.float32)
    if tensor.shape != input_shape:
        raise PreprocessError(f"preprocessing gave shape {tensor.shape}, the model needs {input_shape}")
    return Prepared(tensor=tensor, decode_ms=_ms(t1 - t0), clean_ms=_ms(t2 - t1))


def observe_prepared(prepared: Prepared) -> None:
    """The stage latencies of one prepared image, in this process's metrics."""
    metrics.observe_stage("decode", prepared.decode_ms / 1000.0)
    metrics.observe_stage("clean", prepared.clean_ms / 1000.0)


class Pipeline:
    def __init__(
        self,
        card: ModelCard,
        backend: Backend,
        *,
        repository: Path | None = None,
        max_bytes: int = 64 * 1024 * 1024,
        max_pixels: int = 50_000_000,
        drift_window: int = 1000,
    ) -> None:
        """``repository`` is where the card's files other than the ONNX models (the OOD bank) are read
        from; a ``knn_cosine`` card needs it."""
        self.card = card
        self.backend = backend
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.mix = ClusterMix.from_card(card, drift_window)
        size = card.preprocess.size
        self.input_shape = (1, size, size)
        self.centroids: np.ndarray | None = None  # float32 [D, K]: centroid_cosine
        self.bank: np.ndarray | None = None  # float32 [M, D]: knn_cosine
        ood = card.ood
        if ood is not None and ood.method == "knn_cosine":
            if repository is None:
                raise ModelRepositoryError("knn_cosine OOD scoring needs the model repository for its bank")
            self.bank = load_ood_bank(repository, card)
        elif ood is not None:
            centroids = np.asarray(ood.centroids, dtype=np.float32)
            if centroids.ndim != 2 or centroids.shape[1] != card.embedding_dim or len(centroids) == 0:
                raise ModelRepositoryError(
                    f"the model card's OOD centroids have shape {centroids.shape}, "
                    f"expected [K, {card.embedding_dim}]"
                )
            self.centroids = centroids.T

    def ood_scores(self, emb: np.ndarray) -> np.ndarray:
        """float32 [N]: each embedding's OOD score under the card's method; nan where the card has none."""
        emb = np.asarray(emb, dtype=np.float32)
        if self.bank is not None:
            assert self.card.ood is not None
            unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
            sims = unit @ self.bank.T  # [N, M]: one product for the whole batch
            k = min(self.card.ood.k, sims.shape[1])
            # The k largest per row, unordered: partition is O(M), a full sort is not needed for a mean.
            top = np.partition(sims, sims.shape[1] - k, axis=1)[:, -k:]
            return top.mean(axis=1, dtype=np.float32)
        if self.centroids is not None:
            return (emb @ self.centroids).max(axis=1)
        return np.full(len(emb), np.nan, np.float32)

    # Errors are counted in fusc_errors_total where they are answered (cluster() here, the HTTP layer in
    # the service), so that prepare() and infer() can be chained by either without counting twice.
    def prepare(self, data: bytes, frame_index: int | None = None) -> Prepared:
        """decode + clean one image (``frame_index``: that frame of a multi-frame DICOM); raises a FuscError
        that belongs to this image only."""
        prepared = prepare_image(
            data, self.card.preprocess, self.max_bytes, self.max_pixels, self.input_shape, frame_index
        )
        observe_prepared(prepared)
        return prepared

    def infer(self, x: np.ndarray) -> Inference:
        """embed + assign one batch [N,1,S,S]. A backend that cannot answer raises BackendUnavailableError
        (503, retryable); a model that raises on this input, ModelFailedError (500)."""
        t0 = time.perf_counter()
        emb = self.backend.embed(x)
        t1 = time.perf_counter()
        probs = self.backend.assign(emb)
        t2 = time.perf_counter()
        metrics.BATCH_SIZE.observe(len(x))
        metrics.observe_stage("embed", t1 - t0)
        metrics.observe_stage("assign", t2 - t1)
        ood_score = self.ood_scores(emb)
        emb = np.asarray(emb, np.float32)
        unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), np.float32(1e-12))
        return Inference(
            embeddings=unit, probs=probs, ood_score=ood_score, embed_ms=_ms(t1 - t0), assign_ms=_ms(t2 - t1)
        )

    def result(
        self,
        prepared: Prepared,
        probs: np.ndarray,
        embed_ms: float,
        assign_ms: float,
        ood_score: float = float("nan"),
    ) -> ClusterResult:
        """Turn one row of probabilities into the response and count the assignment."""
        probs = np.asarray(probs, dtype=np.float32)
        ood: bool | None = None
        score: float | None = None
        if self.card.ood is not None:
            if np.isfinite(ood_score):
                score = float(ood_score)
                ood = score < self.card.ood.threshold
            else:
                # A calibrated model that could not score this embedding (non-finite model output) has no
                # grounds to call the image in distribution.
                ood = True
            if ood:
                metrics.OOD.inc()
        # Stable sort: ties go to the lower cluster id, as argmax does.
        order = np.argsort(-probs, kind="stable")[:TOP_K]
        cluster = int(order[0])
        confidence = float(probs[cluster])
        metrics.record_assignment(cluster, confidence)
        self.mix.record(cluster)
        name = self.card.view_name(cluster)
        reason: ViewReason | None = None
        if ood:
            reason = "out_of_distribution"
        elif name is None:
            reason = "cluster_unnamed"
        elif confidence < self.card.naming.min_confidence:
            reason = "low_confidence"
        if reason is not None:
            metrics.count_view_withheld(reason)
        return ClusterResult(
            cluster=cluster,
            confidence=confidence,
            top=[
                # A flagged image names no view at all, not even as a runner-up.
                TopCluster(
                    cluster=int(c),
                    probability=float(probs[c]),
                    view=None if ood else self.card.view_name(int(c)),
                )
                for c in order
            ],
            view=name if reason is None else None,
            view_reason=reason,
            ood=ood,
            ood_score=score,
            model_version=self.card.version,
            timings_ms=Timings(
                decode=prepared.decode_ms, clean=prepared.clean_ms, embed=embed_ms, assign=assign_ms
            ),
        )

    def embedding_result(
        self, prepared: Prepared, embedding: np.ndarray, embed_ms: float, assign_ms: float
    ) -> EmbedResult:
        return EmbedResult(
            embedding=[float(v) for v in np.asarray(embedding, np.float32)],
            dim=int(len(embedding)),
            model_version=self.card.version,
            timings_ms=Timings(
                decode=prepared.decode_ms, clean=prepared.clean_ms, embed=embed_ms, assign=assign_ms
            ),
        )

    def prepare_each(self, images: list[bytes]) -> list[Prepared | FuscError]:
        """``prepare`` on each image in turn; an image's failure is its own entry, not an exception."""
        prepared: list[Prepared | FuscError] = []
        for data in images:
            try:
                prepared.append(self.prepare(data))
            except FuscError as exc:
                prepared.append(exc)
        return prepared

    def answers(
        self, prepared: list[Prepared | FuscError], inference: Inference | None, kind: Kind = "cluster"
    ) -> list[Answer]:
        """Each image's answer or its own error, in order: ``inference`` holds one row per prepared image
        (None when there is none). Each image's error is counted here, where it is answered."""
        out: list[Answer] = []
        row = 0
        for p in prepared:
            if isinstance(p, FuscError):
                metrics.count_error(p.code)
                out.append(p)
                continue
            assert inference is not None
            if kind == "embed":
                out.append(
                    self.embedding_result(
                        p, inference.embeddings[row], inference.embed_ms, inference.assign_ms
                    )
                )
            else:
                out.append(
                    self.result(
                        p,
                        inference.probs[row],
                        inference.embed_ms,
                        inference.assign_ms,
                        float(inference.ood_score[row]),
                    )
                )
            row += 1
        return out

    def cluster(self, images: list[bytes], kind: Kind = "cluster") -> list[Answer]:
        """Each image's result or its own error, in order; the good ones share one model call.

        The service takes the same steps with a thread pool and batches across requests in between. A
        backend failure is nobody's image's fault: it raises for the whole call.
        """
        prepared = self.prepare_each(images)
        good = [p.tensor for p in prepared if isinstance(p, Prepared)]
        inference = None
        if good:
            try:
                inference = self.infer(np.stack(good))
            except FuscError as exc:
                metrics.count_error(exc.code)
                raise
        return self.answers(prepared, inference, kind)


def limit_blas_threads() -> None:
    """numpy's BLAS to one thread in this process. Its only product here is the OOD bank's (a batch against
    the bank, ~1 ms); OpenBLAS threads spin while they wait, and under load beside the preprocessing threads
    and ONNX Runtime that product took 60-90 ms instead of 5 ms (measured on 2 cores)."""
    threadpool_limits(limits=1, user_api="blas")


def load_pipeline(settings: Settings) -> Pipeline:
    """Card (hashes verified), backend, pipeline; an inconsistent repository raises ModelRepositoryError."""
    limit_blas_threads()
    card = load_card(settings.model_repository, verify=True)
    # The default of 0 intra-op threads means "half the cores" here (Settings.ort_threads), not ONNX
    # Runtime's own "all physical cores": the preprocessing threads need the rest.
    backend = make_backend(settings.model_copy(update={"ort_intra_op_threads": settings.ort_threads}), card)
    return Pipeline(
        card,
        backend,
        repository=settings.model_repository,
        max_bytes=settings.max_upload_bytes,
        max_pixels=settings.max_pixels,
        drift_window=settings.drift_window,
    )
