"""The decision log: append-only, who/when, undo, durable across a reopen."""

from __future__ import annotations

import pytest

from service.review.decisions import DecisionError, DecisionLog


def test_decisions_are_kept_with_who_and_when_and_survive_a_reopen(tmp_path):
    log = DecisionLog(tmp_path / "d.sqlite")
    a = log.add("name", {"cluster": 1, "view": "brain"}, "ana")
    b = log.add("merge", {"source": 2, "target": 1}, "ben")
    log.close()
    again = DecisionLog(tmp_path / "d.sqlite")
    got = again.all()
    assert [(d.id, d.kind, d.who, d.payload) for d in got] == [
        (a.id, "name", "ana", {"cluster": 1, "view": "brain"}),
        (b.id, "merge", "ben", {"source": 2, "target": 1}),
    ]
    assert got[0].at <= got[1].at and got[0].at.tzinfo is not None


def test_undo_takes_a_decision_back_and_is_itself_recorded(tmp_path):
    log = DecisionLog(tmp_path / "d.sqlite")
    a = log.add("name", {"cluster": 1, "view": "brain"}, "ana")
    b = log.add("accept", {"cluster": 1}, "ana")
    assert log.last_standing().id == b.id
    u = log.undo(b.id, "ben")
    assert u.kind == "undo" and u.who == "ben"
    assert [d.id for d in log.standing()] == [a.id]
    assert log.all()[1].undone_by == u.id
    assert log.last_standing().id == a.id  # the undo itself is not what "undo last" takes back
    with pytest.raises(DecisionError, match="already undone"):
        log.undo(b.id, "ben")
    with pytest.raises(DecisionError, match="not undone"):
        log.undo(u.id, "ben")
    with pytest.raises(DecisionError, match="no decision"):
        log.undo(999, "ben")


def test_unknown_kinds_are_refused(tmp_path):
    log = DecisionLog(tmp_path / "d.sqlite")
    with pytest.raises(DecisionError):
        log.add("delete_everything", {}, "x")
    with pytest.raises(DecisionError):
        log.add("undo", {"decision": 1}, "x")
    assert log.count() == 0
