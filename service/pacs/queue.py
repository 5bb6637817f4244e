"""The durable job queue of the PACS path: one job per SOP Instance UID, from receipt to written-back result.

An embedded SQLite database in WAL mode (``synchronous=FULL``: a committed job survives a power cut) beside a
spool directory that holds each received instance until its result is written back. A job moves

    queued --claim--> running --complete--> done
       ^                 |
       +----retry--------+--dead--> dead      (a permanent error, or max_attempts spent)

Exactly one result per instance: ``jobs.sop_instance_uid`` and ``results.sop_instance_uid`` are unique, a job
is enqueued only once (a re-sent instance is answered as already queued), and each write-back form is
recorded when it succeeds, so a retry after a crash repeats only what had not finished (and the write-back
itself is idempotent: metadata PUTs the same values, the SR has a UID derived from the source instance).

The database holds UIDs, states, error codes and the result (cluster, view, confidence, OOD, model version):
no patient name, ID, birth date or accession number. Those stay in the spool file, which is removed as soon
as the job is done (or dead for a permanent reason).

One process owns a queue (an exclusive lock file beside it), so at start every job left ``running`` by a
killed process is requeued at once. A larger site that wants several worker hosts on one queue implements the
same methods on a server database (PostgreSQL: ``SELECT ... FOR UPDATE SKIP LOCKED`` in ``claim``, a lease
column instead of the start-up requeue, the spool on shared storage); docs/pacs.md says more.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.errors import FuscError

STATES = ("queued", "running", "done", "dead")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    sop_instance_uid TEXT NOT NULL UNIQUE,
    sop_class_uid TEXT NOT NULL,
    source TEXT NOT NULL,
    spool TEXT,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    received_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    error_code TEXT
);
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs (state, next_attempt_at);
CREATE TABLE IF NOT EXISTS results (
    sop_instance_uid TEXT PRIMARY KEY,
    result TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS writebacks (
    sop_instance_uid TEXT NOT NULL,
    form TEXT NOT NULL,
    done_at REAL NOT NULL,
    PRIMARY KEY (sop_instance_uid, form)
);
CREATE TABLE IF NOT EXISTS cursors (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class QueueLockedError(FuscError):
    """Another process owns this queue: one worker process per queue directory."""

    code = "pacs_queue_locked"


class QueueFullError(FuscError):
    """The instance could not be written to the spool or the database (disk full, I/O error)."""

    code = "pacs_queue_unavailable"


def backoff_delay(attempt: int, base_s: float, max_s: float, rand: float | None = None) -> float:
    """Seconds before retry number ``attempt`` (1 for the first retry): exponential, capped, with jitter.

    ``min(max_s, base_s * 2**(attempt-1))`` scaled by a factor in [0.5, 1.0), so that jobs that failed
    together (a PACS outage) do not all come back in the same instant. ``rand`` in [0, 1) picks the factor
    (random when None).
    """
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    rand = random.random() if rand is None else rand
    ceiling = min(max_s, base_s * 2.0 ** min(attempt - 1, 60))
    return ceiling * (0.5 + 0.5 * rand)


@dataclass(frozen=True)
class Job:
    id: int
    sop_instance_uid: str
    sop_class_uid: str
    source: str
    spool: Path | None
    attempts: int
    received_at: float


@dataclass(frozen=True)
class QueueStats:
    counts: dict[str, int]  # by state
    oldest_pending_age_s: float  # the oldest queued or running job; 0 when none


def spool_name(sop_instance_uid: str) -> str:
    return hashlib.sha256(sop_instance_uid.encode()).hexdigest()[:40] + ".dcm"


class JobQueue:
    """The SQLite queue. Thread-safe: each thread gets its own connection."""

    def __init__(self, path: Path, spool_dir: Path) -> None:
        self.path = Path(path)
        self.spool_dir = Path(spool_dir)
        self._local = threading.local()
        self._lock_file: Any = None
        self._wake = threading.Condition()
        self._generation = 0

    # ------------------------------------------------------------------------------------------ set-up
    def open(self, *, exclusive: bool = True) -> JobQueue:
        """Create the directories and tables; with ``exclusive``, take the owner lock and requeue the jobs
        a killed owner left running. Read-only tools (``status``) open without it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        if exclusive:
            lock = open(self.path.with_suffix(".lock"), "a+")  # noqa: SIM115 (held for the process lifetime)
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                lock.close()
                raise QueueLockedError(
                    f"another process owns the queue in {self.path.parent}; run one worker per queue"
                ) from exc
            self._lock_file = lock
        # executescript commits on its own: not inside _tx. Every statement is IF NOT EXISTS.
        self._conn().executescript(_SCHEMA)
        if exclusive:
            self.recover()
        return self

    @property
    def owned(self) -> bool:
        """True while this process holds the owner lock (``open(exclusive=True)``)."""
        return self._lock_file is not None

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=True)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a job acknowledged to the sender is on disk even after a power cut, not only a crash.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (BEGIN IMMEDIATE) so that two claims never interleave."""
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def recover(self) -> int:
        """Requeue every job left running (its owner died) and delete spool files no job refers to (a
        process killed between writing the file and committing its job). Returns the jobs requeued."""
        now = time.time()
        with self._tx() as db:
            requeued = db.execute(
                "UPDATE jobs SET state='queued', next_attempt_at=?, updated_at=? WHERE state='running'",
                (now, now),
            ).rowcount
            referenced = {r[0] for r in db.execute("SELECT spool FROM jobs WHERE spool IS NOT NULL")}
        for path in self.spool_dir.iterdir():
            if path.name not in referenced:
                path.unlink(missing_ok=True)
        return requeued

    # ----------------------------------------------------------------------------------------- enqueue
    def known(self, sop_instance_uid: str) -> bool:
        row = (
            self._conn()
            .execute("SELECT 1 FROM jobs WHERE sop_instance_uid=?", (sop_instance_uid,))
            .fetchone()
        )
        return row is not None

    def enqueue(self, sop_instance_uid: str, sop_class_uid: str, source: str, data: bytes) -> bool:
        """Write the instance to the spool (fsync'd) and commit its job; True when queued now, False when
        the instance was already known (queued, done or dead). Returns only once both are durable."""
        if self.known(sop_instance_uid):
            return False
        name = spool_name(sop_instance_uid)
        try:
            self._write_spool(name, data)
            now = time.time()
            with self._tx() as db:
                inserted = db.execute(
                    "INSERT OR IGNORE INTO jobs (sop_instance_uid, sop_class_uid, source, spool, state,"
                    " next_attempt_at, received_at, updated_at) VALUES (?, ?, ?, ?, 'queued', ?, ?, ?)",
                    (sop_instance_uid, sop_class_uid, source, name, now, now, now),
                ).rowcount
        except (OSError, sqlite3.Error) as exc:
            raise QueueFullError(
                f"the instance could not be queued ({type(exc).__name__}); check the queue volume"
            ) from exc
        if inserted:
            self.notify()
        return bool(inserted)

    def _write_spool(self, name: str, data: bytes) -> None:
        final = self.spool_dir / name
        tmp = final.with_name(f".{name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        dir_fd = os.open(self.spool_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def notify(self) -> None:
        with self._wake:
            self._generation += 1
            self._wake.notify_all()

    def wait(self, timeout: float) -> None:
        """Sleep until a job is enqueued (in this process) or ``timeout`` passes."""
        with self._wake:
            start = self._generation
            self._wake.wait_for(lambda: self._generation != start, timeout=timeout)

    # ------------------------------------------------------------------------------------------- claim
    def claim(self, now: float | None = None) -> Job | None:
        """The oldest queued job whose time has come, now running (its attempt counted); None if none."""
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute(
                "SELECT * FROM jobs WHERE state='queued' AND next_attempt_at<=?"
                " ORDER BY next_attempt_at, id LIMIT 1",
                (now,),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state='running', attempts=attempts+1, updated_at=? WHERE id=?",
                (now, row["id"]),
            )
        return Job(
            id=row["id"],
            sop_instance_uid=row["sop_instance_uid"],
            sop_class_uid=row["sop_class_uid"],
            source=row["source"],
            spool=self.spool_dir / row["spool"] if row["spool"] else None,
            attempts=row["attempts"] + 1,
            received_at=row["received_at"],
        )

    def next_due(self) -> float | None:
        """When the next queued job becomes due (epoch seconds), None if nothing is queued."""
        row = self._conn().execute("SELECT MIN(next_attempt_at) FROM jobs WHERE state='queued'").fetchone()
        return None if row[0] is None else float(row[0])

    # ------------------------------------------------------------------------------------------ finish
    def complete(self, job: Job) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state='done', spool=NULL, error_code=NULL, updated_at=? WHERE id=?",
                (now, job.id),
            )
        self._drop_spool(job)

    def retry(
        self, job: Job, code: str, *, max_attempts: int, base_s: float, max_s: float, now: float | None = None
    ) -> bool:
        """Back to the queue after a backoff; dead instead once ``max_attempts`` are spent (the spool file is
        kept then, so that ``requeue_dead`` can try again). True when it will be retried."""
        now = time.time() if now is None else now
        if job.attempts >= max_attempts:
            with self._tx() as db:
                db.execute(
                    "UPDATE jobs SET state='dead', error_code=?, updated_at=? WHERE id=?", (code, now, job.id)
                )
            return False
        due = now + backoff_delay(job.attempts, base_s, max_s)
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state='queued', next_attempt_at=?, error_code=?, updated_at=? WHERE id=?",
                (due, code, now, job.id),
            )
        return True

    def dead(self, job: Job, code: str) -> None:
        """A permanent failure (the instance itself is at fault): dead at once, its spool file removed."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state='dead', spool=NULL, error_code=?, updated_at=? WHERE id=?",
                (code, now, job.id),
            )
        self._drop_spool(job)

    def _drop_spool(self, job: Job) -> None:
        if job.spool is not None:
            job.spool.unlink(missing_ok=True)

    def requeue_dead(self) -> int:
        """Dead jobs that still have their instance (retries spent) go back to the queue, counts reset."""
        now = time.time()
        with self._tx() as db:
            n = db.execute(
                "UPDATE jobs SET state='queued', attempts=0, next_attempt_at=?, updated_at=?"
                " WHERE state='dead' AND spool IS NOT NULL",
                (now, now),
            ).rowcount
        if n:
            self.notify()
        return n

    # ----------------------------------------------------------------------------------------- results
    def save_result(self, sop_instance_uid: str, result: dict[str, Any]) -> dict[str, Any]:
        """Store the result unless one exists; returns the stored one (the first one wins)."""
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO results (sop_instance_uid, result, created_at) VALUES (?, ?, ?)",
                (sop_instance_uid, json.dumps(result, sort_keys=True), time.time()),
            )
            row = db.execute(
                "SELECT result FROM results WHERE sop_instance_uid=?", (sop_instance_uid,)
            ).fetchone()
        return json.loads(row[0])

    def result(self, sop_instance_uid: str) -> dict[str, Any] | None:
        row = (
            self._conn()
            .execute("SELECT result FROM results WHERE sop_instance_uid=?", (sop_instance_uid,))
            .fetchone()
        )
        return None if row is None else json.loads(row[0])

    def mark_written(self, sop_instance_uid: str, form: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO writebacks (sop_instance_uid, form, done_at) VALUES (?, ?, ?)",
                (sop_instance_uid, form, time.time()),
            )

    def written(self, sop_instance_uid: str) -> set[str]:
        rows = (
            self._conn()
            .execute("SELECT form FROM writebacks WHERE sop_instance_uid=?", (sop_instance_uid,))
            .fetchall()
        )
        return {r[0] for r in rows}

    # ----------------------------------------------------------------------------------------- cursors
    def cursor(self, name: str) -> str | None:
        row = self._conn().execute("SELECT value FROM cursors WHERE name=?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def set_cursor(self, name: str, value: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO cursors (name, value) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET value=excluded.value",
                (name, value),
            )

    # ------------------------------------------------------------------------------------------- views
    def stats(self, now: float | None = None) -> QueueStats:
        now = time.time() if now is None else now
        db = self._conn()
        counts = dict.fromkeys(STATES, 0)
        for state, n in db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
            counts[state] = int(n)
        oldest = db.execute(
            "SELECT MIN(received_at) FROM jobs WHERE state IN ('queued', 'running')"
        ).fetchone()
        age = 0.0 if oldest[0] is None else max(0.0, now - float(oldest[0]))
        return QueueStats(counts=counts, oldest_pending_age_s=age)

    def jobs(self, state: str | None = None) -> list[dict[str, Any]]:
        """Every job (or those in ``state``) as a dict, with its result when it has one."""
        query = (
            "SELECT j.id, j.sop_instance_uid, j.sop_class_uid, j.source, j.state, j.attempts, j.error_code,"
            " j.received_at, j.updated_at, r.result FROM jobs j"
            " LEFT JOIN results r ON r.sop_instance_uid = j.sop_instance_uid"
        )
        args: tuple[Any, ...] = ()
        if state is not None:
            query += " WHERE j.state=?"
            args = (state,)
        rows = self._conn().execute(query + " ORDER BY j.id", args).fetchall()
        out = []
        for row in rows:
            item = dict(row)
            item["result"] = None if item["result"] is None else json.loads(item["result"])
            out.append(item)
        return out
