import numpy as np
import pytest

pytest.importorskip("faiss")

from training.cluster.knn import mine_neighbors, neighbor_accuracy  # noqa: E402


def test_neighbors_exclude_self_and_find_the_group():
    rng = np.random.default_rng(0)
    centers = np.eye(4, 16) * 10
    x = np.concatenate([c + rng.normal(size=(25, 16)) for c in centers]).astype(np.float32)
    labels = np.repeat(np.arange(4), 25)
    nbrs = mine_neighbors(x, k=5, use_gpu=False)
    assert nbrs.shape == (100, 5)
    assert not (nbrs == np.arange(100)[:, None]).any()
    assert neighbor_accuracy(nbrs, labels) == pytest.approx(1.0)


def test_k_is_capped_by_dataset_size():
    x = np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32)
    assert mine_neighbors(x, k=20, use_gpu=False).shape == (4, 3)
