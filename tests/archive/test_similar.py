"""service.archive.similar: the index kind chosen by size, IVF-PQ's recall@10 against exact search, and the
refusal of a querying model other than the index's."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from service.archive import store
from service.archive.__main__ import main
from service.archive.run import RunOptions, run_archive
from service.archive.similar import (
    FLAT_MAX,
    IndexModelMismatchError,
    NoSimilarIndexError,
    SimilarIndex,
    build_index,
    choose_kind,
    pq_shape,
)
from service.card import load_card
from tests.service.conftest import build_tiny_repository


def fake_run(root: Path, emb: np.ndarray, version: str = "synthetic-1") -> Path:
    """A finished run folder around given embeddings (as the archive command writes it)."""
    n = len(emb)
    root.mkdir(parents=True)
    cluster = np.arange(n, dtype=np.int32) % 7
    table = pa.table(
        {
            "key": [f"img{i:06d}.png" for i in range(n)],
            "source": [f"img{i:06d}.png" for i in range(n)],
            "sop_instance_uid": pa.nulls(n, pa.string()),
            "subject_key": pa.nulls(n, pa.string()),
            "cluster": cluster,
            "confidence": np.ones(n, np.float32),
            "top_clusters": [[int(c)] for c in cluster],
            "top_probs": [[1.0]] * n,
            "view": pa.nulls(n, pa.string()),
            "ood": np.zeros(n, bool),
            "ood_score": np.zeros(n, np.float32),
            "model_version": [version] * n,
            "error_code": pa.nulls(n, pa.string()),
            "embedding_row": np.arange(n),
            "map_x": np.zeros(n, np.float32),
            "map_y": np.zeros(n, np.float32),
        }
    )
    store.write_results(root, table, emb)
    manifest = store.RunManifest(
        model_version=version,
        card_sha256="0" * 64,
        source="synthetic",
        status="complete",
        finished=datetime.now(timezone.utc),
        embedding_dim=emb.shape[1],
    )
    store.write_manifest(root, manifest)
    return root


def clustered_embeddings(n: int, dim: int, centres: int = 24, seed: int = 0) -> np.ndarray:
    """Unit vectors around a few dozen centres, as the embeddings of an archive of views are."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim)).astype(np.float32)
    x = c[rng.integers(0, centres, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def recall_at_10(index: SimilarIndex, emb: np.ndarray, queries: np.ndarray) -> float:
    _, got = index.search_ids(emb[queries], 10)
    exact = np.argsort(-(emb[queries] @ emb.T), axis=1)[:, :10]
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact, strict=True)]))


def test_the_kind_follows_the_size() -> None:
    assert choose_kind(FLAT_MAX) == "flat" and choose_kind(FLAT_MAX + 1) == "ivfpq"
    nlist, m, nbits = pq_shape(1_000_000, 1280)
    assert nlist == 4000 and 1280 % m == 0 and m == 64 and nbits == 8
    assert pq_shape(12_000, 256) == (307, 64, 8)


def test_ivfpq_recall_at_10_against_exact_search(tmp_path: Path) -> None:
    emb = clustered_embeddings(6_000, 128)
    run = fake_run(tmp_path / "run", emb)
    meta = build_index(run, kind="ivfpq")
    assert meta.kind == "ivfpq" and meta.count == 6_000 and meta.nprobe >= 16
    index = SimilarIndex.load(run)
    queries = np.random.default_rng(1).choice(len(emb), 200, replace=False)
    assert recall_at_10(index, emb, queries) >= 0.95
    flat = build_index(run, kind="flat")
    assert flat.kind == "flat"
    assert recall_at_10(SimilarIndex.load(run), emb, queries) == 1.0


def test_hits_name_their_row_key_and_cluster(tmp_path: Path) -> None:
    emb = clustered_embeddings(500, 32)
    run = fake_run(tmp_path / "run", emb)
    build_index(run)
    hits = SimilarIndex.load(run).search(emb[42], k=3)
    assert [h["row"] for h in hits][0] == 42 and hits[0]["key"] == "img000042.png"
    assert hits[0]["cluster"] == 42 % 7 and hits[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert hits[0]["similarity"] >= hits[1]["similarity"] >= hits[2]["similarity"]


def test_a_run_without_an_index(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "run", clustered_embeddings(50, 16))
    with pytest.raises(NoSimilarIndexError):
        SimilarIndex.load(run)


def test_another_models_query_is_refused(archive: Path, tiny_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    opts = RunOptions(
        out=out, model_repository=tiny_repo, workers=1, progress=False, map_method="pca", report=False
    )
    run_archive(str(archive), opts)
    build_index(out)
    index = SimilarIndex.load(out)
    index.check_model(load_card(tiny_repo))  # the run's own model: fine
    other = load_card(build_tiny_repository(tmp_path / "other", version="tiny-test-2", seed=5))
    with pytest.raises(IndexModelMismatchError, match="tiny-test-1"):
        index.check_model(other)
    retrained = load_card(build_tiny_repository(tmp_path / "same_version", seed=9))
    with pytest.raises(IndexModelMismatchError, match="another backbone"):
        index.check_model(retrained)
    # The command line: the archive's own image finds itself first; another model is refused (exit 2).
    image = archive / "study_a" / "img0001.png"
    assert (
        main(["similar", str(image), "--run", str(out), "-k", "3", "--model-repository", str(tiny_repo)]) == 0
    )
    code = main(["similar", str(image), "--run", str(out), "--model-repository", str(tmp_path / "other")])
    assert code == 2
