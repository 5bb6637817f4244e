"""service/drift.py: Jensen-Shannon divergence by hand, the sliding window, the training mix from the card."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from prometheus_client import REGISTRY

from service.card import load_card
from service.drift import ClusterMix, js_divergence, training_mix


def test_js_divergence_by_hand() -> None:
    assert js_divergence(np.array([1, 0]), np.array([0, 1])) == pytest.approx(1.0)  # nothing in common
    assert js_divergence(np.array([3, 1]), np.array([6, 2])) == pytest.approx(0.0)  # same mix, other counts
    # p = (1/2, 1/2), q = (1, 0), m = (3/4, 1/4):
    # KL(p||m) = 1/2 log2(2/3) + 1/2 log2(2); KL(q||m) = log2(4/3); JSD = half their sum.
    expected = 0.5 * (0.5 * math.log2(2 / 3) + 0.5 * 1.0) + 0.5 * math.log2(4 / 3)
    assert js_divergence(np.array([1, 1]), np.array([1, 0])) == pytest.approx(expected)


def test_window_keeps_the_last_n_answers_and_exports_them() -> None:
    mix = ClusterMix([0.5, 0.5], window=4)
    for c in (0, 0, 0, 0):
        mix.record(c)
    assert mix.snapshot()["divergence"] == pytest.approx(
        js_divergence(np.array([1, 0]), np.array([1, 1])), abs=1e-6
    )
    for c in (1, 0, 1):
        value = mix.record(c)
    snap = mix.snapshot()
    assert snap["answers"] == 4 and snap["recent_mix"] == [0.5, 0.5]  # 0, 1, 0, 1
    assert value == pytest.approx(0.0)
    assert REGISTRY.get_sample_value("fusc_cluster_mix_divergence") == pytest.approx(0.0)
    assert REGISTRY.get_sample_value("fusc_cluster_mix_answers") == 4


def test_training_mix_from_the_card_or_uniform_with_a_note(
    tiny_repo, caplog: pytest.LogCaptureFixture
) -> None:
    card = load_card(tiny_repo)
    sized = card.model_copy(update={"quality": {"cluster_sizes_train": [10, 30, 0, 40, 20]}})
    mix, source = training_mix(sized)
    assert source == "model_card" and mix.tolist() == [0.1, 0.3, 0.0, 0.4, 0.2]
    for quality in ({}, {"cluster_sizes_train": [1, 2]}, {"cluster_sizes_train": "many"}):
        with caplog.at_level(logging.INFO, logger="fusc.service"):
            caplog.clear()
            mix, source = training_mix(card.model_copy(update={"quality": quality}))
        assert source == "uniform" and np.allclose(mix, 1 / card.num_clusters)
        assert "uniform" in caplog.text
