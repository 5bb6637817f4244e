"""service/pacs/queue.py: the durable queue's states, idempotence, backoff arithmetic and crash recovery."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from service.pacs.queue import JobQueue, QueueLockedError, backoff_delay, spool_name


def open_queue(tmp_path: Path, exclusive: bool = True) -> JobQueue:
    return JobQueue(tmp_path / "queue.sqlite3", tmp_path / "spool").open(exclusive=exclusive)


def test_backoff_doubles_up_to_the_cap_with_jitter_in_the_upper_half() -> None:
    assert backoff_delay(1, 2.0, 300.0, rand=0.999999) == pytest.approx(2.0, rel=1e-5)
    assert [backoff_delay(a, 2.0, 300.0, rand=0.0) for a in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff_delay(9, 2.0, 300.0, rand=0.0) == 150.0  # 2 * 2**8 = 512, capped at 300, halved
    assert backoff_delay(10_000, 2.0, 300.0, rand=0.5) == 225.0  # no overflow for huge attempt counts
    with pytest.raises(ValueError):
        backoff_delay(0, 1.0, 1.0)


def test_enqueue_is_durable_and_idempotent(tmp_path: Path) -> None:
    q = open_queue(tmp_path)
    assert q.enqueue("1.2.3", "1.2.840.10008.5.1.4.1.1.6.1", "cstore", b"DICM-bytes") is True
    assert q.enqueue("1.2.3", "1.2.840.10008.5.1.4.1.1.6.1", "cstore", b"other") is False
    assert (tmp_path / "spool" / spool_name("1.2.3")).read_bytes() == b"DICM-bytes"
    # Another connection (another process) sees the committed job.
    db = sqlite3.connect(tmp_path / "queue.sqlite3")
    assert db.execute("SELECT sop_instance_uid, state FROM jobs").fetchall() == [("1.2.3", "queued")]
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    q.close()


def test_claim_takes_due_jobs_in_order_and_counts_attempts(tmp_path: Path) -> None:
    q = open_queue(tmp_path)
    for uid in ("1.1", "1.2", "1.3"):
        q.enqueue(uid, "c", "cstore", b"x")
    first = q.claim()
    assert first is not None and first.sop_instance_uid == "1.1" and first.attempts == 1
    assert first.spool is not None and first.spool.exists()
    assert q.retry(first, "pacs_unavailable", max_attempts=3, base_s=100.0, max_s=100.0) is True
    # 1.1 is not due for another 50-100 s: the next claims take 1.2 and 1.3, then nothing.
    assert [q.claim().sop_instance_uid for _ in range(2)] == ["1.2", "1.3"]  # type: ignore[union-attr]
    assert q.claim() is None
    again = q.claim(now=q.next_due())
    assert again is not None and again.sop_instance_uid == "1.1" and again.attempts == 2
    q.close()


def test_retries_end_in_the_dead_letter_state_keeping_the_instance(tmp_path: Path) -> None:
    q = open_queue(tmp_path)
    q.enqueue("9.9", "c", "dicomweb", b"x")
    states = []
    for _ in range(3):
        job = q.claim(now=q.next_due())
        assert job is not None
        states.append(q.retry(job, "pacs_unavailable", max_attempts=3, base_s=0.01, max_s=0.01))
    assert states == [True, True, False]
    (dead,) = q.jobs("dead")
    assert dead["error_code"] == "pacs_unavailable" and dead["attempts"] == 3
    assert (tmp_path / "spool" / spool_name("9.9")).exists()  # kept: requeue_dead can try again
    assert q.requeue_dead() == 1
    job = q.claim()
    assert job is not None and job.attempts == 1
    q.close()


def test_permanent_failure_is_dead_at_once_and_drops_the_instance(tmp_path: Path) -> None:
    q = open_queue(tmp_path)
    q.enqueue("7.7", "c", "cstore", b"x")
    job = q.claim()
    assert job is not None
    q.dead(job, "corrupt_image")
    assert [(j["state"], j["error_code"]) for j in q.jobs()] == [("dead", "corrupt_image")]
    assert not any((tmp_path / "spool").iterdir())
    assert q.requeue_dead() == 0  # nothing to retry with
    q.close()


def test_results_and_writebacks_are_kept_once(tmp_path: Path) -> None:
    q = open_queue(tmp_path)
    assert q.save_result("5.5", {"cluster": 1}) == {"cluster": 1}
    assert q.save_result("5.5", {"cluster": 2}) == {"cluster": 1}  # the first result wins
    q.mark_written("5.5", "sr")
    q.mark_written("5.5", "sr")
    assert q.written("5.5") == {"sr"}
    q.close()


def test_a_second_owner_is_refused_and_recovery_requeues_running_jobs(tmp_path: Path) -> None:
    q = open_queue(tmp_path)
    q.enqueue("3.3", "c", "cstore", b"x")
    assert q.claim() is not None
    with pytest.raises(QueueLockedError):
        open_queue(tmp_path)
    # A reader (python -m service.pacs status) does not need the lock.
    reader = open_queue(tmp_path, exclusive=False)
    assert reader.stats().counts["running"] == 1
    reader.close()
    q.close()  # the owner dies with its job running, and leaves an orphan spool file behind
    (tmp_path / "spool" / "orphan.dcm").write_bytes(b"x")
    q2 = open_queue(tmp_path)
    assert q2.stats().counts == {"queued": 1, "running": 0, "done": 0, "dead": 0}
    assert not (tmp_path / "spool" / "orphan.dcm").exists()
    job = q2.claim()
    assert job is not None and job.attempts == 2
    q2.complete(job)
    assert q2.stats().counts["done"] == 1 and q2.stats().oldest_pending_age_s == 0.0
    assert not any((tmp_path / "spool").iterdir())
    q2.close()


def test_concurrent_claims_never_hand_out_a_job_twice(tmp_path: Path) -> None:
    q = open_queue(tmp_path)
    for i in range(60):
        q.enqueue(f"2.{i}", "c", "cstore", b"x")
    taken: list[str] = []
    lock = threading.Lock()

    def take() -> None:
        while (job := q.claim()) is not None:
            with lock:
                taken.append(job.sop_instance_uid)
            q.complete(job)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(taken) == sorted(f"2.{i}" for i in range(60))
    assert q.stats().counts["done"] == 60
    q.close()


def test_cursor_round_trip(tmp_path: Path) -> None:
    q = open_queue(tmp_path)
    assert q.cursor("orthanc-changes") is None
    q.set_cursor("orthanc-changes", "12")
    q.set_cursor("orthanc-changes", "40")
    assert q.cursor("orthanc-changes") == "40"
    q.close()
