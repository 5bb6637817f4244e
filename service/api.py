"""The HTTP face of the data path: the BentoML 1.4 service, ``bentoml serve service.api:FuscService``.

Public routes live in a small Starlette app mounted at ``/v1`` with ``@bentoml.asgi_app``: ``@bentoml.api``
would validate inputs before our code runs and answer in BentoML's own error JSON. Every error is
``{"error": {"code", "message"}}`` with the exact status of its FuscError, plus ``Retry-After`` on 503.

Every image route takes the same path: API key (:class:`FrontDoor`) -> admission before the body is read
-> the multipart body streamed into memory within its limits (:mod:`service.uploads`) -> decode + clean on
a thread pool -> one model call batched with other requests' images -> :meth:`Pipeline.answers`
(:mod:`service.batching`). ``/v1/cluster`` and ``/v1/embed`` are that path with one file.

:class:`FrontDoor`, an ASGI middleware in front of BentoML's own routes, serves the OpenAPI document at
``/docs.json`` and a docs page at ``/`` and ``/docs`` (BentoML's page loads third-party scripts), answers a
failed ``/readyz`` in the JSON error shape, and checks API keys on ``/v1`` when ``FUSC_API_KEYS`` is set.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio.to_thread
import bentoml
from bentoml.exceptions import BentoMLException
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from service import metrics
from service.batching import Scheduler
from service.errors import BadRequestError, FuscError, ImageTooLargeError, NotReadyError, UnauthorizedError
from service.openapi import build_openapi, docs_page
from service.pipeline import BatchResponse, ErrorResponse, Kind, Pipeline, load_pipeline
from service.settings import Settings
from service.uploads import read_files

logger = logging.getLogger("fusc.service")

# Validated at import, so that `bentoml serve` exits at once on a bad FUSC_* variable.
SETTINGS = Settings.from_env()
# Room for multipart boundaries and part headers on top of the file bytes themselves.
_MULTIPART_OVERHEAD = 64 * 1024
V1_ROUTES = {
    "/v1/cluster": "POST",
    "/v1/cluster/batch": "POST",
    "/v1/embed": "POST",
    "/v1/model": "GET",
    "/v1/similar": "POST",
}


# ------------------------------------------------------------------------------------------------ errors
def error_response(exc: FuscError, retry_after_s: int, headers: dict[str, str] | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if exc.http_status == 503:
        headers["Retry-After"] = str(retry_after_s)
    if exc.http_status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(ErrorResponse.of(exc).model_dump(), status_code=exc.http_status, headers=headers)


# ------------------------------------------------------------------------------------------- handlers
def _service() -> tuple[FuscService, Pipeline]:
    try:
        svc = bentoml.get_current_service()
    except BentoMLException:
        svc = None
    if not isinstance(svc, FuscService.inner) or svc.pipeline is None or svc.scheduler is None:
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


async def answer_images(
    request: Request, svc: FuscService, pipeline: Pipeline, *, field: str, max_files: int, kind: Kind
) -> list[Any]:
    """The one path of every image route: admission, uploads, preprocessing, batched model, answers."""
    settings, scheduler = svc.settings, svc.scheduler
    assert scheduler is not None
    max_body = min(max_files * settings.max_upload_bytes, settings.max_request_bytes) + _MULTIPART_OVERHEAD
    declared = request.headers.get("content-length", "")
    declared_bytes = int(declared) if declared.isdigit() else None
    if declared_bytes is not None and declared_bytes > max_body:
        # Too large is the caller's fault whatever the load: 413 before admission (which would say 503).
        raise ImageTooLargeError(f"the request body is larger than the limit of {max_body} bytes")
    ticket = scheduler.admission.enter(declared_bytes)
    try:
        try:
            uploads = await read_files(
                request.headers,
                request.stream(),
                field,
                max_files=max_files,
                max_file_bytes=settings.max_upload_bytes,
                max_body_bytes=max_body,
                on_bytes=ticket.received,
            )
        except ClientDisconnect as exc:
            raise BadRequestError("the request body ended early", code="malformed_multipart") from exc
        ticket.add_images(sum(isinstance(u, bytes) for u in uploads))
        prepared = await scheduler.prepare(uploads, ticket)
        inference = await scheduler.infer(prepared)
        return pipeline.answers(prepared, inference, kind)
    finally:
        ticket.close()


def _single(kind: Kind) -> Handler:
    async def handler(request: Request, svc: FuscService, pipeline: Pipeline) -> Response:
        (answer,) = await answer_images(request, svc, pipeline, field="image", max_files=1, kind=kind)
        if isinstance(answer, FuscError):  # already counted where it was answered
            return error_response(answer, svc.settings.retry_after_s)
        return JSONResponse(answer.model_dump())

    return handler


async def _cluster_batch(request: Request, svc: FuscService, pipeline: Pipeline) -> Response:
    answers = await answer_images(
        request, svc, pipeline, field="images", max_files=svc.settings.max_batch_files, kind="cluster"
    )
    results = [ErrorResponse.of(a) if isinstance(a, FuscError) else a for a in answers]
    return JSONResponse(BatchResponse(results=results).model_dump())


async def _model_summary(request: Request, svc: FuscService, pipeline: Pipeline) -> Response:
    return JSONResponse(svc.summary())


async def _similar(request: Request, svc: FuscService, pipeline: Pipeline) -> Response:
    """The archive images nearest to the uploaded one (service.archive.similar), ``?k=`` of them."""
    from service.archive.similar import MAX_K, NoSimilarIndexError, SimilarResponse

    # Refused before the body is read: no index, or one of another model.
    if svc.similar_error is not None:
        raise svc.similar_error
    if svc.similar is None:
        raise NoSimilarIndexError("no similar-image index: start the service with FUSC_SIMILAR_INDEX=RUN_DIR")
    raw_k = request.query_params.get("k", "10")
    if not raw_k.isdigit() or not 1 <= int(raw_k) <= MAX_K:
        raise BadRequestError(f"k must be a whole number from 1 to {MAX_K}")
    (answer,) = await answer_images(request, svc, pipeline, field="image", max_files=1, kind="embed")
    if isinstance(answer, FuscError):  # already counted where it was answered
        return error_response(answer, svc.settings.retry_after_s)
    hits = await anyio.to_thread.run_sync(svc.similar.search, answer.embedding, int(raw_k))
    body = SimilarResponse(model_version=answer.model_version, index=svc.similar.info(), neighbours=hits)
    return JSONResponse(body.model_dump(mode="json"))


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 in our JSON shape (405 keeps its Allow header), counted like the rest."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    code = {404: "not_found", 405: "method_not_allowed"}.get(status, "bad_request")
    headers = dict(getattr(exc, "headers", None) or {})
    metrics.count_error(code)
    return error_response(
        FuscError(str(getattr(exc, "detail", "")), code=code, http_status=status), 1, headers
    )


app = Starlette(
    routes=[
        Route("/cluster", _endpoint("cluster", _single("cluster")), methods=["POST"]),
        Route("/cluster/batch", _endpoint("cluster_batch", _cluster_batch), methods=["POST"]),
        Route("/embed", _endpoint("embed", _single("embed")), methods=["POST"]),
        Route("/model", _endpoint("model", _model_summary), methods=["GET"]),
        Route("/similar", _endpoint("similar", _similar), methods=["POST"]),
    ],
    exception_handlers={HTTPException: _http_error},
)


# ------------------------------------------------------------------------------------------ front door
def _key_matches(presented: str, keys: tuple[str, ...]) -> bool:
    """Constant-time against every configured key (no early exit, so timing tells nothing)."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(presented.encode(), key.encode())
    return found


def _presented_key(headers: dict[bytes, bytes]) -> str:
    auth = headers.get(b"authorization", b"").decode("latin-1").strip()
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return headers.get(b"x-api-key", b"").decode("latin-1").strip()


class FrontDoor:
    """ASGI middleware before BentoML's routes: docs, /readyz's JSON failure, API keys on /v1."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._docs_for: tuple[object, str] | None = None
        self._doc = self._page = b""

    def _instance(self) -> FuscService | None:
        try:
            svc = bentoml.get_current_service()
        except BentoMLException:
            return None
        return svc if isinstance(svc, FuscService.inner) else None

    def _docs(self) -> tuple[bytes, bytes]:
        svc = self._instance()
        settings = svc.settings if svc is not None else SETTINGS
        version = svc.pipeline.card.version if svc is not None and svc.pipeline is not None else "unknown"
        if self._docs_for != (settings, version):  # built once per settings and model
            doc = build_openapi(settings, version)
            self._doc, self._page = json.dumps(doc).encode(), docs_page(doc).encode()
            self._docs_for = (settings, version)
        return self._doc, self._page

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        if method in ("GET", "HEAD") and path in ("/docs.json", "/", "/docs"):
            doc, page = self._docs()
            if path == "/docs.json":
                response: Response = Response(doc, media_type="application/json")
            else:
                response = Response(page, media_type="text/html; charset=utf-8")
                # The page needs nothing from anywhere; say so to the browser too.
                response.headers["Content-Security-Policy"] = "default-src 'none'; style-src 'unsafe-inline'"
            await response(scope, receive, send)
            return
        if path == "/readyz":
            svc = self._instance()
            # A remote backend's readiness is a network call: off the event loop, as BentoML does it.
            if svc is not None and await anyio.to_thread.run_sync(svc.__is_ready__):
                await PlainTextResponse("\n")(scope, receive, send)
                return
            retry = svc.settings.retry_after_s if svc is not None else SETTINGS.retry_after_s
            error = NotReadyError("the service is not ready: the model is not loaded or the backend is down")
            await error_response(error, retry)(scope, receive, send)
            return
        elif path == "/v1" or path.startswith("/v1/"):
            svc = self._instance()
            keys = svc.settings.api_keys if svc is not None else SETTINGS.api_keys
            if keys and not _key_matches(_presented_key(dict(scope["headers"])), keys):
                metrics.count_error("unauthorized")
                error = UnauthorizedError(
                    "an API key is required: send it as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
                )
                await error_response(error, 1)(scope, receive, send)
                return
            if path not in V1_ROUTES:
                metrics.count_error("not_found")
                error = FuscError(f"there is no route {path}", code="not_found", http_status=404)
                await error_response(error, 1)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# -------------------------------------------------------------------------------------------- service
@bentoml.asgi_app(app, path="/v1")
@bentoml.service(name="fusc", workers=1, traffic={"timeout": 60})
class FuscService:
    def __init__(self) -> None:
        self.settings = Settings.from_env()
        logging.getLogger("fusc").setLevel(self.settings.log_level)
        self.pipeline: Pipeline | None = None
        self.scheduler: Scheduler | None = None
        self.similar: Any = None  # service.archive.similar.SimilarIndex, when FUSC_SIMILAR_INDEX is set
        self.similar_error: FuscError | None = None
        try:
            self.pipeline = load_pipeline(self.settings)
        except FuscError as exc:
            # A tampered or half-copied repository must not serve answers. Raising here would not stop
            # `bentoml serve` (its arbiter outlives the failed worker and holds the port, so probes hang);
            # instead the process stays alive and unready, and every call answers 503 model_not_loaded.
            logger.error("the model was not loaded (%s): %s", exc.code, exc.message)
            return
        self.scheduler = Scheduler(self.pipeline, self.settings)
        card = self.pipeline.card
        self._load_similar()
        metrics.set_model_info(card.name, card.version, self.pipeline.backend.name)
        logger.info(
            "serving model %s %s (K=%d), batching %s (at most %d images, %.1f ms wait), %d preprocessing "
            "threads, %d ONNX Runtime threads, API keys %s, preprocessing %s",
            card.name,
            card.version,
            card.num_clusters,
            self.settings.adaptive_batching,
            self.settings.batch_max_size,
            self.settings.batch_max_wait_ms,
            self.settings.preprocess_workers,
            self.settings.ort_threads,
            "on" if self.settings.api_keys else "off",
            card.preprocess,
        )

    def _load_similar(self) -> None:
        """The similar-image index, when one is configured. A missing or mismatched index leaves the other
        routes serving; /v1/similar answers the reason (a mismatch: 409 index_model_mismatch)."""
        if self.settings.similar_index is None:
            return
        assert self.pipeline is not None
        from service.archive.similar import NoSimilarIndexError, SimilarIndex

        try:
            try:
                index = SimilarIndex.load(self.settings.similar_index)
            except (OSError, ValueError, RuntimeError) as exc:  # unreadable files, a run of another format
                raise NoSimilarIndexError(f"the similar-image index could not be loaded: {exc}") from exc
            index.check_model(self.pipeline.card, self.settings.precision)
        except FuscError as exc:
            logger.error("the similar-image index was not loaded (%s): %s", exc.code, exc.message)
            self.similar_error = exc
            return
        self.similar = index
        logger.info(
            "similar-image index: %s, %d images, model %s",
            index.meta.kind,
            index.meta.count,
            index.meta.model_version,
        )

    def __is_ready__(self) -> bool:
        return self.pipeline is not None and self.scheduler is not None and self.pipeline.backend.ready()

    @bentoml.on_shutdown
    async def _stop_scheduler(self) -> None:
        if self.scheduler is not None:
            await self.scheduler.close()

    def summary(self) -> dict[str, Any]:
        assert self.pipeline is not None and self.scheduler is not None
        card = self.pipeline.card
        s = self.settings
        return {
            # The OOD centroids are K x D numbers of no use to a reader; the threshold stays.
            **card.model_dump(mode="json", exclude={"ood": {"centroids"}}),
            "backend": {**self.pipeline.backend.describe(), "adaptive_batching": s.adaptive_batching == "on"},
            "limits": {
                "max_upload_bytes": s.max_upload_bytes,
                "max_request_bytes": s.max_request_bytes,
                "max_pixels": s.max_pixels,
                "max_batch_files": s.max_batch_files,
                "max_concurrent_requests": s.max_concurrent_requests,
                "max_inflight_bytes": s.max_inflight_bytes,
                "max_queued_images": s.max_queued_images,
                "batch_max_size": s.batch_max_size,
                "batch_max_wait_ms": s.batch_max_wait_ms,
                "batch_max_latency_ms": s.batch_max_latency_ms,
                "preprocess_threads": s.preprocess_workers,
                "ort_intra_op_threads": s.ort_threads,
            },
            "load": self.scheduler.snapshot(),
            "drift": self.pipeline.mix.snapshot(),
        }


FuscService.add_asgi_middleware(FrontDoor)
