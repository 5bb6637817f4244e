"""decode + clean in worker processes (FUSC_PREPROCESS_MODE=processes): the same answers as the threads,
errors as values, and a worker that dies costs no answer."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from service.batching import Preprocessor, ProcessPreprocessor
from service.errors import FuscError
from service.pipeline import Pipeline, Prepared, load_pipeline
from service.settings import Settings
from tests.service.conftest import png_bytes, synthetic_frame


@pytest.fixture(scope="module")
def pipeline(tiny_repo: Path) -> Pipeline:
    return load_pipeline(Settings(model_repository=tiny_repo))


def test_workers_prepare_what_the_threads_prepare(pipeline: Pipeline, good_png: bytes) -> None:
    images = [good_png, png_bytes(synthetic_frame(3, 300, 400)), b"not an image", b""]

    async def run(pre: Preprocessor) -> list[Prepared | FuscError]:
        try:
            return list(await asyncio.gather(*(pre.run(d) for d in images)))
        finally:
            pre.close()

    threads = asyncio.run(run(Preprocessor(pipeline.prepare, 2)))
    procs = asyncio.run(run(ProcessPreprocessor(pipeline, 2)))
    for t, p in zip(threads, procs, strict=True):
        assert type(t) is type(p)
        if isinstance(t, Prepared):
            assert isinstance(p, Prepared)
            np.testing.assert_array_equal(t.tensor, p.tensor)
        else:
            assert isinstance(p, FuscError)
            assert (p.code, p.http_status, p.message) == (t.code, t.http_status, t.message)
    assert [getattr(p, "code", None) for p in procs[2:]] == ["unsupported_format", "empty_input"]


def test_a_worker_killed_mid_image_costs_no_answer(pipeline: Pipeline) -> None:
    big = png_bytes(synthetic_frame(5, 2400, 3200))  # long enough to be killed while it works

    async def run() -> tuple[list[Prepared | FuscError], int]:
        pre = ProcessPreprocessor(pipeline, 2)
        try:
            await pre.run(big)  # warm: both workers up
            pids = list(pre._pool._processes)  # noqa: SLF001 (the test kills one for real)
            tasks = [asyncio.create_task(pre.run(big)) for _ in range(4)]
            await asyncio.sleep(0.3)
            os.kill(pids[0], signal.SIGKILL)
            out = list(await asyncio.gather(*tasks))
            after = await pre.run(big)  # the rebuilt pool keeps serving
            return [*out, after], pre._generation  # noqa: SLF001
        finally:
            pre.close()

    out, generation = asyncio.run(run())
    assert generation == 1
    assert all(isinstance(p, Prepared) for p in out), out
    assert len({p.tensor.tobytes() for p in out}) == 1


def test_settings_choose_the_mode() -> None:
    assert Settings().preprocess_mode == "threads"
    assert Settings.from_env({"FUSC_PREPROCESS_MODE": "Processes"}).preprocess_mode == "processes"
