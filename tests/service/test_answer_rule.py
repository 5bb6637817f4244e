"""When an answer names a view, and the knn_cosine OOD check that decides part of it (tiny repositories)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from service.backends import OnnxRuntimeBackend
from service.card import CARD_FILENAME, Naming, OODCalibration, load_card, sha256_file
from service.errors import ModelRepositoryError
from service.pipeline import ClusterResult, Pipeline, Prepared, load_pipeline
from service.settings import Settings
from tests.service.conftest import (
    TINY_K,
    TINY_NAMES,
    add_knn_ood,
    build_tiny_repository,
    png_bytes,
    synthetic_frame,
    tiny_embeddings,
)

PREPARED = Prepared(tensor=np.zeros((1, 1, 1), np.float32), decode_ms=0.0, clean_ms=0.0)


def probs_for(cluster: int, confidence: float) -> np.ndarray:
    """K probabilities whose top cluster is ``cluster`` with ``confidence``; the rest shared out evenly."""
    p = np.full(TINY_K, (1.0 - confidence) / (TINY_K - 1), np.float32)
    p[cluster] = confidence
    return p


@pytest.fixture(scope="module")
def bank_images() -> list[bytes]:
    return [png_bytes(synthetic_frame(seed)) for seed in range(10, 22)]


@pytest.fixture(scope="module")
def knn_repo(tmp_path_factory: pytest.TempPathFactory, bank_images: list[bytes]) -> Path:
    repo = build_tiny_repository(tmp_path_factory.mktemp("knn") / "model_repository")
    calibration = [png_bytes(synthetic_frame(seed)) for seed in range(30, 36)]
    return add_knn_ood(repo, bank_images, calibration, k=3)


@pytest.fixture(scope="module")
def knn_pipeline(knn_repo: Path) -> Pipeline:
    return load_pipeline(Settings(model_repository=knn_repo))


def test_a_view_is_named_only_for_a_confident_answer_of_a_named_cluster(tiny_repo: Path) -> None:
    card = load_card(tiny_repo)
    assert card.ood is None and card.naming.min_confidence == 0.9
    pipeline = Pipeline(card, OnnxRuntimeBackend(tiny_repo, card))
    named = next(iter(TINY_NAMES))
    unnamed = next(c for c in range(TINY_K) if c not in TINY_NAMES)

    confident = pipeline.result(PREPARED, probs_for(named, 0.95), 1.0, 1.0)
    assert (confident.view, confident.view_reason) == (TINY_NAMES[named], None)
    assert confident.ood is None and confident.ood_score is None

    unsure = pipeline.result(PREPARED, probs_for(named, 0.6), 1.0, 1.0)
    assert (unsure.view, unsure.view_reason) == (None, "low_confidence")
    # Runner-up names stay: they describe the clusters, and the image is not out of distribution.
    assert [t.view for t in unsure.top] == [TINY_NAMES.get(t.cluster) for t in unsure.top]

    nameless = pipeline.result(PREPARED, probs_for(unnamed, 0.99), 1.0, 1.0)
    assert (nameless.view, nameless.view_reason) == (None, "cluster_unnamed")

    # The bar is the card's: exactly at it is enough.
    lenient = Pipeline(card.model_copy(update={"naming": Naming(min_confidence=0.6)}), pipeline.backend)
    at_bar = lenient.result(PREPARED, probs_for(named, 0.6), 1.0, 1.0)
    assert (at_bar.view, at_bar.view_reason) == (TINY_NAMES[named], None)


def test_an_out_of_distribution_answer_names_no_view_anywhere(tiny_repo: Path) -> None:
    card = load_card(tiny_repo)
    centroids = np.eye(TINY_K, card.embedding_dim, dtype=np.float32).tolist()
    ood = OODCalibration(centroids=centroids, threshold=0.5, quantile=0.01)
    pipeline = Pipeline(card.model_copy(update={"ood": ood}), OnnxRuntimeBackend(tiny_repo, card))
    named = next(iter(TINY_NAMES))
    flagged = pipeline.result(PREPARED, probs_for(named, 0.99), 1.0, 1.0, ood_score=0.2)
    assert flagged.ood is True and flagged.ood_score == pytest.approx(0.2)
    assert (flagged.view, flagged.view_reason) == (None, "out_of_distribution")
    assert [t.view for t in flagged.top] == [None] * len(flagged.top)
    kept = pipeline.result(PREPARED, probs_for(named, 0.99), 1.0, 1.0, ood_score=0.8)
    assert kept.ood is False and kept.view == TINY_NAMES[named]
    # A calibrated model that could not score the embedding does not vouch for it.
    unscored = pipeline.result(PREPARED, probs_for(named, 0.99), 1.0, 1.0, ood_score=float("nan"))
    assert unscored.ood is True and unscored.ood_score is None and unscored.view is None


def test_knn_score_is_the_mean_of_the_k_nearest_bank_cosines(
    knn_pipeline: Pipeline, knn_repo: Path, good_png: bytes, other_pngs: list[bytes]
) -> None:
    card = knn_pipeline.card
    assert card.ood is not None and card.ood.method == "knn_cosine" and card.ood.k == 3
    images = [good_png, *other_pngs]
    stored = np.load(knn_repo / "ood_bank.npy").astype(np.float32)  # as stored, as training scored
    emb = tiny_embeddings(knn_repo, images)
    sims = (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ stored.T
    expected = np.sort(sims, axis=1)[:, -3:].mean(axis=1)
    results = knn_pipeline.cluster(images)
    for result, score in zip(results, expected, strict=True):
        assert isinstance(result, ClusterResult)
        assert result.ood_score == pytest.approx(float(score), abs=1e-5)
        assert result.ood is (float(score) < card.ood.threshold)
    # A k larger than the bank averages over the whole bank.
    wide = card.model_copy(update={"ood": card.ood.model_copy(update={"k": 1000})})
    scores = Pipeline(wide, knn_pipeline.backend, repository=knn_repo).ood_scores(emb)
    np.testing.assert_allclose(scores, sims.mean(axis=1), atol=1e-5)


def test_a_bank_image_is_in_distribution_and_the_threshold_decides(
    knn_pipeline: Pipeline, knn_repo: Path, bank_images: list[bytes]
) -> None:
    card = knn_pipeline.card
    assert card.ood is not None
    # Its own bank row is one of its k nearest: cosine 1 (to float16 precision) lifts the mean.
    (own,) = knn_pipeline.cluster(bank_images[:1])
    assert isinstance(own, ClusterResult) and own.ood is False
    for threshold, flagged in ((-1.0, False), (1.01, True)):
        ood = card.ood.model_copy(update={"threshold": threshold})
        pipeline = Pipeline(card.model_copy(update={"ood": ood}), knn_pipeline.backend, repository=knn_repo)
        (result,) = pipeline.cluster(bank_images[:1])
        assert isinstance(result, ClusterResult)
        assert result.ood is flagged
        assert result.ood_score == pytest.approx(own.ood_score, abs=1e-6)
        if flagged:
            assert result.view is None and result.view_reason == "out_of_distribution"
            assert all(t.view is None for t in result.top)


def _rewrite_bank(repo: Path, bank: np.ndarray, *, count: int | None = None) -> None:
    """Replace the bank and re-sign it in the card, as a mis-exported repository would look."""
    np.save(repo / "ood_bank.npy", bank)
    raw = json.loads((repo / CARD_FILENAME).read_text())
    raw["ood"]["bank"]["sha256"] = sha256_file(repo / "ood_bank.npy")
    raw["ood"]["bank"]["count"] = len(bank) if count is None else count
    (repo / CARD_FILENAME).write_text(json.dumps(raw))


def test_a_bad_bank_is_refused_at_start(knn_repo: Path, tmp_path: Path) -> None:
    def fresh(name: str) -> Path:
        return Path(shutil.copytree(knn_repo, tmp_path / name))

    repo = fresh("missing")
    (repo / "ood_bank.npy").unlink()
    with pytest.raises(ModelRepositoryError, match="does not exist"):
        load_pipeline(Settings(model_repository=repo))

    repo = fresh("tampered")
    with open(repo / "ood_bank.npy", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelRepositoryError, match="SHA-256"):
        load_pipeline(Settings(model_repository=repo))

    repo = fresh("wrong_dim")
    _rewrite_bank(repo, np.ones((4, 7), np.float16))
    with pytest.raises(ModelRepositoryError, match="shape"):
        load_pipeline(Settings(model_repository=repo))

    repo = fresh("wrong_count")
    _rewrite_bank(repo, np.ones((4, load_card(repo).embedding_dim), np.float16), count=5)
    with pytest.raises(ModelRepositoryError, match="rows"):
        load_pipeline(Settings(model_repository=repo))

    card = load_card(knn_repo)
    with pytest.raises(ModelRepositoryError, match="repository"):
        Pipeline(card, OnnxRuntimeBackend(knn_repo, card))


def test_a_centroid_card_without_centroids_is_refused(tiny_repo: Path) -> None:
    card = load_card(tiny_repo)
    empty = card.model_copy(update={"ood": OODCalibration(threshold=0.5, quantile=0.01)})
    with pytest.raises(ModelRepositoryError, match="centroids"):
        Pipeline(empty, OnnxRuntimeBackend(tiny_repo, card))


def test_service_scores_are_the_calibration_arithmetic(knn_repo: Path, knn_pipeline: Pipeline) -> None:
    """The threshold was set on training.cluster.ood's scores; the service must compute the same numbers."""
    from training.cluster.ood import knn_scores

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((7, knn_pipeline.card.embedding_dim)).astype(np.float32)
    bank = np.load(knn_repo / "ood_bank.npy").astype(np.float32)
    np.testing.assert_allclose(knn_pipeline.ood_scores(emb), knn_scores(emb, bank, 3), atol=1e-6)
