"""A review of one archive run: the run's answers with the standing decisions replayed over them.

The run (service/archive/store.py) is never changed. Its head clusters are the review's first clusters;
decisions rename, accept, merge and split them and mark or label single images. Each image's label follows
in this order: its own label (given in the app or read back from Label Studio), else nothing when it was
marked wrong or outlier, else its cluster's name.
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.archive.store import Run
from service.review.decisions import Decision, DecisionError, DecisionLog
from service.taxonomy import VIEWS

MARKS = ("wrong", "outlier")


def image_id(key: str) -> str:
    """The id an image has on pages and in URLs: a hash of its key, since a key (a path in the archive) may
    carry a patient's name."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ClusterSummary:
    id: int
    size: int
    mean_confidence: float
    ood_share: float
    name: str | None
    accepted: bool
    card_name: str | None  # the run's model card's name of this head cluster (a hint; None after a split)
    origin: str  # "head", "split of N"
    merged: tuple[int, ...]  # clusters merged into this one


@dataclass(frozen=True)
class ImageLabel:
    view: str | None
    source: str  # "cluster", "image", "labelstudio", "" (none)
    status: str  # accepted, named, labelled, wrong, outlier, unreviewed


def _spherical_2means(x: np.ndarray, seed: int, iterations: int = 25) -> np.ndarray:
    """Split unit rows ``x`` in two (0/1 per row): k-means with cosine similarity, farthest-point start.

    Deterministic for a given ``seed``, so a split replays the same way wherever it is computed.
    """
    rng = np.random.default_rng(seed)
    first = int(rng.integers(len(x)))
    second = int(np.argmin(x @ x[first]))
    centres = x[[first, second]].astype(np.float64)
    part = np.zeros(len(x), np.int64)
    for _ in range(iterations):
        new = np.argmax(x @ centres.T, axis=1)
        if (new == part).all() and _ > 0:
            break
        part = new
        for j in (0, 1):
            members = x[part == j]
            if len(members):
                c = members.mean(axis=0)
                centres[j] = c / max(np.linalg.norm(c), 1e-12)
    return part


class Review:
    """The review state of one run: rebuilt from the decision log after every decision (cheap: vectors of
    the run's length), so that what a page shows is always the replay of what the log holds."""

    def __init__(self, run: Run, log: DecisionLog, card_names: dict[int, str] | None = None) -> None:
        self.run = run
        self.log = log
        self.card_names = dict(card_names or {})
        t = run.table
        self.keys: list[str] = t.column("key").to_pylist()
        self.sources: list[str] = t.column("source").to_pylist()
        self.subjects: list[str | None] = t.column("subject_key").to_pylist()
        self.ids: list[str] = [image_id(k) for k in self.keys]
        self.row_of_id = {iid: i for i, iid in enumerate(self.ids)}
        self.row_of_key = {k: i for i, k in enumerate(self.keys)}
        self.head = np.asarray(
            [-1 if c is None else int(c) for c in t.column("cluster").to_pylist()], dtype=np.int64
        )
        self.ok = self.head >= 0
        self.confidence = np.nan_to_num(
            np.asarray(t.column("confidence").to_pylist(), dtype=np.float64), nan=0.0
        )
        self.ood = np.asarray([bool(v) for v in t.column("ood").to_pylist()])
        self.top_clusters: list[list[int]] = [v or [] for v in t.column("top_clusters").to_pylist()]
        self.top_probs: list[list[float]] = [v or [] for v in t.column("top_probs").to_pylist()]
        probs2 = [(p + [0.0, 0.0])[:2] for p in self.top_probs]
        self.margin = np.asarray([a - b for a, b in probs2], dtype=np.float64)
        self.map_xy = np.asarray(
            [
                (np.nan if x is None else x, np.nan if y is None else y)
                for x, y in zip(t.column("map_x").to_pylist(), t.column("map_y").to_pylist(), strict=True)
            ],
            dtype=np.float64,
        ).reshape(-1, 2)
        self.embedding_row = np.asarray(
            [-1 if r is None else int(r) for r in t.column("embedding_row").to_pylist()], dtype=np.int64
        )
        self.error_codes = Counter(c for c in t.column("error_code").to_pylist() if c)
        self._lock = threading.RLock()
        self.refresh()

    # --------------------------------------------------------------------------------------- replay
    def refresh(self) -> None:
        """Replay the standing decisions over the run's answers."""
        with self._lock:
            rc = self.head.copy()
            names: dict[int, str] = {}
            accepted: set[int] = set()
            merged: dict[int, list[int]] = {}
            origin: dict[int, str] = {}
            marks: dict[int, str] = {}
            labels: dict[int, tuple[str, str]] = {}
            decisions = self.log.standing()
            for d in decisions:
                p = d.payload
                if d.kind == "name":
                    names[p["cluster"]] = p["view"]
                elif d.kind == "accept":
                    accepted.add(p["cluster"])
                    if p.get("view"):
                        names[p["cluster"]] = p["view"]
                elif d.kind == "unaccept":
                    accepted.discard(p["cluster"])
                elif d.kind == "merge":
                    a, b = p["source"], p["target"]
                    rc[rc == a] = b
                    if b not in names and a in names:
                        names[b] = names[a]
                    names.pop(a, None)
                    accepted.discard(a)
                    accepted.discard(b)
                    merged.setdefault(b, []).extend([a, *merged.pop(a, [])])
                elif d.kind == "split":
                    c, new = p["cluster"], p["new"]
                    rows = [self.row_of_key[k] for k in p["keys"] if k in self.row_of_key]
                    rows = np.asarray([r for r in rows if rc[r] == c], dtype=np.int64)
                    rc[rows] = new
                    origin[new] = f"split of {c}"
                    accepted.discard(c)
                elif d.kind == "mark":
                    for k in p["keys"]:
                        r = self.row_of_key.get(k)
                        if r is None:
                            continue
                        if p["mark"] == "clear":
                            marks.pop(r, None)
                            labels.pop(r, None)
                        else:
                            marks[r] = p["mark"]
                elif d.kind == "label":
                    for k in p["keys"]:
                        r = self.row_of_key.get(k)
                        if r is not None:
                            labels[r] = (p["view"], "image")
                elif d.kind == "import":
                    for k, view in p["labels"].items():
                        r = self.row_of_key.get(k)
                        if r is not None:
                            labels[r] = (view, p.get("source", "import"))
            self.rc, self.names, self.accepted = rc, names, accepted
            self.merged, self.origin, self.marks, self.image_labels = merged, origin, marks, labels
            self.decisions = decisions
            self._summaries = self._summarise()
            self._version = self.log.version()

    def sync(self) -> None:
        """Replay again if the log changed behind this object's back (another app on the same state)."""
        if self.log.version() != self._version:
            self.refresh()

    def _summarise(self) -> dict[int, ClusterSummary]:
        out: dict[int, ClusterSummary] = {}
        ids = np.unique(self.rc[self.ok])
        for c in ids.tolist():
            members = self.rc == c
            n = int(members.sum())
            out[c] = ClusterSummary(
                id=c,
                size=n,
                mean_confidence=float(self.confidence[members].mean()),
                ood_share=float(self.ood[members].mean()),
                name=self.names.get(c),
                accepted=c in self.accepted,
                card_name=self.card_names.get(c) if c not in self.origin else None,
                origin=self.origin.get(c, "head"),
                merged=tuple(sorted(self.merged.get(c, []))),
            )
        return out

    # -------------------------------------------------------------------------------------- reading
    def clusters(self) -> list[ClusterSummary]:
        with self._lock:
            return sorted(self._summaries.values(), key=lambda s: s.id)

    def cluster(self, c: int) -> ClusterSummary | None:
        with self._lock:
            return self._summaries.get(c)

    def members(self, c: int, order: str = "confident") -> np.ndarray:
        """Rows of cluster ``c``: most confident first, or least confident first (``order="least"``)."""
        with self._lock:
            rows = np.flatnonzero(self.rc == c)
        key = self.confidence[rows]
        idx = np.argsort(key, kind="stable") if order == "least" else np.argsort(-key, kind="stable")
        return rows[idx]

    def label_of(self, row: int) -> ImageLabel:
        with self._lock:
            if row in self.image_labels:
                view, source = self.image_labels[row]
                return ImageLabel(view, source, "labelled")
            if row in self.marks:
                return ImageLabel(None, "", self.marks[row])
            if not self.ok[row]:
                return ImageLabel(None, "", "error")
            c = int(self.rc[row])
            if c in self.names:
                return ImageLabel(self.names[c], "cluster", "accepted" if c in self.accepted else "named")
            return ImageLabel(None, "", "unreviewed")

    def labels(self) -> list[ImageLabel]:
        with self._lock:
            return [self.label_of(i) for i in range(len(self.keys))]

    def unit_embeddings(self, rows: np.ndarray) -> np.ndarray:
        emb = np.asarray(self.run.embeddings[self.embedding_row[rows]], dtype=np.float32)
        return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)

    def card_names_now(self) -> dict[int, str]:
        """The name of each head cluster for a model card: the view most of its labelled images carry when
        that is more than half of them; the old card's name for a head cluster the review has not labelled."""
        names: dict[int, str] = {}
        labels = self.labels()
        heads = sorted(set(self.head[self.ok].tolist()))
        for h in heads:
            views = Counter(labels[r].view for r in np.flatnonzero(self.head == h) if labels[r].view)
            if views:
                view, n = views.most_common(1)[0]
                if n * 2 > sum(views.values()):
                    names[h] = view
            elif h in self.card_names:
                names[h] = self.card_names[h]
        return names

    # -------------------------------------------------------------------------------------- actions
    def _check_cluster(self, c: int) -> None:
        if c not in self._summaries:
            raise DecisionError(f"there is no cluster {c} in this review")

    @staticmethod
    def _check_view(view: str) -> None:
        if view not in VIEWS:
            raise DecisionError(f"{view!r} is not a view of the taxonomy")

    def _take(self, kind: str, payload: dict[str, Any], who: str) -> Decision:
        d = self.log.add(kind, payload, who)
        self.refresh()
        return d

    def name(self, c: int, view: str, who: str) -> Decision:
        with self._lock:
            self._check_cluster(c)
            self._check_view(view)
            return self._take("name", {"cluster": c, "view": view}, who)

    def accept(self, c: int, who: str, view: str | None = None) -> Decision:
        """Accept cluster ``c`` as named (or name it ``view`` and accept it in one decision)."""
        with self._lock:
            self._check_cluster(c)
            if view:
                self._check_view(view)
            elif c not in self.names:
                raise DecisionError(f"cluster {c} has no name yet: name it before accepting it")
            return self._take("accept", {"cluster": c, **({"view": view} if view else {})}, who)

    def unaccept(self, c: int, who: str) -> Decision:
        with self._lock:
            self._check_cluster(c)
            return self._take("unaccept", {"cluster": c}, who)

    def merge(self, source: int, target: int, who: str) -> Decision:
        with self._lock:
            self._check_cluster(source)
            self._check_cluster(target)
            if source == target:
                raise DecisionError("a cluster cannot be merged into itself")
            return self._take("merge", {"source": source, "target": target}, who)

    def split(self, c: int, who: str) -> Decision:
        """Split cluster ``c`` in two by 2-means on its embeddings: the larger part keeps ``c`` (and its
        name), the other becomes a new, unnamed cluster. The moved keys are stored with the decision."""
        with self._lock:
            self._check_cluster(c)
            rows = np.flatnonzero(self.rc == c)
            if len(rows) < 4:
                raise DecisionError(f"cluster {c} has {len(rows)} images: too few to split")
            part = _spherical_2means(self.unit_embeddings(rows), seed=c)
            if part.sum() * 2 > len(part):
                part = 1 - part
            moved = rows[part == 1]
            if len(moved) == 0:
                raise DecisionError(f"cluster {c} did not split: its images are all alike")
            used = {int(x) for x in self.head[self.ok]} | set(self.origin) | set(self._summaries)
            for d in self.log.all():
                if d.kind == "split":
                    used.add(int(d.payload["new"]))
            new = max(used) + 1
            return self._take("split", {"cluster": c, "new": new, "keys": [self.keys[r] for r in moved]}, who)

    def mark(self, rows: list[int], mark: str, who: str) -> Decision:
        with self._lock:
            if mark not in (*MARKS, "clear"):
                raise DecisionError(f"unknown mark {mark!r}: {', '.join(MARKS)} or clear")
            if not rows:
                raise DecisionError("no image was chosen")
            return self._take("mark", {"mark": mark, "keys": [self.keys[r] for r in rows]}, who)

    def label(self, rows: list[int], view: str, who: str) -> Decision:
        with self._lock:
            self._check_view(view)
            if not rows:
                raise DecisionError("no image was chosen")
            return self._take("label", {"view": view, "keys": [self.keys[r] for r in rows]}, who)

    def import_labels(self, labels: dict[str, str], source: str, who: str, extra: dict | None = None):
        with self._lock:
            for v in labels.values():
                self._check_view(v)
            return self._take("import", {"source": source, "labels": labels, **(extra or {})}, who)

    def undo(self, decision_id: int | None, who: str) -> Decision:
        """Undo ``decision_id``, or the last decision that stands."""
        with self._lock:
            if decision_id is None:
                last = self.log.last_standing()
                if last is None:
                    raise DecisionError("there is nothing to undo")
                decision_id = last.id
            d = self.log.undo(decision_id, who)
            self.refresh()
            return d

    def describe(self, d: Decision) -> str:
        """One line about a decision, for the log page: image ids, never keys."""
        p = d.payload
        if d.kind == "name":
            return f"named cluster {p['cluster']} {p['view']}"
        if d.kind == "accept":
            return f"accepted cluster {p['cluster']}" + (f" as {p['view']}" if p.get("view") else "")
        if d.kind == "unaccept":
            return f"took back the acceptance of cluster {p['cluster']}"
        if d.kind == "merge":
            return f"merged cluster {p['source']} into {p['target']}"
        if d.kind == "split":
            return f"split {len(p['keys'])} images of cluster {p['cluster']} off into cluster {p['new']}"
        if d.kind == "mark":
            what = "cleared the marks of" if p["mark"] == "clear" else f"marked {p['mark']}:"
            return f"{what} {self._ids(p['keys'])}"
        if d.kind == "label":
            return f"labelled {p['view']}: {self._ids(p['keys'])}"
        if d.kind == "import":
            return f"read {len(p['labels'])} labels back from {p.get('source', 'an import')}"
        if d.kind == "undo":
            return f"undid decision {p['decision']}"
        return d.kind

    @staticmethod
    def _ids(keys: list[str]) -> str:
        shown = ", ".join(image_id(k) for k in keys[:3])
        return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
