"""Similar-image search over a finished run: a faiss index of its embeddings, queried with the embedding
of a new image (``python -m service.archive similar``, and ``POST /v1/similar`` when the service is given
``FUSC_SIMILAR_INDEX``).

Exact inner-product search (``IndexFlatIP``) up to :data:`FLAT_MAX` images; above, IVF-PQ (compressed
codes, a fraction of the memory) whose candidates are re-ranked by their exact similarity, read from the
run's ``embeddings.npy`` (memory-mapped): the codes find the neighbourhood, the stored vectors order it.

An index only answers for the model that made its embeddings: the model version and the backbone's SHA-256
are checked against the querying model's, and a mismatch is refused with ``index_model_mismatch``.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from service.errors import FuscError

INDEX_DIR = "index"
INDEX_FILE = "index.faiss"
META_FILE = "index.json"
FLAT_MAX = 100_000  # 100k x 1280 float32 = 0.5 GB: past that, compressed codes
RERANK_MIN = 100  # IVF-PQ candidates re-ranked exactly, at least this many (or 10 k)
TRAIN_MAX = 200_000
MAX_K = 100


class NoSimilarIndexError(FuscError):
    """The service was started without a similar-image index (FUSC_SIMILAR_INDEX)."""

    code = "no_similar_index"
    http_status = 404


class IndexModelMismatchError(FuscError):
    """The index holds embeddings of another model than the one answering: its neighbours would be wrong."""

    code = "index_model_mismatch"
    http_status = 409


class IndexMeta(BaseModel):
    kind: Literal["flat", "ivfpq"]
    count: int
    dim: int
    model_version: str
    card_sha256: str
    backbone_sha256: str
    precision: str
    run_created: datetime
    built: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    nlist: int = 0
    m: int = 0
    nbits: int = 0
    nprobe: int = 0


class SimilarHit(BaseModel):
    """One archive image: its row in the run's results.parquet, its archive key (path relative to the
    archive's root, or ``sop:<SOP Instance UID>``), its subject key (a keyed hash), cluster and view."""

    row: int
    key: str
    sop_instance_uid: str | None
    subject_key: str | None
    cluster: int
    view: str | None
    ood: bool | None
    similarity: float


class SimilarIndexInfo(BaseModel):
    kind: str
    count: int
    model_version: str
    run_created: datetime


class SimilarResponse(BaseModel):
    model_version: str
    index: SimilarIndexInfo
    neighbours: list[SimilarHit]


def choose_kind(n: int) -> Literal["flat", "ivfpq"]:
    return "flat" if n <= FLAT_MAX else "ivfpq"


def pq_shape(n: int, dim: int) -> tuple[int, int, int]:
    """(nlist, m, nbits) for n vectors: ~4 sqrt(n) lists with >= 39 training points each, sub-vectors of
    >= 4 dimensions (at most 64 of them), 8-bit codes when there are enough points to train 256 centroids."""
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39, 65536))
    m = max(d for d in range(1, min(64, dim) + 1) if dim % d == 0 and dim // d >= 4) if dim >= 4 else 1
    nbits = min(8, max(4, int(math.log2(max(1, n // 39)))))
    return nlist, m, nbits


def build_index(run_dir: Path | str, kind: str = "auto", *, seed: int = 0):
    """Build ``RUN_DIR/index/`` from a finished run; returns its IndexMeta."""
    import faiss

    from service.archive.store import load_run

    run_dir = Path(run_dir)
    run = load_run(run_dir)
    emb = np.ascontiguousarray(run.embeddings, dtype=np.float32)
    n, dim = emb.shape
    if n == 0:
        raise FuscError("the run has no answered images to index")
    chosen = choose_kind(n) if kind == "auto" else kind
    extra = run.manifest.extra
    meta = IndexMeta(
        kind=chosen,  # type: ignore[arg-type]
        count=n,
        dim=dim,
        model_version=run.manifest.model_version,
        card_sha256=run.manifest.card_sha256,
        backbone_sha256=extra.get("backbone_sha256", ""),
        precision=extra.get("precision", "fp32"),
        run_created=run.manifest.created,
    )
    if chosen == "flat":
        index = faiss.IndexFlatIP(dim)
        index.add(emb)
    elif chosen == "ivfpq":
        nlist, m, nbits = pq_shape(n, dim)
        # L2 on unit vectors orders neighbours as the inner product does, and PQ encodes L2 residuals best.
        index = faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, nlist, m, nbits)
        rng = np.random.default_rng(seed)
        train = emb if n <= TRAIN_MAX else emb[np.sort(rng.choice(n, TRAIN_MAX, replace=False))]
        index.train(train)
        index.add(emb)
        index.nprobe = min(nlist, max(16, nlist // 8))
        meta = meta.model_copy(update={"nlist": nlist, "m": m, "nbits": nbits, "nprobe": index.nprobe})
    else:
        raise ValueError(f"unknown index kind {kind!r}: auto, flat or ivfpq")
    out = run_dir / INDEX_DIR
    out.mkdir(exist_ok=True)
    tmp = out / (INDEX_FILE + ".tmp")
    faiss.write_index(index, str(tmp))
    tmp.replace(out / INDEX_FILE)
    (out / META_FILE).write_text(meta.model_dump_json(indent=2) + "\n")
    return meta


class SimilarIndex:
    """A run's index, loaded for queries (thread-safe: faiss searches only read)."""

    def __init__(self, run_dir: Path, meta: IndexMeta, index, embeddings: np.ndarray, rows: dict) -> None:
        self.run_dir = run_dir
        self.meta = meta
        self.index = index
        self.embeddings = embeddings
        self._rows = rows  # column -> array, indexed by embedding row

    @classmethod
    def load(cls, path: Path | str) -> SimilarIndex:
        """``path`` is a run folder holding ``index/`` (or that ``index/`` folder itself)."""
        import faiss
        import pyarrow as pa
        import pyarrow.compute as pc

        from service.archive.store import load_run

        path = Path(path)
        run_dir = path.parent if (path / META_FILE).is_file() else path
        folder = run_dir / INDEX_DIR
        if not (folder / META_FILE).is_file():
            raise NoSimilarIndexError(
                f"no similar-image index in {run_dir}: build one with python -m service.archive index RUN_DIR"
            )
        meta = IndexMeta.model_validate_json((folder / META_FILE).read_text())
        run = load_run(run_dir)
        index = faiss.read_index(str(folder / INDEX_FILE))
        if index.ntotal != meta.count or len(run.embeddings) != meta.count:
            raise FuscError(f"the index in {folder} does not match its run's embeddings: build it again")
        if meta.kind == "ivfpq":
            faiss.extract_index_ivf(index).nprobe = meta.nprobe
        t = run.table.append_column("row", pa.array(np.arange(len(run.table)), pa.int64()))
        answered = t.filter(pc.is_valid(t.column("embedding_row"))).sort_by("embedding_row")
        if not np.array_equal(answered.column("embedding_row").to_numpy(), np.arange(meta.count)):
            raise FuscError(f"the results in {run_dir} do not cover the index's embeddings one to one")
        rows = {
            **{c: answered.column(c).to_pylist() for c in ("key", "sop_instance_uid", "subject_key", "view")},
            "row": answered.column("row").to_numpy(),
            "cluster": answered.column("cluster").to_numpy(),
            "ood": answered.column("ood").to_pylist(),
        }
        return cls(run_dir, meta, index, run.embeddings, rows)

    def check_model(self, card, precision: str = "fp32") -> None:
        """Refuse a querying model other than the one that made the index's embeddings."""
        backbone = card.backbone_for(precision).sha256
        if card.version != self.meta.model_version:
            raise IndexModelMismatchError(
                f"the similar-image index holds embeddings of model {self.meta.model_version}, this model is "
                f"{card.version}: run the archive with this model and build its index"
            )
        if self.meta.backbone_sha256 and backbone != self.meta.backbone_sha256:
            raise IndexModelMismatchError(
                f"the similar-image index was built with another backbone (model {self.meta.model_version}, "
                f"{self.meta.precision}) than this one ({precision}): run the archive again with this one"
            )

    def search_ids(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities [Q, k], embedding rows [Q, k]) for unit queries [Q, D]; -1 pads a short answer."""
        q = np.array(np.atleast_2d(query), dtype=np.float32, order="C", copy=True)
        q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        k = max(1, min(k, self.meta.count))
        if self.meta.kind == "flat":
            sims, ids = self.index.search(q, k)
            return sims, ids
        wide = min(self.meta.count, max(RERANK_MIN, 10 * k))
        _, cand = self.index.search(q, wide)
        sims_out = np.full((len(q), k), -np.inf, np.float32)
        ids_out = np.full((len(q), k), -1, np.int64)
        for i, row in enumerate(cand):
            row = row[row >= 0]
            order = np.argsort(row)  # sorted reads from the memory-mapped embeddings
            exact = np.asarray(self.embeddings[row[order]], np.float32) @ q[i]
            best = np.argsort(-exact, kind="stable")[:k]
            sims_out[i, : len(best)] = exact[best]
            ids_out[i, : len(best)] = row[order][best]
        return sims_out, ids_out

    def search(self, embedding, k: int = 10) -> list[dict]:
        sims, ids = self.search_ids(np.asarray(embedding, np.float32)[None], k)
        out = []
        for sim, e in zip(sims[0], ids[0], strict=True):
            if e < 0:
                continue
            out.append(
                SimilarHit(
                    row=int(self._rows["row"][e]),
                    key=self._rows["key"][e],
                    sop_instance_uid=self._rows["sop_instance_uid"][e],
                    subject_key=self._rows["subject_key"][e],
                    cluster=int(self._rows["cluster"][e]),
                    view=self._rows["view"][e],
                    ood=self._rows["ood"][e],
                    similarity=round(float(sim), 6),
                ).model_dump()
            )
        return out

    def info(self) -> SimilarIndexInfo:
        m = self.meta
        return SimilarIndexInfo(
            kind=m.kind, count=m.count, model_version=m.model_version, run_created=m.run_created
        )
