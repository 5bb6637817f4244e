"""How chunks get computed: in this process (``--workers 1``), or a process pool (the default, one worker
per available core). Ray Data is the scale-out engine (service.archive.ray_engine). Each engine yields
``(chunk index, part table)`` as chunks finish, in any order; the driver commits them.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

import pyarrow as pa

from service.archive.ledger import Chunk
from service.archive.worker import WORKER_CRASHED, ChunkWorker, WorkerConfig, crashed_table, limit_threads

logger = logging.getLogger("fusc.archive")

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


def _pool(cfg: WorkerConfig, workers: int) -> ProcessPoolExecutor:
    ctx = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init, initargs=(cfg,))


def _isolate(cfg: WorkerConfig, chunk: Chunk) -> pa.Table:
    """A chunk that was in a pool when a worker died (a decoder crash on hostile bytes, the OOM killer):
    image by image in a one-process pool, so that an image that kills its worker twice is the one recorded
    as ``worker_crashed`` and the run goes on."""
    tables: list[pa.Table] = []
    pool = _pool(cfg, 1)
    try:
        for row in chunk.rows:
            for attempt in (1, 2):
                try:
                    tables.append(pool.submit(_run, chunk.index, [row]).result()[1])
                    break
                except BrokenProcessPool:
                    pool.shutdown(wait=False, cancel_futures=True)
                    pool = _pool(cfg, 1)
                    if attempt == 2:
                        logger.warning("an image killed its worker twice; recorded as %s", WORKER_CRASHED)
                        tables.append(crashed_table(cfg, [row]))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return pa.concat_tables(tables)


def run_pool(cfg: WorkerConfig, chunks: Iterable[Chunk], workers: int) -> Iterator[tuple[int, pa.Table]]:
    """``workers`` processes (spawned, so no ONNX Runtime or thread state is inherited), each loading the
    pipeline once; at most two chunks per worker in flight, so memory stays bounded on any archive. When a
    worker dies, the chunks it shared the pool with are redone in isolation and a fresh pool goes on."""
    pending = iter(chunks)
    pool = _pool(cfg, workers)
    running: dict[Future, Chunk] = {}

    def fill() -> None:
        while len(running) < 2 * workers:
            chunk = next(pending, None)
            if chunk is None:
                return
            running[pool.submit(_run, chunk.index, chunk.rows)] = chunk

    try:
        fill()
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            broken: list[Chunk] = []
            for future in finished:
                chunk = running.pop(future)
                try:
                    yield future.result()
                except BrokenProcessPool:
                    broken.append(chunk)
            if broken:
                # Every chunk still in this pool is lost with it: all of them are redone.
                broken += list(running.values())
                running.clear()
                pool.shutdown(wait=False, cancel_futures=True)
                logger.warning("a worker process died; redoing %d chunk(s) image by image", len(broken))
                for chunk in sorted(broken, key=lambda c: c.index):
                    yield chunk.index, _isolate(cfg, chunk)
                pool = _pool(cfg, workers)
            fill()
    finally:
        for future in running:
            future.cancel()
        pool.shutdown(wait=False, cancel_futures=True)
