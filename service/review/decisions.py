"""The review's decisions: an append-only log in SQLite (WAL), each with who and when, each undoable.

Nothing is ever updated in place except the ``undone_by`` mark of a decision that was undone: the state of
a review is the replay of the decisions that stand (service/review/state.py), so a restarted app, a second
process reading the same file, or an audit all see the same thing. An undo is itself a decision (who undid
what, when); an undo is not undone in turn: the decision is simply taken again.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

Kind = Literal["name", "accept", "unaccept", "merge", "split", "mark", "label", "undo", "import"]
KINDS: tuple[str, ...] = ("name", "accept", "unaccept", "merge", "split", "mark", "label", "undo", "import")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    who TEXT NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    undone_by INTEGER REFERENCES decisions(id)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Decision:
    id: int
    at: datetime
    who: str
    kind: str
    payload: dict[str, Any]
    undone_by: int | None

    @property
    def stands(self) -> bool:
        return self.undone_by is None


class DecisionError(ValueError):
    """A decision that cannot be taken (unknown kind, undoing what does not stand)."""


class DecisionLog:
    """One review's decisions in ``path`` (created on first use). Safe to share between threads."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a decision the page said was saved survives a power cut, not only a crash of the app.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # ------------------------------------------------------------------------------------------ meta
    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # ------------------------------------------------------------------------------------- decisions
    def add(self, kind: str, payload: dict[str, Any], who: str) -> Decision:
        if kind not in KINDS or kind == "undo":
            raise DecisionError(f"unknown decision {kind!r}")
        return self._insert(kind, payload, who)

    def _insert(self, kind: str, payload: dict[str, Any], who: str, db: sqlite3.Connection | None = None):
        at = datetime.now(timezone.utc)
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        if db is None:
            with self._tx() as tx:
                cur = tx.execute(
                    "INSERT INTO decisions (at, who, kind, payload) VALUES (?, ?, ?, ?)",
                    (at.isoformat(), who, kind, text),
                )
        else:
            cur = db.execute(
                "INSERT INTO decisions (at, who, kind, payload) VALUES (?, ?, ?, ?)",
                (at.isoformat(), who, kind, text),
            )
        return Decision(int(cur.lastrowid), at, who, kind, payload, None)

    def undo(self, decision_id: int, who: str) -> Decision:
        """Take back decision ``decision_id`` (which must stand); returns the undo decision."""
        with self._tx() as db:
            row = db.execute("SELECT undone_by, kind FROM decisions WHERE id = ?", (decision_id,)).fetchone()
            if row is None:
                raise DecisionError(f"there is no decision {decision_id}")
            if row[1] == "undo":
                raise DecisionError("an undo is not undone: take the decision again instead")
            if row[0] is not None:
                raise DecisionError(f"decision {decision_id} was already undone by decision {row[0]}")
            undo = self._insert("undo", {"decision": decision_id}, who, db)
            db.execute("UPDATE decisions SET undone_by = ? WHERE id = ?", (undo.id, decision_id))
        return undo

    def last_standing(self) -> Decision | None:
        """The most recent decision that stands (what "undo" on the page takes back)."""
        for d in reversed(self.all()):
            if d.stands and d.kind != "undo":
                return d
        return None

    def all(self) -> list[Decision]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, at, who, kind, payload, undone_by FROM decisions ORDER BY id"
            ).fetchall()
        return [
            Decision(int(i), datetime.fromisoformat(at), who, kind, json.loads(p), u)
            for i, at, who, kind, p, u in rows
        ]

    def standing(self) -> list[Decision]:
        """The decisions that shape the review now, in the order they were taken (undos left out)."""
        return [d for d in self.all() if d.stands and d.kind != "undo"]

    def version(self) -> tuple[int, int]:
        """Changes whenever a decision is taken or undone (by this process or another on the same file)."""
        with self._lock:
            row = self._db.execute("SELECT COALESCE(MAX(id), 0), COUNT(undone_by) FROM decisions").fetchone()
        return int(row[0]), int(row[1])

    def count(self, *, standing_only: bool = False) -> int:
        return len(self.standing()) if standing_only else len(self.all())
