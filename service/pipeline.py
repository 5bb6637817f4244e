"""The whole data path for one request: bytes -> decode -> clean -> embed -> assign -> ClusterResult.

No HTTP here. The steps are public (``prepare``, ``infer``, ``result``) so that the service can put its
adaptive batcher between them; ``cluster`` chains them for a list of images in one model call.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel

from service import metrics
from service.backends import Backend, make_backend
from service.card import ModelCard, load_card
from service.clean import preprocess
from service.decode import decode_image
from service.errors import DecodeError, EmptyInputError, FuscError, ImageTooLargeError
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


class ClusterResult(BaseModel):
    cluster: int
    confidence: float
    top: list[TopCluster]
    view: str | None
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


@dataclass(frozen=True)
class Prepared:
    """One image ready for the model: the (1,S,S) tensor and what it cost to get there."""

    tensor: np.ndarray
    decode_ms: float
    clean_ms: float


@dataclass(frozen=True)
class Inference:
    probs: np.ndarray  # float32 [N,K]
    ood_score: np.ndarray  # float32 [N]: cosine similarity to the nearest training centroid (nan: none)
    embed_ms: float
    assign_ms: float


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


class Pipeline:
    def __init__(
        self,
        card: ModelCard,
        backend: Backend,
        *,
        max_bytes: int = 64 * 1024 * 1024,
        max_pixels: int = 50_000_000,
    ) -> None:
        self.card = card
        self.backend = backend
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        size = card.preprocess.size
        self.input_shape = (1, size, size)
        self.centroids = np.asarray(card.ood.centroids, dtype=np.float32).T if card.ood is not None else None

    # Errors are counted in fusc_errors_total where they are answered (cluster() here, the HTTP layer in
    # the service), so that prepare() and infer() can be chained by either without counting twice.
    def prepare(self, data: bytes) -> Prepared:
        """decode + clean one image; raises a FuscError that belongs to this image only."""
        if not data:
            raise EmptyInputError("the upload is empty: send the image bytes")
        if len(data) > self.max_bytes:
            raise ImageTooLargeError(f"the upload is larger than the limit of {self.max_bytes} bytes")
        t0 = time.perf_counter()
        try:
            frame = decode_image(data, max_pixels=self.max_pixels, max_bytes=self.max_bytes)
        except FuscError:
            raise
        except Exception as exc:
            # Crafted bytes can trip a decoder in ways it does not classify; that is still the input's fault.
            # Only the exception type is logged: a decoder's message may quote header fields.
            logger.warning("decoder raised %s; answering corrupt_image", type(exc).__name__)
            raise DecodeError("the image could not be decoded; it may be corrupt or truncated") from exc
        t1 = time.perf_counter()
        try:
            tensor = preprocess(frame, self.card.preprocess)
        except FuscError:
            raise
        except Exception as exc:
            logger.warning("preprocess raised %s; answering preprocess_failed", type(exc).__name__)
            raise PreprocessError("the image decoded but could not be prepared for the model") from exc
        t2 = time.perf_counter()
        tensor = np.asarray(tensor, dtype=np.float32)
        if tensor.shape != self.input_shape:
            raise PreprocessError(
                f"preprocessing gave shape {tensor.shape}, the model needs {self.input_shape}"
            )
        metrics.observe_stage("decode", t1 - t0)
        metrics.observe_stage("clean", t2 - t1)
        return Prepared(tensor=tensor, decode_ms=_ms(t1 - t0), clean_ms=_ms(t2 - t1))

    def infer(self, x: np.ndarray) -> Inference:
        """embed + assign one batch [N,1,S,S]; a backend failure raises BackendUnavailableError (503)."""
        t0 = time.perf_counter()
        emb = self.backend.embed(x)
        t1 = time.perf_counter()
        probs = self.backend.assign(emb)
        t2 = time.perf_counter()
        metrics.BATCH_SIZE.observe(len(x))
        metrics.observe_stage("embed", t1 - t0)
        metrics.observe_stage("assign", t2 - t1)
        if self.centroids is not None:
            ood_score = (np.asarray(emb, dtype=np.float32) @ self.centroids).max(axis=1)
        else:
            ood_score = np.full(len(x), np.nan, np.float32)
        return Inference(probs=probs, ood_score=ood_score, embed_ms=_ms(t1 - t0), assign_ms=_ms(t2 - t1))

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
        if self.card.ood is not None and np.isfinite(ood_score):
            score = float(ood_score)
            ood = score < self.card.ood.threshold
            if ood:
                metrics.OOD.inc()
        # Stable sort: ties go to the lower cluster id, as argmax does.
        order = np.argsort(-probs, kind="stable")[:TOP_K]
        cluster = int(order[0])
        confidence = float(probs[cluster])
        metrics.record_assignment(cluster, confidence)
        return ClusterResult(
            cluster=cluster,
            confidence=confidence,
            top=[
                TopCluster(cluster=int(c), probability=float(probs[c]), view=self.card.view_name(int(c)))
                for c in order
            ],
            view=self.card.view_name(cluster),
            ood=ood,
            ood_score=score,
            model_version=self.card.version,
            timings_ms=Timings(
                decode=prepared.decode_ms, clean=prepared.clean_ms, embed=embed_ms, assign=assign_ms
            ),
        )

    def cluster(self, images: list[bytes]) -> list[ClusterResult | FuscError]:
        """Each image's result or its own error, in order; the good ones share one model call.

        A backend failure is nobody's image's fault: it raises BackendUnavailableError for the whole call.
        """
        prepared: list[Prepared | FuscError] = []
        for data in images:
            try:
                prepared.append(self.prepare(data))
            except FuscError as exc:
                metrics.count_error(exc.code)
                prepared.append(exc)
        good = [p for p in prepared if isinstance(p, Prepared)]
        if not good:
            return [p for p in prepared if isinstance(p, FuscError)]
        try:
            inference = self.infer(np.stack([p.tensor for p in good]))
        except FuscError as exc:
            metrics.count_error(exc.code)
            raise
        rows = iter(zip(inference.probs, inference.ood_score, strict=True))
        out: list[ClusterResult | FuscError] = []
        for p in prepared:
            if isinstance(p, FuscError):
                out.append(p)
            else:
                probs, score = next(rows)
                out.append(self.result(p, probs, inference.embed_ms, inference.assign_ms, float(score)))
        return out


def load_pipeline(settings: Settings) -> Pipeline:
    """Card (hashes verified), backend, pipeline; an inconsistent repository raises ModelRepositoryError."""
    card = load_card(settings.model_repository, verify=True)
    backend = make_backend(settings, card)
    return Pipeline(card, backend, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels)
