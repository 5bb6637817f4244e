"""The run folder while a run is in progress: the frozen plan, one committed part per chunk, the lock.

    RUN_DIR/plan.parquet         every item of the run (key, source, ...), sorted by key, written once
    RUN_DIR/parts/c<N>.parquet   chunk N's answers and embeddings, each written whole and renamed into place
    RUN_DIR/.lock                held (flock) by the one process that drives the run

Exactly-once: chunk N is the plan rows [N * chunk_size, (N + 1) * chunk_size); a chunk counts as done when
its part exists, and a part only ever appears whole (write to a temporary name, fsync, rename). A run
killed at any point leaves every chunk either committed or absent; the rerun does the absent ones. The
consolidation checks that the parts hold every plan key once, in order, before it writes the final files.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from service.archive.errors import LedgerError, RunLockedError
from service.archive.sources import PLAN_SCHEMA

PLAN = "plan.parquet"
PARTS = "parts"
LOCK = ".lock"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_parquet(table: pa.Table, path: Path) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    with open(tmp, "wb") as fh:
        pq.write_table(table, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class Chunk:
    index: int
    rows: list[dict]


class Ledger:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.parts = self.root / PARTS
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------------------------------ lock
    def lock(self) -> None:
        """One driver per run folder: a second one (a rerun started while the first still runs) is refused
        instead of doing the same chunks twice."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise RunLockedError(f"another process is running the archive run in {self.root}") from exc
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # ------------------------------------------------------------------------------------------ plan
    @property
    def plan_path(self) -> Path:
        return self.root / PLAN

    def has_plan(self) -> bool:
        return self.plan_path.is_file()

    def write_plan(self, table: pa.Table, chunk_size: int) -> None:
        keys = table.column("key")
        if len(keys) != len(pc.unique(keys)):
            raise LedgerError("the plan lists some key twice")
        meta = {b"fusc.chunk_size": str(chunk_size).encode()}
        atomic_parquet(table.cast(PLAN_SCHEMA).replace_schema_metadata(meta), self.plan_path)
        fsync_dir(self.root)

    def read_plan(self) -> tuple[pa.Table, int]:
        table = pq.read_table(self.plan_path)
        chunk_size = int((table.schema.metadata or {}).get(b"fusc.chunk_size", b"0"))
        if chunk_size < 1:
            raise LedgerError(f"{self.plan_path} does not record its chunk size")
        return table, chunk_size

    @staticmethod
    def chunk_count(n_items: int, chunk_size: int) -> int:
        return (n_items + chunk_size - 1) // chunk_size

    def chunks(self, plan: pa.Table, chunk_size: int, indices: list[int]) -> Iterator[Chunk]:
        for i in indices:
            yield Chunk(i, plan.slice(i * chunk_size, chunk_size).to_pylist())

    # ----------------------------------------------------------------------------------------- parts
    def part_path(self, index: int) -> Path:
        return self.parts / f"c{index:08d}.parquet"

    def clean_temporaries(self) -> int:
        """Remove half-written files a killed run left behind; they were never committed."""
        removed = 0
        for folder in (self.root, self.parts):
            if folder.is_dir():
                for tmp in folder.glob(".*.tmp"):
                    tmp.unlink(missing_ok=True)
                    removed += 1
        return removed

    def done(self) -> set[int]:
        if not self.parts.is_dir():
            return set()
        out = set()
        for p in self.parts.glob("c*.parquet"):
            try:
                out.add(int(p.stem[1:]))
            except ValueError:
                continue
        return out

    def commit(self, index: int, table: pa.Table) -> None:
        self.parts.mkdir(exist_ok=True)
        atomic_parquet(table, self.part_path(index))

    def remove_parts(self) -> None:
        if self.parts.is_dir():
            for p in self.parts.glob("c*.parquet"):
                p.unlink(missing_ok=True)
            try:
                self.parts.rmdir()
            except OSError:
                pass

    # ---------------------------------------------------------------------------------- consolidation
    def check_complete(self, plan: pa.Table, chunk_size: int) -> None:
        n_chunks = self.chunk_count(len(plan), chunk_size)
        done = self.done()
        missing = sorted(set(range(n_chunks)) - done)
        extra = sorted(done - set(range(n_chunks)))
        if missing or extra:
            raise LedgerError(
                f"parts missing {missing[:5]} or unexpected {extra[:5]}: the run has not finished"
            )

    def consolidate(self, plan: pa.Table, chunk_size: int, emb_path: Path, dim: int) -> pa.Table:
        """Every part, in chunk order, as one table (RESULT columns but the map's) whose ``embedding_row``
        points into ``emb_path`` (float32 [N_ok, dim], written here). Raises if any plan key is missing,
        doubled or out of place."""
        self.check_complete(plan, chunk_size)
        n_chunks = self.chunk_count(len(plan), chunk_size)
        counts = []
        for i in range(n_chunks):
            errors = pq.read_table(self.part_path(i), columns=["error_code"]).column("error_code")
            counts.append(errors.null_count)  # answered: no error code
        total = int(sum(counts))
        emb = np.lib.format.open_memmap(emb_path, mode="w+", dtype=np.float32, shape=(total, dim))
        tables = []
        offset = 0
        plan_keys = plan.column("key")
        for i in range(n_chunks):
            part = pq.read_table(self.part_path(i))
            expected = plan_keys.slice(i * chunk_size, chunk_size)
            if not part.column("key").equals(expected):
                raise LedgerError(f"part {i} does not hold exactly the keys of its chunk")
            col = part.column("embedding")
            ok = col.is_valid()
            n_ok = counts[i]
            if n_ok:
                values = pc.filter(col, ok).combine_chunks()
                emb[offset : offset + n_ok] = values.flatten().to_numpy().reshape(n_ok, dim)
            rows = np.full(len(part), -1, np.int64)
            rows[ok.to_numpy(zero_copy_only=False)] = np.arange(offset, offset + n_ok)
            offset += n_ok
            part = part.drop_columns(["embedding"]).append_column(
                "embedding_row", pa.array(rows, pa.int64(), mask=rows < 0)
            )
            tables.append(part)
        emb.flush()
        del emb
        table = pa.concat_tables(tables)
        if len(table) != len(plan):
            raise LedgerError(f"the parts hold {len(table)} rows, the plan {len(plan)}")
        return table
