"""Admission and batching: what stands between an HTTP request and the model (no HTTP in here).

Three parts, one per stage a request goes through:

* :class:`Admission` counts requests, upload bytes and images in flight. A request is admitted before its
  body is read (bytes from Content-Length; for a body without one, a running count while it streams) and
  its images are admitted once the multipart body has told how many there are. Past any limit, or when the
  predicted time to answer the new images exceeds the latency budget, it raises
  :class:`~service.errors.OverloadedError` (503 with Retry-After): memory and waiting time stay bounded,
  whatever the offered load.
* :class:`Preprocessor` decodes and cleans on a thread pool (OpenCV and the codecs release the GIL), one
  image per thread at a time, so at most ``threads`` full-size frames exist at once;
  :class:`ProcessPreprocessor` does the same in worker processes, which share no GIL with the server.
* :class:`Batcher` queues prepared tensors (bounded in images) and forms model batches: up to
  ``max_batch`` images, holding the first at most ``max_wait`` for more, and not at all when no other
  image is on its way (latency-aware: under light load a request never waits for company that is not
  coming). One model call runs at a time, on its own thread; images whose latency budget has run out
  while queued are answered 503 rather than run late.

:class:`Scheduler` chains them for the service: admitted uploads -> prepared tensors -> one batched model
call per batch -> the same :meth:`service.pipeline.Pipeline.answers` that ``Pipeline.cluster`` uses.
"""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from service import metrics
from service.clean import CleanConfig
from service.errors import DecodeError, FuscError, OverloadedError
from service.pipeline import Inference, Pipeline, Prepared, observe_prepared, prepare_image
from service.settings import Settings

logger = logging.getLogger("fusc.service")

R = TypeVar("R")
# Weight of the newest measurement in the moving averages behind the latency predictions.
_EWMA_ALPHA = 0.2


class _Average:
    """Exponentially weighted moving average; None until the first sample."""

    def __init__(self) -> None:
        self.value: float | None = None

    def add(self, sample: float) -> None:
        self.value = sample if self.value is None else self.value + _EWMA_ALPHA * (sample - self.value)


# ------------------------------------------------------------------------------------------- admission
class Admission:
    """Requests, bytes and images in flight. Used from the event loop only, so plain counters suffice."""

    def __init__(
        self,
        *,
        max_requests: int,
        max_bytes: int,
        max_images: int,
        max_latency_s: float = math.inf,
        predict_s: Callable[[int], float] | None = None,
    ) -> None:
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.max_images = max_images
        self.max_latency_s = max_latency_s
        # Seconds until the last of this many images in flight would be answered, from measured rates.
        self.predict_s = predict_s or (lambda images: 0.0)
        self.requests = 0
        self.bytes = 0
        self.images = 0

    def enter(self, declared_bytes: int | None = None) -> Ticket:
        """Admit one request before its body is read; raises OverloadedError when it must wait instead."""
        if self.requests >= self.max_requests:
            raise OverloadedError(f"the service is busy ({self.requests} requests in flight); retry shortly")
        ticket = Ticket(self)
        if declared_bytes:
            ticket.reserve(declared_bytes)  # raises before anything is counted for this request
        self.requests += 1
        metrics.INFLIGHT_REQUESTS.set(self.requests)
        ticket.open = True
        return ticket

    def _take_bytes(self, n: int, own: int) -> None:
        # A request alone in the service is never refused for its size: the body limit (413) bounds it.
        if self.bytes > own and self.bytes + n > self.max_bytes:
            raise OverloadedError(
                "the service holds as many uploaded bytes as it may; retry shortly or send smaller files"
            )
        self.bytes += n
        metrics.INFLIGHT_BYTES.set(self.bytes)

    def _take_images(self, n: int) -> None:
        if self.images + n > self.max_images:
            raise OverloadedError(f"the service has {self.images} images in progress; retry shortly")
        wait = self.predict_s(self.images + n)
        if wait > self.max_latency_s:
            raise OverloadedError(
                f"the service would answer in about {wait:.1f} s, over its limit of "
                f"{self.max_latency_s:.1f} s; retry shortly"
            )
        self.images += n
        metrics.INFLIGHT_IMAGES.set(self.images)

    def _give_back(self, requests: int, nbytes: int, images: int) -> None:
        self.requests -= requests
        self.bytes -= nbytes
        self.images -= images
        metrics.INFLIGHT_REQUESTS.set(self.requests)
        metrics.INFLIGHT_BYTES.set(self.bytes)
        metrics.INFLIGHT_IMAGES.set(self.images)

    def snapshot(self) -> dict[str, int]:
        return {"requests": self.requests, "bytes": self.bytes, "images": self.images}


class Ticket:
    """One admitted request's share of the limits; :meth:`close` gives it all back (idempotent)."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self.bytes = 0  # reserved
        self.seen = 0  # received so far
        self.images = 0
        self.open = False

    def reserve(self, nbytes: int) -> None:
        extra = nbytes - self.bytes
        if extra > 0:
            self._admission._take_bytes(extra, self.bytes)
            self.bytes += extra

    def received(self, nbytes: int) -> None:
        """Body bytes as they stream in: beyond the reservation (no Content-Length), the budget grows."""
        self.seen += nbytes
        if self.seen > self.bytes:
            self.reserve(self.seen)

    def release_bytes(self) -> None:
        """The uploads are decoded and dropped: their bytes no longer count."""
        self._admission._give_back(0, self.bytes, 0)
        self.bytes = 0

    def add_images(self, n: int) -> None:
        if n > 0:
            self._admission._take_images(n)
            self.images += n

    def close(self) -> None:
        if self.open:
            self.open = False
            self._admission._give_back(1, self.bytes, self.images)
            self.bytes = self.images = 0


# ------------------------------------------------------------------------------------------ preprocess
class Preprocessor:
    """decode + clean on ``threads`` threads; measures the time per image for the latency predictions."""

    def __init__(self, prepare: Callable[[bytes], Prepared], threads: int) -> None:
        self._prepare = prepare
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="fusc-preprocess")
        self.pending = 0  # images submitted and not yet prepared
        self.seconds_per_image = _Average()

    def _timed(self, data: bytes) -> Prepared | FuscError:
        t0 = time.perf_counter()
        try:
            return self._prepare(data)
        except FuscError as exc:
            return exc
        finally:
            self.seconds_per_image.add(time.perf_counter() - t0)

    async def run(self, data: bytes) -> Prepared | FuscError:
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, self._timed, data)
        finally:
            self.pending -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# In a worker process of ProcessPreprocessor: what prepare_image needs besides the bytes.
_WORKER_ARGS: tuple[CleanConfig, int, int, tuple[int, int, int]] | None = None


def _worker_init(cfg_json: str, max_bytes: int, max_pixels: int, input_shape: tuple[int, int, int]) -> None:
    global _WORKER_ARGS
    from service.pipeline import limit_blas_threads

    limit_blas_threads()
    _WORKER_ARGS = (CleanConfig.model_validate_json(cfg_json), max_bytes, max_pixels, input_shape)


def _worker_prepare(data: bytes) -> Prepared | FuscError:
    assert _WORKER_ARGS is not None, "worker process not initialised"
    try:
        return prepare_image(data, *_WORKER_ARGS)
    except FuscError as exc:
        exc.__cause__ = exc.__context__ = None  # a decoder's own exception may not pickle
        return exc


def _worker_ready() -> int:
    return 0


class ProcessPreprocessor(Preprocessor):
    """decode + clean in ``workers`` worker processes (FUSC_PREPROCESS_MODE=processes).

    The HTTP server's process keeps its GIL for HTTP, batching and the model; the workers hold none of it.
    The bytes go to a worker and a (1,S,S) tensor comes back; a worker process holds one image at a time,
    as a thread does. A worker that dies (a decoder crashing on crafted bytes, the kernel's OOM killer) takes
    only its process: the pool is rebuilt and the images it held are tried once more in the new one; an
    image that kills a worker twice is answered ``corrupt_image``.
    """

    def __init__(self, pipeline: Pipeline, workers: int) -> None:
        self._args = (
            pipeline.card.preprocess.model_dump_json(),
            pipeline.max_bytes,
            pipeline.max_pixels,
            pipeline.input_shape,
        )
        self.threads = workers
        self.pending = 0
        self.seconds_per_image = _Average()
        self._generation = 0
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn, not fork: the server process runs threads (the event loop's, ONNX Runtime's).
        pool = ProcessPoolExecutor(
            self.threads,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init,
            initargs=self._args,
        )
        for _ in range(self.threads):
            pool.submit(_worker_ready)  # start the workers now, not in the first request
        return pool

    async def _submit(self, data: bytes) -> Prepared | FuscError:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            out = await asyncio.wrap_future(self._pool.submit(_worker_prepare, data), loop=loop)
        finally:
            self.seconds_per_image.add(time.perf_counter() - t0)
        return out

    async def run(self, data: bytes) -> Prepared | FuscError:
        self.pending += 1
        try:
            for _ in range(2):  # a worker that dies costs its images one more try in the new pool
                generation = self._generation
                try:
                    out = await self._submit(data)
                except BrokenProcessPool:
                    if generation == self._generation:  # the first to notice rebuilds the pool
                        logger.warning("a preprocessing worker process died; starting a new pool")
                        self._pool.shutdown(wait=False, cancel_futures=True)
                        self._generation += 1
                        self._pool = self._new_pool()
                    continue
                if isinstance(out, Prepared):
                    observe_prepared(out)
                return out
            return DecodeError("the image could not be decoded: it stopped the decoder twice")
        finally:
            self.pending -= 1


# --------------------------------------------------------------------------------------------- batcher
@dataclass
class _Job:
    x: np.ndarray
    future: asyncio.Future[Any]
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def n(self) -> int:
        return len(self.x)


class Batcher(Generic[R]):
    """A queue of tensors bounded in images, and the batch former that empties it into model calls.

    ``run`` takes the concatenated [N, ...] tensors and returns one result for all; ``split(result, a, b)``
    gives rows a..b of it back to the job they belong to. ``upstream()`` tells how many images are still
    being prepared: the former waits for company only while some is on its way.
    """

    def __init__(
        self,
        run: Callable[[np.ndarray], R],
        split: Callable[[R, int, int], R],
        *,
        max_batch: int,
        max_wait_s: float,
        max_images: int,
        max_latency_s: float,
        merge: bool = True,
        upstream: Callable[[], int] = lambda: 0,
    ) -> None:
        self._run = run
        self._split = split
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_images = max_images
        self.max_latency_s = max_latency_s
        self.merge = merge
        self._upstream = upstream
        self._queue: deque[_Job] = deque()
        self.queued = 0  # images waiting
        self.running = 0  # images in the model call now
        self.seconds_per_image = _Average()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._model = ThreadPoolExecutor(1, thread_name_prefix="fusc-model")

    def predicted_wait_s(self, extra: int = 0) -> float:
        per_image = self.seconds_per_image.value or 0.0
        return (self.queued + self.running + extra) * per_image

    async def submit(self, x: np.ndarray) -> R:
        """The model's result for ``x`` (one request's images), batched with other requests' images."""
        n = len(x)
        if self.queued + n > self.max_images:
            raise OverloadedError(f"the model queue holds {self.queued} images; retry shortly")
        if self.predicted_wait_s(n) > self.max_latency_s:
            raise OverloadedError("the model queue is longer than the latency budget allows; retry shortly")
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._form_batches(), name="fusc-batcher")
        assert self._wakeup is not None
        job = _Job(x, loop.create_future())
        self._queue.append(job)
        self.queued += n
        self._wakeup.set()
        return await job.future

    async def _wait_for_company(self) -> None:
        """Hold the first queued job until the batch is full, ``max_wait_s`` has passed since it was
        queued, its latency budget would run short, or no other image is on its way."""
        assert self._wakeup is not None
        first = self._queue[0]
        deadline = first.enqueued + min(self.max_wait_s, self.max_latency_s / 2)
        while self.queued < self.max_batch and self._upstream() > 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take(self) -> list[_Job]:
        jobs = [self._queue.popleft()]
        if self.merge:
            total = jobs[0].n
            while self._queue and total + self._queue[0].n <= self.max_batch:
                total += self._queue[0].n
                jobs.append(self._queue.popleft())
        self.queued -= sum(j.n for j in jobs)
        return jobs

    async def _form_batches(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self.merge and self.max_wait_s > 0:
                await self._wait_for_company()
            jobs = self._take()
            now = time.monotonic()
            live: list[_Job] = []
            for job in jobs:
                if job.future.done():  # its caller went away (cancelled)
                    continue
                if now - job.enqueued > self.max_latency_s:
                    job.future.set_exception(OverloadedError("the image waited too long for the model"))
                    continue
                metrics.QUEUE_WAIT.observe(now - job.enqueued)
                live.append(job)
            if not live:
                continue
            x = live[0].x if len(live) == 1 else np.concatenate([j.x for j in live])
            self.running = len(x)
            t0 = time.perf_counter()
            try:
                out = await loop.run_in_executor(self._model, self._run, x)
            except Exception as exc:  # the model's failure is every waiting caller's answer
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            finally:
                self.running = 0
            self.seconds_per_image.add((time.perf_counter() - t0) / len(x))
            start = 0
            for job in live:
                if not job.future.done():
                    job.future.set_result(self._split(out, start, start + job.n))
                start += job.n

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        for job in self._queue:
            if not job.future.done():
                job.future.set_exception(OverloadedError("the service is shutting down"))
        self._queue.clear()
        self._model.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------------------- scheduler
class Scheduler:
    """The service's one path from admitted uploads to answers, for every route."""

    def __init__(self, pipeline: Pipeline, settings: Settings) -> None:
        self.pipeline = pipeline
        self.settings = settings
        self.preprocessor: Preprocessor = (
            ProcessPreprocessor(pipeline, settings.preprocess_workers)
            if settings.preprocess_mode == "processes"
            else Preprocessor(pipeline.prepare, settings.preprocess_workers)
        )
        self.batcher: Batcher[Inference] = Batcher(
            pipeline.infer,
            Inference.rows,
            max_batch=settings.batch_max_size,
            max_wait_s=settings.batch_max_wait_ms / 1000.0,
            max_images=settings.max_queued_images,
            max_latency_s=settings.batch_max_latency_ms / 1000.0,
            merge=settings.adaptive_batching == "on",
            upstream=lambda: self.preprocessor.pending,
        )
        self.admission = Admission(
            max_requests=settings.max_concurrent_requests,
            max_bytes=settings.max_inflight_bytes,
            max_images=settings.max_queued_images,
            max_latency_s=settings.batch_max_latency_ms / 1000.0,
            predict_s=self.predicted_s,
        )

    def predicted_s(self, images: int) -> float:
        """Seconds until the last of ``images`` images in flight is answered: the slower of the two stages
        sets the pace (they overlap), plus one image's own way through both."""
        prep = self.preprocessor.seconds_per_image.value
        model = self.batcher.seconds_per_image.value or 0.0
        if prep is None:
            return 0.0  # nothing measured yet: the image bound alone applies
        pace = max(prep / self.preprocessor.threads, model)
        return images * pace + prep

    async def prepare(self, uploads: list[bytes | FuscError], ticket: Ticket) -> list[Prepared | FuscError]:
        """decode + clean every upload on the pool; the upload bytes are released as soon as all are done."""
        try:
            prepared = await asyncio.gather(
                *(self._prepare_one(u) if isinstance(u, bytes) else _done(u) for u in uploads)
            )
        finally:
            uploads.clear()
            ticket.release_bytes()
        return list(prepared)

    async def _prepare_one(self, data: bytes) -> Prepared | FuscError:
        return await self.preprocessor.run(data)

    async def infer(self, prepared: Sequence[Prepared | FuscError]) -> Inference | None:
        """One model result for the good images, batched with other requests; None when there are none."""
        good = [p.tensor for p in prepared if isinstance(p, Prepared)]
        if not good:
            return None
        return await self.batcher.submit(np.stack(good))

    async def close(self) -> None:
        await self.batcher.close()
        self.preprocessor.close()

    def snapshot(self) -> dict[str, Any]:
        return {
            "inflight": self.admission.snapshot(),
            "preprocessing": self.preprocessor.pending,
            "queued_for_model": self.batcher.queued,
        }


async def _done(value: R) -> R:
    return value
