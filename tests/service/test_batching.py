"""service/batching.py without HTTP: admission limits, the bounded queue and the batch former."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.batching import Admission, Batcher, Preprocessor
from service.errors import FuscError, ModelFailedError, OverloadedError
from service.settings import Settings, available_cores


# ------------------------------------------------------------------------------------------- admission
def test_requests_past_the_limit_are_refused_and_come_back() -> None:
    admission = Admission(max_requests=2, max_bytes=1000, max_images=10)
    a, b = admission.enter(), admission.enter()
    with pytest.raises(OverloadedError) as info:
        admission.enter()
    assert (info.value.code, info.value.http_status) == ("overloaded", 503)
    a.close()
    a.close()  # idempotent
    c = admission.enter()
    b.close(), c.close()
    assert admission.snapshot() == {"requests": 0, "bytes": 0, "images": 0}


def test_declared_bytes_are_reserved_before_the_body_is_read() -> None:
    admission = Admission(max_requests=10, max_bytes=1000, max_images=10)
    first = admission.enter(600)
    with pytest.raises(OverloadedError):
        admission.enter(500)
    assert admission.snapshot() == {"requests": 1, "bytes": 600, "images": 0}  # the refused one left no trace
    second = admission.enter(400)
    first.release_bytes()  # its uploads were decoded and dropped
    third = admission.enter(500)
    for t in (first, second, third):
        t.close()
    assert admission.snapshot() == {"requests": 0, "bytes": 0, "images": 0}


def test_a_body_without_content_length_is_counted_while_it_streams() -> None:
    admission = Admission(max_requests=10, max_bytes=1000, max_images=10)
    other = admission.enter(700)
    streaming = admission.enter(None)
    streaming.received(200)
    streaming.received(100)
    assert admission.bytes == 1000
    with pytest.raises(OverloadedError):
        streaming.received(1)
    streaming.close()
    other.close()
    assert admission.bytes == 0


def test_a_request_alone_is_never_refused_for_its_size() -> None:
    admission = Admission(max_requests=10, max_bytes=1000, max_images=10)
    alone = admission.enter(5000)  # the body limit (413), not the in-flight budget, bounds it
    alone.received(5000)
    with pytest.raises(OverloadedError):
        admission.enter(1)
    alone.close()


def test_images_are_bounded_and_predicted() -> None:
    admission = Admission(
        max_requests=10, max_bytes=1000, max_images=8, max_latency_s=1.0, predict_s=lambda n: 0.3 * n
    )
    t = admission.enter()
    t.add_images(3)  # 0.9 s predicted
    with pytest.raises(OverloadedError, match="answer in about 1.2 s"):
        t.add_images(1)
    admission.predict_s = lambda n: 0.0
    t.add_images(5)
    with pytest.raises(OverloadedError, match="images in progress"):
        t.add_images(1)
    t.close()
    assert admission.images == 0


def test_thread_defaults_share_the_cores() -> None:
    s = Settings()
    assert s.preprocess_workers == available_cores()
    assert s.ort_threads == max(1, available_cores() // 2)
    assert Settings(preprocess_threads=3, ort_intra_op_threads=5).preprocess_workers == 3
    assert Settings(preprocess_threads=3, ort_intra_op_threads=5).ort_threads == 5


# --------------------------------------------------------------------------------------------- batcher
class Model:
    """Records the size of every call; optionally slow or failing."""

    def __init__(self, delay_s: float = 0.0, fail: Exception | None = None) -> None:
        self.calls: list[int] = []
        self.delay_s = delay_s
        self.fail = fail
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.gate.wait(10)
        self.calls.append(len(x))
        time.sleep(self.delay_s)
        if self.fail is not None:
            raise self.fail
        return x.sum(axis=(1,)) * 10


def split(out: np.ndarray, a: int, b: int) -> np.ndarray:
    return out[a:b]


def batcher(model: Model, **kw) -> Batcher[np.ndarray]:
    options = dict(max_batch=8, max_wait_s=0.05, max_images=100, max_latency_s=5.0)
    options.update(kw)
    return Batcher(model, split, **options)  # type: ignore[arg-type]


def jobs(*sizes: int) -> list[np.ndarray]:
    out, start = [], 0
    for n in sizes:
        out.append(np.arange(start, start + n, dtype=np.float32)[:, None])
        start += n
    return out


def test_concurrent_jobs_share_model_calls_and_get_their_own_rows() -> None:
    model = Model()

    async def run() -> list[np.ndarray]:
        b = batcher(model, upstream=lambda: 1)  # more is always on its way: wait up to max_wait
        model.gate.clear()  # the first call blocks until every job is queued
        xs = jobs(1, 3, 2, 4, 1)
        first = asyncio.create_task(b.submit(xs[0]))
        await asyncio.sleep(0.1)
        rest = [asyncio.create_task(b.submit(x)) for x in xs[1:]]
        await asyncio.sleep(0.05)
        model.gate.set()
        out = await asyncio.gather(first, *rest)
        await b.close()
        return out

    results = asyncio.run(run())
    expected = jobs(1, 3, 2, 4, 1)
    for got, x in zip(results, expected, strict=True):
        assert np.array_equal(got, x.sum(axis=1) * 10)
    # 1 alone, then 3+2 (+4 would pass 8), then 4+1: jobs are never split, batches never exceed 8.
    assert model.calls == [1, 5, 5]


def test_no_waiting_for_company_that_is_not_coming() -> None:
    model = Model()

    async def run() -> float:
        b = batcher(model, max_wait_s=2.0, upstream=lambda: 0)
        t0 = time.perf_counter()
        await b.submit(jobs(1)[0])
        elapsed = time.perf_counter() - t0
        await b.close()
        return elapsed

    assert asyncio.run(run()) < 1.0


def test_waits_at_most_max_wait_for_company() -> None:
    model = Model()

    async def run() -> float:
        b = batcher(model, max_wait_s=0.2, upstream=lambda: 1)
        t0 = time.perf_counter()
        await b.submit(jobs(1)[0])
        elapsed = time.perf_counter() - t0
        await b.close()
        return elapsed

    assert 0.15 < asyncio.run(run()) < 1.5
    assert model.calls == [1]


def test_merge_off_runs_every_job_alone() -> None:
    model = Model()

    async def run() -> None:
        b = batcher(model, merge=False, upstream=lambda: 1)
        model.gate.clear()
        tasks = [asyncio.create_task(b.submit(x)) for x in jobs(2, 2, 2)]
        await asyncio.sleep(0.05)
        model.gate.set()
        await asyncio.gather(*tasks)
        await b.close()

    asyncio.run(run())
    assert model.calls == [2, 2, 2]


def test_the_queue_is_bounded_in_images() -> None:
    model = Model()

    async def run() -> None:
        b = batcher(model, max_images=5)
        model.gate.clear()
        running = asyncio.create_task(b.submit(jobs(1)[0]))
        await asyncio.sleep(0.05)  # taken into the model call, which blocks
        queued = asyncio.create_task(b.submit(jobs(4)[0]))
        await asyncio.sleep(0.01)
        with pytest.raises(OverloadedError, match="queue holds 4 images"):
            await b.submit(jobs(2)[0])
        model.gate.set()
        await asyncio.gather(running, queued)
        await b.close()

    asyncio.run(run())


def test_a_queue_longer_than_the_latency_budget_is_refused() -> None:
    model = Model(delay_s=0.05)

    async def run() -> None:
        b = batcher(model, max_latency_s=0.5)
        await b.submit(jobs(4)[0])  # measures ~12 ms per image
        with pytest.raises(OverloadedError, match="latency budget"):
            await b.submit(np.zeros((60, 1), np.float32))
        await b.close()

    asyncio.run(run())


def test_images_that_waited_past_their_budget_are_answered_503_not_run() -> None:
    model = Model()

    async def run() -> None:
        b = batcher(model, max_latency_s=0.2)
        model.gate.clear()
        first = asyncio.create_task(b.submit(jobs(1)[0]))
        await asyncio.sleep(0.05)
        late = asyncio.create_task(b.submit(jobs(1)[0]))
        await asyncio.sleep(0.4)  # the first call blocks past the second job's budget
        model.gate.set()
        await first
        with pytest.raises(OverloadedError, match="waited too long"):
            await late
        await b.close()

    asyncio.run(run())
    assert model.calls == [1]


def test_a_model_failure_is_the_answer_of_every_job_in_its_batch() -> None:
    model = Model(fail=ModelFailedError("the model fusc_backbone failed on this input"))

    async def run() -> list[object]:
        b = batcher(model, upstream=lambda: 1)
        model.gate.clear()
        tasks = [asyncio.create_task(b.submit(x)) for x in jobs(1, 2)]
        await asyncio.sleep(0.05)
        model.gate.set()
        out = await asyncio.gather(*tasks, return_exceptions=True)
        await b.close()
        return out

    results = asyncio.run(run())
    assert all(isinstance(r, ModelFailedError) and r.http_status == 500 for r in results)


def test_preprocessor_returns_errors_as_values_and_measures() -> None:
    def prepare(data: bytes):
        if data == b"bad":
            raise FuscError("broken", code="corrupt_image", http_status=400)
        return data.upper()

    async def run() -> list[object]:
        p = Preprocessor(prepare, 2)  # type: ignore[arg-type]
        out = await asyncio.gather(p.run(b"ok"), p.run(b"bad"))
        assert p.pending == 0 and p.seconds_per_image.value is not None
        p.close()
        return out

    ok, bad = asyncio.run(run())
    assert ok == b"OK" and isinstance(bad, FuscError) and bad.code == "corrupt_image"
