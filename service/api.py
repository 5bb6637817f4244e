"""The HTTP face of the data path: the BentoML 1.4 service, ``bentoml serve service.api:FuscService``.

Public routes live in a small Starlette app mounted at ``/v1`` with ``@bentoml.asgi_app``: ``@bentoml.api``
validates its inputs before our code runs and answers a missing field with BentoML's own error JSON.
Mounted, we parse the multipart body ourselves (streamed, refused once past a byte limit), and every error is
``{"error": {"code", "message"}}`` with the exact status of its FuscError, plus ``Retry-After`` on 503.

Batching: concurrent requests share one model call through BentoML's adaptive batcher (``CorkDispatcher``,
the algorithm behind ``@bentoml.api(batchable=True)``), driven in-process. The public way to reach it from a
mounted app is an HTTP hop through the service's self-client; measured here, that hop cost 10-30 ms per
request (tensors serialised to JSON) and BentoML 1.4.39's self-client drops the calls in flight each time it
recycles its session (every 100 calls). ``CorkDispatcher`` is internal to BentoML, hence the exact pin of
bentoml in pyproject.toml; ``FUSC_ADAPTIVE_BATCHING=off`` makes each HTTP request one model call (the batch
endpoint still batches its own files).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any

import anyio.to_thread
import bentoml
import numpy as np
from bentoml._internal.marshal.dispatcher import CorkDispatcher
from bentoml.exceptions import BentoMLException
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service import metrics
from service.errors import (
    BackendUnavailableError,
    BadRequestError,
    FuscError,
    ImageTooLargeError,
)
from service.pipeline import BatchResponse, ClusterResult, ErrorResponse, Pipeline, Prepared, load_pipeline
from service.settings import Settings

logger = logging.getLogger("fusc.service")

# Validated at import, so that `bentoml serve` exits at once on a bad FUSC_* variable.
SETTINGS = Settings.from_env()
# Room for multipart boundaries and part headers on top of the file bytes themselves.
_MULTIPART_OVERHEAD = 64 * 1024


def _row_dtype(num_clusters: int) -> np.dtype:
    """One image's model output as the batcher passes it around: it concatenates and splits numpy arrays."""
    return np.dtype(
        [("probs", "<f4", (num_clusters,)), ("ood_score", "<f4"), ("embed_ms", "<f8"), ("assign_ms", "<f8")]
    )


# ------------------------------------------------------------------------------------------------ errors
def error_response(exc: FuscError, retry_after_s: int) -> JSONResponse:
    headers = {"Retry-After": str(retry_after_s)} if exc.http_status == 503 else None
    return JSONResponse(ErrorResponse.of(exc).model_dump(), status_code=exc.http_status, headers=headers)


class NotReadyError(BackendUnavailableError):
    code = "model_not_loaded"


class OverloadedError(BackendUnavailableError):
    """The batcher predicts that this call cannot finish within ``batch_max_latency_ms``: shed, not queued."""

    code = "overloaded"


# ----------------------------------------------------------------------------------------- multipart
async def _limited(stream: AsyncGenerator[bytes, None], limit: int) -> AsyncGenerator[bytes, None]:
    total = 0
    async for chunk in stream:
        total += len(chunk)
        if total > limit:
            raise ImageTooLargeError(f"the request body is larger than the limit of {limit} bytes")
        yield chunk


async def read_uploads(request: Request, field: str, *, max_files: int, settings: Settings) -> list[bytes]:
    """The bytes of every file sent in multipart ``field``; the body is refused once it passes the limit.

    A single file over ``max_upload_bytes`` inside a batch is that item's 413, answered by the pipeline.
    """
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise BadRequestError(
            f"send the image as a multipart/form-data file field named '{field}'",
            code="unsupported_media_type",
            http_status=415,
        )
    limit = min(max_files * settings.max_upload_bytes, settings.max_request_bytes) + _MULTIPART_OVERHEAD
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ImageTooLargeError(f"the request body is larger than the limit of {limit} bytes")
    # One more file than allowed, so that "too many" gets our message rather than the parser's.
    parser = MultiPartParser(
        request.headers, _limited(request.stream(), limit), max_files=max_files + 1, max_fields=16
    )
    try:
        form = await parser.parse()
    except (MultiPartException, HTTPException, ValueError, KeyError) as exc:
        logger.info("malformed multipart body (%s)", type(exc).__name__)
        raise BadRequestError(
            "the multipart/form-data body is malformed", code="malformed_multipart"
        ) from exc
    try:
        items = form.getlist(field)
        if not items:
            raise BadRequestError(f"the multipart field '{field}' is missing", code="missing_field")
        if len(items) > max_files:
            raise BadRequestError(
                f"at most {max_files} file(s) may be sent in '{field}' per request", code="too_many_files"
            )
        uploads: list[bytes] = []
        for item in items:
            if not isinstance(item, UploadFile):
                raise BadRequestError(f"the field '{field}' must be a file upload, not a text value")
            # The caller's file name (item.filename) is deliberately never read: it may name the patient.
            uploads.append(await item.read())
        return uploads
    finally:
        await form.close()


# ------------------------------------------------------------------------------------------- handlers
def _service() -> tuple[FuscService, Pipeline]:
    try:
        svc = bentoml.get_current_service()
    except BentoMLException:
        svc = None
    if not isinstance(svc, FuscService.inner) or svc.pipeline is None:
        raise NotReadyError("the model is not loaded; the server log says why")
    return svc, svc.pipeline


Handler = Callable[[Request, "FuscService", Pipeline], Awaitable[Response]]


def _endpoint(name: str, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Wrap a handler: FuscError -> its JSON and status, anything else -> a logged 500, always counted."""

    async def endpoint(request: Request) -> Response:
        retry_after_s = SETTINGS.retry_after_s
        try:
            svc, pipeline = _service()
            retry_after_s = svc.settings.retry_after_s
            response = await handler(request, svc, pipeline)
        except FuscError as exc:
            metrics.count_error(exc.code)
            response = error_response(exc, retry_after_s)
        except Exception:
            # A bug, not the caller's fault; the traceback names no image data, only our code.
            logger.exception("unexpected failure in %s", name)
            metrics.count_error("internal_error")
            response = error_response(
                FuscError("an unexpected error occurred; see the server log"), retry_after_s
            )
        metrics.count_request(name, response.status_code)
        return response

    return endpoint


async def _cluster_one(request: Request, svc: FuscService, pipeline: Pipeline) -> Response:
    (data,) = await read_uploads(request, "image", max_files=1, settings=svc.settings)
    prepared = await anyio.to_thread.run_sync(pipeline.prepare, data)
    (row,) = await svc.model_call([prepared])
    result = pipeline.result(
        prepared, row["probs"], float(row["embed_ms"]), float(row["assign_ms"]), float(row["ood_score"])
    )
    return JSONResponse(result.model_dump())


async def _cluster_batch(request: Request, svc: FuscService, pipeline: Pipeline) -> Response:
    uploads = await read_uploads(
        request, "images", max_files=svc.settings.max_batch_files, settings=svc.settings
    )

    def prepare(data: bytes) -> Prepared | FuscError:
        try:
            return pipeline.prepare(data)
        except FuscError as exc:
            return exc

    prepared = await asyncio.gather(*(anyio.to_thread.run_sync(prepare, d) for d in uploads))
    good = [p for p in prepared if isinstance(p, Prepared)]
    rows = iter(await svc.model_call(good)) if good else iter(())
    results: list[ClusterResult | ErrorResponse] = []
    for p in prepared:
        if isinstance(p, FuscError):
            metrics.count_error(p.code)  # counted where answered, like the errors of a whole request
            results.append(ErrorResponse.of(p))
        else:
            row = next(rows)
            results.append(
                pipeline.result(
                    p, row["probs"], float(row["embed_ms"]), float(row["assign_ms"]), float(row["ood_score"])
                )
            )
    return JSONResponse(BatchResponse(results=results).model_dump())


async def _model_summary(request: Request, svc: FuscService, pipeline: Pipeline) -> Response:
    return JSONResponse(svc.summary())


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 in our JSON shape, so that every answer under /v1 parses the same way."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    code = {404: "not_found", 405: "method_not_allowed"}.get(status, "bad_request")
    return error_response(FuscError(str(getattr(exc, "detail", "")), code=code, http_status=status), 1)


app = Starlette(
    routes=[
        Route("/cluster", _endpoint("cluster", _cluster_one), methods=["POST"]),
        Route("/cluster/batch", _endpoint("cluster_batch", _cluster_batch), methods=["POST"]),
        Route("/model", _endpoint("model", _model_summary), methods=["GET"]),
    ],
    exception_handlers={HTTPException: _http_error},
)


# -------------------------------------------------------------------------------------------- service
@bentoml.asgi_app(app, path="/v1")
@bentoml.service(name="fusc", workers=1, traffic={"timeout": 60})
class FuscService:
    def __init__(self) -> None:
        self.settings = Settings.from_env()
        logging.getLogger("fusc").setLevel(self.settings.log_level)
        self.pipeline: Pipeline | None = None
        self.batching = False
        self._batcher: Callable[[np.ndarray], Awaitable[np.ndarray]] | None = None
        try:
            self.pipeline = load_pipeline(self.settings)
        except FuscError as exc:
            # A tampered or half-copied repository must not serve answers. Raising here would not stop
            # `bentoml serve` (its arbiter outlives the failed worker and holds the port, so probes hang);
            # instead the process stays alive and unready, and every call answers 503 model_not_loaded.
            logger.error("the model was not loaded (%s): %s", exc.code, exc.message)
            return
        card = self.pipeline.card
        self._rows = _row_dtype(card.num_clusters)
        self.batching = self.settings.adaptive_batching == "on"
        dispatcher: CorkDispatcher[np.ndarray, np.ndarray] = CorkDispatcher(
            max_latency_in_ms=self.settings.batch_max_latency_ms,
            max_batch_size=self.settings.batch_max_size,
            fallback=self._overloaded,
            get_batch_size=len,
            batch_dim=(0, 0),
        )
        self._dispatcher = dispatcher
        self._batcher = dispatcher(self._run_batch)
        metrics.set_model_info(card.name, card.version, self.pipeline.backend.name)
        logger.info(
            "serving model %s %s (K=%d), adaptive batching %s, preprocessing %s",
            card.name,
            card.version,
            card.num_clusters,
            "on" if self.batching else "off",
            card.preprocess,
        )

    def __is_ready__(self) -> bool:
        return self.pipeline is not None and self.pipeline.backend.ready()

    @bentoml.on_shutdown
    def _stop_batcher(self) -> None:
        if self.pipeline is not None:
            self._dispatcher.shutdown()

    def summary(self) -> dict[str, Any]:
        assert self.pipeline is not None
        card = self.pipeline.card
        return {
            # The OOD centroids are K x D numbers of no use to a reader; the threshold stays.
            **card.model_dump(mode="json", exclude={"ood": {"centroids"}}),
            "backend": {**self.pipeline.backend.describe(), "adaptive_batching": self.batching},
            "limits": {
                "max_upload_bytes": self.settings.max_upload_bytes,
                "max_request_bytes": self.settings.max_request_bytes,
                "max_pixels": self.settings.max_pixels,
                "max_batch_files": self.settings.max_batch_files,
            },
        }

    def _infer_rows(self, x: np.ndarray) -> np.ndarray:
        """embed + assign on [N,1,S,S]; one structured row per image (probabilities and batch timings)."""
        assert self.pipeline is not None
        out = self.pipeline.infer(x)
        rows = np.empty(len(x), dtype=self._rows)
        rows["probs"] = out.probs
        rows["ood_score"] = out.ood_score
        rows["embed_ms"] = out.embed_ms
        rows["assign_ms"] = out.assign_ms
        return rows

    async def _run_batch(self, jobs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The batcher's callback: the queued requests' tensors in one model call, the rows split back."""
        rows = await anyio.to_thread.run_sync(self._infer_rows, np.concatenate(jobs))
        return np.split(rows, np.cumsum([len(j) for j in jobs])[:-1])

    @staticmethod
    def _overloaded() -> np.ndarray:
        raise OverloadedError("the service is overloaded; retry shortly")

    async def model_call(self, prepared: list[Prepared]) -> np.ndarray:
        """Rows for these images, through the adaptive batcher when it is on (shared with other requests)."""
        x = np.stack([p.tensor for p in prepared])
        if self._batcher is None or not self.batching:
            return await anyio.to_thread.run_sync(self._infer_rows, x)
        return await self._batcher(x)
