"""How chunks get computed: in this process (``--workers 1``), or a process pool (the default, one worker
per available core). Ray Data is the scale-out engine (service.archive.ray_engine). Each engine yields
``(chunk index, part table)`` as chunks finish, in any order; the driver commits them.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

import pyarrow as pa

from service.archive.ledger import Chunk
from service.archive.worker import ChunkWorker, WorkerConfig, limit_threads

_WORKER: ChunkWorker | None = None


def _init(cfg: WorkerConfig) -> None:
    global _WORKER
    limit_threads(cfg.ort_threads)
    _WORKER = ChunkWorker(cfg)


def _run(index: int, rows: list[dict]) -> tuple[int, pa.Table]:
    assert _WORKER is not None
    return index, _WORKER.run(rows)


def run_inline(cfg: WorkerConfig, chunks: Iterable[Chunk]) -> Iterator[tuple[int, pa.Table]]:
    """One process, one chunk after another: the baseline, and the engine for ``--workers 1``."""
    limit_threads(cfg.ort_threads)
    worker = ChunkWorker(cfg)
    try:
        for chunk in chunks:
            yield chunk.index, worker.run(chunk.rows)
    finally:
        worker.close()


def run_pool(cfg: WorkerConfig, chunks: Iterable[Chunk], workers: int) -> Iterator[tuple[int, pa.Table]]:
    """``workers`` processes (spawned, so no ONNX Runtime or thread state is inherited), each loading the
    pipeline once; at most two chunks per worker in flight, so memory stays bounded on any archive."""
    ctx = multiprocessing.get_context("spawn")
    pending = iter(chunks)
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init, initargs=(cfg,)) as pool:
        running: set[Future] = set()

        def fill() -> None:
            while len(running) < 2 * workers:
                chunk = next(pending, None)
                if chunk is None:
                    return
                running.add(pool.submit(_run, chunk.index, chunk.rows))

        try:
            fill()
            while running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    running.discard(future)
                    yield future.result()
                fill()
        finally:
            for future in running:
                future.cancel()
