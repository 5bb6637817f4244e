"""What to label next: each criterion picks what it says, never an image already labelled or marked."""

from __future__ import annotations

import numpy as np

from service.archive.store import load_run
from service.review import active
from service.review.decisions import DecisionLog
from service.review.state import Review
from tests.review.conftest import write_synthetic_run


def test_least_confident_and_boundary(synthetic_run, tmp_path):
    r = Review(load_run(synthetic_run), DecisionLog(tmp_path / "d.sqlite"))
    assert active.least_confident(r, 3) == [0, 1, 2]  # confidence rises with the row
    r.label([0], "brain", "ana")
    r.mark([1], "outlier", "ana")
    assert active.least_confident(r, 2) == [2, 3]
    # margin = p - (1 - p): smallest where p is lowest
    assert active.boundary(r, 2) == [2, 3]


def test_coreset_goes_where_no_label_is(tmp_path):
    # 20 points around one direction, 1 far away: with a label in the crowd, the far one comes first.
    rng = np.random.default_rng(1)
    crowd = np.array([1.0, 0, 0]) + 0.02 * rng.standard_normal((20, 3))
    far = np.array([[0, 0, 1.0]])
    emb = np.vstack([crowd, far])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    run = write_synthetic_run(tmp_path / "run", emb, [0] * 21)
    r = Review(load_run(run), DecisionLog(tmp_path / "d.sqlite"))
    r.label([0], "brain", "ana")
    picks = active.coreset(r, 3)
    assert picks[0] == 20 and len(set(picks)) == 3 and 0 not in picks


def test_mixed_takes_from_each_without_repeats(synthetic_run, tmp_path):
    r = Review(load_run(synthetic_run), DecisionLog(tmp_path / "d.sqlite"))
    picked = active.pick(r, 9, "mixed")
    rows = [row for row, _ in picked]
    assert len(rows) == 9 == len(set(rows))
    assert {why for _, why in picked} == {"least", "boundary", "coreset"}
    assert 30 not in rows  # the error row has no answer to learn from
