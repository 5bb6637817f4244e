"""The review state: decisions replayed over a run's answers; labels and card names that follow."""

from __future__ import annotations

import numpy as np
import pytest

from service.archive.store import load_run
from service.review.decisions import DecisionError, DecisionLog
from service.review.state import Review, image_id


def _review(run_dir, tmp_path, card_names=None) -> Review:
    return Review(load_run(run_dir), DecisionLog(tmp_path / "state" / "d.sqlite"), card_names)


def test_head_clusters_are_the_first_clusters(synthetic_run, tmp_path):
    r = _review(synthetic_run, tmp_path, {0: "brain"})
    assert [(s.id, s.size, s.name, s.card_name) for s in r.clusters()] == [
        (0, 10, None, "brain"),
        (1, 10, None, None),
        (2, 10, None, None),
    ]
    assert r.error_codes == {"corrupt_image": 1}
    assert r.label_of(30).status == "error"
    assert {lab.status for lab in r.labels()[:30]} == {"unreviewed"}
    # Most confident first by default, least confident first on demand.
    conf = r.confidence[r.members(0)]
    assert (np.diff(conf) <= 0).all()
    assert (np.diff(r.confidence[r.members(0, "least")]) >= 0).all()


def test_name_accept_merge_and_their_labels(synthetic_run, tmp_path):
    r = _review(synthetic_run, tmp_path)
    r.name(0, "brain", "ana")
    r.accept(1, "ana", view="abdomen")  # name and accept in one decision
    labels = r.labels()
    assert labels[0].view == "brain" and labels[0].status == "named"
    assert labels[10].view == "abdomen" and labels[10].status == "accepted"
    r.merge(1, 0, "ana")
    assert [s.id for s in r.clusters()] == [0, 2]
    s0 = r.cluster(0)
    assert s0.size == 20 and s0.name == "brain" and s0.merged == (1,) and not s0.accepted
    assert r.labels()[10].view == "brain"
    with pytest.raises(DecisionError):
        r.merge(0, 0, "ana")
    with pytest.raises(DecisionError):
        r.name(1, "brain", "ana")  # merged away
    with pytest.raises(DecisionError):
        r.name(2, "not-a-view", "ana")
    with pytest.raises(DecisionError, match="no name"):
        r.accept(2, "ana")


def test_undo_of_a_merge_restores_both_clusters_and_names(synthetic_run, tmp_path):
    r = _review(synthetic_run, tmp_path)
    r.name(0, "brain", "ana")
    r.name(1, "abdomen", "ana")
    m = r.merge(1, 0, "ana")
    r.undo(m.id, "ben")
    assert [(s.id, s.size, s.name) for s in r.clusters()] == [
        (0, 10, "brain"),
        (1, 10, "abdomen"),
        (2, 10, None),
    ]


def test_image_label_beats_mark_beats_cluster_name(synthetic_run, tmp_path):
    r = _review(synthetic_run, tmp_path)
    r.name(2, "femur", "ana")
    r.mark([20, 21], "outlier", "ana")
    r.mark([22], "wrong", "ana")
    r.label([21], "spine", "ana")
    labels = r.labels()
    assert (labels[20].view, labels[20].status) == (None, "outlier")
    assert (labels[21].view, labels[21].status, labels[21].source) == ("spine", "labelled", "image")
    assert (labels[22].view, labels[22].status) == (None, "wrong")
    assert (labels[23].view, labels[23].status) == ("femur", "named")
    r.mark([22], "clear", "ana")
    assert r.labels()[22].view == "femur"
    r.undo(None, "ana")  # the clear
    assert r.labels()[22].status == "wrong"


def test_split_moves_the_smaller_part_and_replays_the_same(synthetic_run, tmp_path):
    r = _review(synthetic_run, tmp_path)
    r.merge(1, 0, "ana")  # two nearby groups of 10 in one cluster
    d = r.split(0, "ana")
    new = d.payload["new"]
    assert new == 3
    moved = {r.row_of_key[k] for k in d.payload["keys"]}
    assert moved in ({*range(0, 10)}, {*range(10, 20)})  # 2-means finds the two groups
    assert r.cluster(new).origin == "split of 0" and r.cluster(new).size == 10
    again = _review(synthetic_run, tmp_path)  # a restarted app: the same state from the log
    assert [(s.id, s.size) for s in again.clusters()] == [(s.id, s.size) for s in r.clusters()]


def test_card_names_follow_the_majority_of_each_head_cluster(synthetic_run, tmp_path):
    r = _review(synthetic_run, tmp_path, {2: "cervix"})
    r.name(0, "brain", "ana")
    r.name(1, "abdomen", "ana")
    r.label(list(range(10, 16)), "kidneys", "ana")  # six of ten: the majority of head cluster 1
    assert r.card_names_now() == {0: "brain", 1: "kidneys", 2: "cervix"}  # 2: the old card's, unreviewed


def test_import_labels_and_page_ids_hide_keys(synthetic_run, tmp_path):
    r = _review(synthetic_run, tmp_path)
    d = r.import_labels({"img_0003.png": "profile"}, "labelstudio", "ls", {"project": 4})
    assert r.labels()[3].source == "labelstudio"
    assert "img_0003" not in r.describe(d)
    m = r.mark([3, 4, 5, 6], "wrong", "ana")
    text = r.describe(m)
    assert image_id("img_0003.png") in text and "img_" not in text and "1 more" in text


def test_a_second_app_on_the_same_state_catches_up(synthetic_run, tmp_path):
    one = _review(synthetic_run, tmp_path)
    two = _review(synthetic_run, tmp_path)
    one.name(0, "brain", "ana")
    assert two.cluster(0).name is None  # not yet replayed
    two.sync()
    assert two.cluster(0).name == "brain"
    one.undo(None, "ana")
    two.sync()
    assert two.cluster(0).name is None
