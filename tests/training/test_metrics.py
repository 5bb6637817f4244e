import numpy as np
import pytest

pytest.importorskip("sklearn")

from training.evaluate.metrics import cluster_metrics, cluster_purity, hungarian_accuracy  # noqa: E402


def test_purity_worked_example():
    # cluster 0: a a b -> 2 ; cluster 1: b b ; cluster 2: c -> purity (2 + 2 + 1) / 6
    pred = np.array([0, 0, 0, 1, 1, 2])
    labels = np.array(["a", "a", "b", "b", "b", "c"])
    assert cluster_purity(pred, labels) == pytest.approx(5 / 6)


def test_hungarian_accuracy_counts_one_cluster_per_class():
    # Two clusters both mostly "a": only one may map to "a", the other gets "b".
    pred = np.array([0, 0, 0, 1, 1, 1])
    labels = np.array(["a", "a", "b", "a", "a", "b"])
    # best map: 0->a (2) and 1->b (1) or 0->b (1), 1->a (2): 3/6
    assert hungarian_accuracy(pred, labels) == pytest.approx(0.5)
    assert cluster_purity(pred, labels) == pytest.approx(4 / 6)


def test_perfect_and_permuted_clustering():
    labels = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([2, 2, 0, 0, 1, 1])
    m = cluster_metrics(pred, labels)
    assert m["purity"] == m["acc"] == pytest.approx(1.0)
    assert m["nmi"] == pytest.approx(1.0)
    assert m["ari"] == pytest.approx(1.0)
    assert m["filled_clusters"] == 3


def test_single_cluster_has_zero_nmi():
    labels = np.array([0, 0, 1, 1])
    m = cluster_metrics(np.zeros(4, int), labels)
    assert m["nmi"] == pytest.approx(0.0)
    assert m["purity"] == pytest.approx(0.5)


def test_ood_calibration_flags_far_embeddings():
    from training.cluster.ood import calibrate_ood

    rng = np.random.default_rng(0)
    a = np.array([1.0, 0, 0, 0]) + 0.05 * rng.normal(size=(50, 4))
    b = np.array([0, 1.0, 0, 0]) + 0.05 * rng.normal(size=(50, 4))
    emb = np.concatenate([a, b])
    pred = np.repeat([0, 1], 50)
    cal = calibrate_ood(emb, pred, k=3, quantile=0.02)  # cluster 2 is empty: no centroid for it
    cents = np.array(cal.centroids)
    assert cents.shape == (2, 4)
    np.testing.assert_allclose(np.linalg.norm(cents, axis=1), 1.0, atol=1e-5)
    scores = (emb / np.linalg.norm(emb, axis=1, keepdims=True) @ cents.T).max(1)
    assert (scores < cal.threshold).mean() <= 0.02 + 1e-9
    far = np.array([0, 0, 1.0, 0])
    assert (far @ cents.T).max() < cal.threshold


def test_knn_ood_calibration_on_held_out_images():
    import numpy as np

    from training.cluster.ood import calibrate_knn, knn_scores

    rng = np.random.default_rng(0)
    train = rng.standard_normal((300, 8)) + [4, 0, 0, 0, 0, 0, 0, 0]
    held = rng.standard_normal((100, 8)) + [4, 0, 0, 0, 0, 0, 0, 0]
    far = rng.standard_normal((20, 8)) + [-4, 0, 0, 0, 0, 0, 0, 0]
    cal, bank = calibrate_knn(train, held, k=5, quantile=0.05, max_bank=200)
    assert cal.method == "knn_cosine" and bank.dtype == np.float16 and bank.shape == (200, 8)
    assert np.allclose(np.linalg.norm(bank.astype(np.float32), axis=1), 1, atol=1e-3)
    assert "held-out" in cal.calibrated_on
    # The threshold is the held-out quantile: 5 of 100 held-out images fall below it; the far ones all do.
    held_scores = knn_scores(held, bank.astype(np.float32), 5)
    assert (held_scores < cal.threshold).sum() == 5
    assert (knn_scores(far, bank.astype(np.float32), 5) < cal.threshold).all()
    # Nothing held out: each training image is scored without itself (its own similarity of 1 left out).
    cal_loo, bank_all = calibrate_knn(train[:150], None, k=5, quantile=0.05)
    assert len(bank_all) == 150 and "without itself" in cal_loo.calibrated_on
    with_self = knn_scores(train[:150], bank_all.astype(np.float32), 1)
    assert np.allclose(with_self, 1, atol=1e-3)
    assert cal_loo.threshold < 0.999
