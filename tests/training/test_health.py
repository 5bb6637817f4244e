"""Collapse signs of an SSL embedding, on embeddings whose answer is known."""

import math

import numpy as np

from training.evaluate.health import effective_rank, embedding_health, mean_pair_cosine


def test_effective_rank_by_hand():
    # Centred points on one axis: one non-zero singular value -> rank 1.
    line = np.array([[1.0, 0.0], [-1.0, 0.0], [2.0, 0.0], [-2.0, 0.0]])
    assert math.isclose(effective_rank(line), 1.0)
    # Two axes with equal spread: singular values equal -> exp(log 2) = 2.
    square = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    assert math.isclose(effective_rank(square), 2.0)


def test_mean_pair_cosine_of_one_point_and_of_opposites():
    same = np.tile([[3.0, 4.0]], (50, 1))
    assert math.isclose(mean_pair_cosine(same), 1.0)
    rng = np.random.default_rng(0)
    spread = rng.standard_normal((2000, 64))
    assert abs(mean_pair_cosine(spread)) < 0.05


def test_collapsed_and_healthy_embeddings():
    rng = np.random.default_rng(1)
    healthy = rng.standard_normal((500, 32))
    h = embedding_health(healthy, "simclr", [4.0, 3.0])
    assert not h["collapsed"] and h["reasons"] == [] and h["effective_rank"] > 20
    collapsed = np.ones((500, 32)) + 1e-3 * rng.standard_normal((500, 32))
    c = embedding_health(collapsed, "simclr", [4.0, 3.0])
    assert c["collapsed"] and "mean cosine" in c["reasons"][0]


def test_dino_loss_at_log_prototypes_is_collapse():
    rng = np.random.default_rng(2)
    emb = rng.standard_normal((300, 16))
    stuck = embedding_health(emb, "dino", [6.7, 6.93], prototypes=1024)
    assert stuck["collapsed"] and stuck["dino_loss_share_of_uniform"] > 0.99
    learning = embedding_health(emb, "dino", [6.7, 4.1], prototypes=1024)
    assert not learning["collapsed"] and learning["dino_loss_share_of_uniform"] < 0.6
    # The loss share is a DINO sign only.
    assert embedding_health(emb, "simclr", [6.93], prototypes=1024)["dino_loss_share_of_uniform"] is None
