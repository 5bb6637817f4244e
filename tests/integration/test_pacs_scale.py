"""The PACS path at the issue's scale, against a real Orthanc and the real worker (slow: about 2 minutes).

1. 200 phantom instances (single- and multi-frame, raw and JPEG, Secondary Capture, six Encapsulated PDFs,
   a corrupt one and one without pixel data) stored into Orthanc; the worker's DICOMweb watcher finds them.
   The worker is SIGKILLed in the middle and restarted; later Orthanc is killed in the middle and stays
   down for 30 s (a crash: a graceful stop lets Orthanc serve for seconds more).
2. 200 more C-STOREd straight to the receiver, the worker SIGKILLed in the middle of the transfer; what the
   sender could not deliver it sends again after the restart, as a scanner's queue would.

Each ends with exactly one result, one SR and the metadata per image instance, the two bad ones dead with
their codes, and no phantom identity in the worker's log, /metrics or the queue's error codes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pacs.phantoms import mixed_set
from tests.pacs.servers import Orthanc, WorkerProcess, assert_no_phi, check_results, cstore, metric_value
from tests.service.conftest import build_tiny_repository

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N = 200
ODD = ("pdf",) * 6 + ("corrupt", "no_pixels")
OUTAGE_S = 30.0


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_repository(tmp_path_factory.mktemp("pacs-model"))


@pytest.fixture
def stack(tmp_path: Path, repository: Path) -> Iterator[tuple[Orthanc, WorkerProcess]]:
    worker = WorkerProcess(tmp_path, repository, env={})
    orthanc = Orthanc(tmp_path, receiver_port=worker.receiver_port)
    worker.env.update(
        {
            "FUSC_PACS_ORTHANC_URL": orthanc.url,
            "FUSC_PACS_DICOMWEB_URL": orthanc.dicomweb,
            "FUSC_PACS_PACS_AE_TITLE": "FUSCPACS",
            "FUSC_PACS_PACS_PORT": str(orthanc.dicom_port),
            "FUSC_PACS_WRITEBACK": "metadata,sr",
            # One job thread: slow enough that "in the middle" is a moment the test can catch.
            "FUSC_PACS_WORKERS": "1",
        }
    )
    try:
        yield orthanc, worker
    finally:
        worker.stop()
        orthanc.stop()


def done(worker: WorkerProcess) -> int:
    queue = worker.queue()
    try:
        return queue.stats().counts["done"]
    finally:
        queue.close()


def wait_done(worker: WorkerProcess, at_least: int, timeout_s: float = 120) -> int:
    deadline = time.monotonic() + timeout_s
    while (n := done(worker)) < at_least:
        assert time.monotonic() < deadline, f"only {n} jobs done"
        time.sleep(0.05)
    return n


def test_200_stored_into_orthanc_survive_sigkill_and_a_30s_outage(
    stack: tuple[Orthanc, WorkerProcess],
) -> None:
    orthanc, worker = stack
    worker.env.update({"FUSC_PACS_WATCH": "orthanc-changes", "FUSC_PACS_SR_STORE": "stow"})
    orthanc.start()
    instances = mixed_set(N, start=1000, odd=ODD)
    for inst in instances:
        orthanc.upload(inst.data)
    queued = N - ODD.count("pdf")
    images = len([i for i in instances if i.is_image])

    worker.start()
    killed_at = wait_done(worker, 40)
    worker.kill()
    assert killed_at < images, "the run finished before the kill"
    worker.start()

    stopped_at = wait_done(worker, killed_at + 40)
    orthanc.stop(crash=True)
    assert stopped_at < images, "the run finished before the outage"
    time.sleep(OUTAGE_S)
    during = worker.metrics()
    assert done(worker) < images
    assert metric_value(during, "fusc_pacs_retried_total", {"code": "pacs_unavailable"}) >= 1
    orthanc.start()

    counts = worker.wait_settled(expected=queued, timeout_s=240)
    assert counts == {"queued": 0, "running": 0, "done": images, "dead": 2}
    check_results(orthanc, worker, instances, {"metadata", "sr"})
    metrics = worker.metrics()
    assert (
        metric_value(metrics, "fusc_pacs_ignored_total", {"source": "dicomweb", "reason": "sop_class"}) >= 1
    )
    assert_no_phi(*worker.outputs())


def test_200_cstored_to_the_receiver_survive_sigkill(stack: tuple[Orthanc, WorkerProcess]) -> None:
    orthanc, worker = stack
    worker.env.update({"FUSC_PACS_SR_STORE": "cstore"})
    orthanc.start()
    instances = mixed_set(N, start=2000, odd=ODD)
    # The scanner sends each study to the PACS too (so the metadata has an instance to sit on).
    for inst in instances:
        orthanc.upload(inst.data)
    worker.start()
    first, rest = instances[:120], instances[120:]
    statuses = cstore(first, worker.receiver_port)
    assert set(statuses.values()) == {0x0000}
    wait_done(worker, 30)
    worker.kill()  # mid-run: some done, some queued, some running
    statuses = cstore(rest, worker.receiver_port)  # the receiver is down: nothing is acknowledged
    assert set(statuses.values()) == {None}
    worker.start()
    statuses = cstore(rest, worker.receiver_port)  # the scanner's retry
    assert set(statuses.values()) == {0x0000}
    # And a scanner that resends everything changes nothing.
    assert set(cstore(first[:20], worker.receiver_port).values()) == {0x0000}

    queued = N - ODD.count("pdf")
    images = len([i for i in instances if i.is_image])
    counts = worker.wait_settled(expected=queued, timeout_s=240)
    assert counts == {"queued": 0, "running": 0, "done": images, "dead": 2}
    check_results(orthanc, worker, instances, {"metadata", "sr"})
    metrics = worker.metrics()
    resent = len([i for i in first[:20] if i.kind != "pdf"])
    assert metric_value(metrics, "fusc_pacs_duplicates_total", {"source": "cstore"}) >= resent
    assert metric_value(metrics, "fusc_pacs_ignored_total", {"source": "cstore", "reason": "sop_class"}) >= 1
    assert_no_phi(*worker.outputs())
