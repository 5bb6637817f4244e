"""The PACS path against a real Orthanc (Debian, with DICOMweb) and the real worker process, small and fast.

* C-STORE straight to the receiver and Orthanc's Lua routing (deploy/orthanc/fusc-routing.lua) into it;
  the SR stored back by C-STORE, the metadata by REST; a calling AE outside the allowed list is refused.
* The DICOMweb watcher on Orthanc's /changes, then an Orthanc outage during which instances are C-STOREd
  to the receiver, a SIGKILL of the worker with write-backs pending, a restart, Orthanc back: each image
  instance ends with exactly one result and one SR, retried with backoff, none lost, none doubled.
* The ``every_nth`` frame policy: the frames it looked at and its vote, against the same frames run here.

Both check the dead-letter codes of a corrupt instance and of one without pixel data, that a non-image
class is ignored and counted, and grep the worker's log, /metrics and the queue's error codes for the
phantom identity. tests/integration/test_pacs_scale.py runs the 200-instance version (slow).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from service.pipeline import load_pipeline
from service.settings import Settings
from tests.pacs.phantoms import MF_FRAMES, make_instance, mixed_set
from tests.pacs.servers import (
    Orthanc,
    WorkerProcess,
    assert_no_phi,
    check_results,
    cstore,
    metric_value,
)
from tests.service.conftest import build_tiny_repository

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_repository(tmp_path_factory.mktemp("pacs-model"))


@pytest.fixture
def stack(
    tmp_path: Path, repository: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[Orthanc, WorkerProcess]]:
    """An Orthanc and a worker wired to each other (not started: each test sets its own options)."""
    routing = bool(getattr(request, "param", False))
    worker = WorkerProcess(tmp_path, repository, env={})
    orthanc = Orthanc(tmp_path, receiver_port=worker.receiver_port, routing=routing)
    worker.env.update(
        {
            "FUSC_PACS_ORTHANC_URL": orthanc.url,
            "FUSC_PACS_DICOMWEB_URL": orthanc.dicomweb,
            "FUSC_PACS_PACS_AE_TITLE": "FUSCPACS",
            "FUSC_PACS_PACS_PORT": str(orthanc.dicom_port),
        }
    )
    try:
        yield orthanc, worker
    finally:
        worker.stop()
        orthanc.stop()


@pytest.mark.parametrize("stack", [True], indirect=True, ids=["lua-routing"])
def test_cstore_and_orthanc_routing_into_the_receiver(stack: tuple[Orthanc, WorkerProcess]) -> None:
    orthanc, worker = stack
    worker.env.update(
        {
            "FUSC_PACS_WRITEBACK": "metadata,sr",
            "FUSC_PACS_SR_STORE": "cstore",
            # The scanner, and Orthanc itself (its AET) forwarding by the Lua routing.
            "FUSC_PACS_ALLOWED_CALLING_AETS": "US_SCANNER,FUSCPACS",
        }
    )
    orthanc.start()
    worker.start()

    # Routed: stored into Orthanc by REST, forwarded to the receiver by the Lua script.
    routed = mixed_set(8, start=0)
    for inst in routed:
        orthanc.upload(inst.data)
    # Straight from the scanner: C-STORE to the receiver, and (as scanners send to the PACS too) to Orthanc
    # a moment later, which routes it once more: the queue must take it once.
    direct = mixed_set(8, start=100)
    statuses = cstore(direct, worker.receiver_port)
    assert set(statuses.values()) == {0x0000}
    for inst in direct:
        orthanc.upload(inst.data)
    # A caller outside FUSC_PACS_ALLOWED_CALLING_AETS is refused at association.
    assert set(cstore(direct[:1], worker.receiver_port, calling="INTRUDER").values()) == {None}

    everything = routed + direct
    worker.wait_settled(expected=len([i for i in everything if i.kind != "pdf"]), timeout_s=60)
    check_results(orthanc, worker, everything, {"metadata", "sr"})

    metrics = worker.metrics()
    images = len([i for i in everything if i.is_image])
    assert metric_value(metrics, "fusc_pacs_processed_total") == images
    assert metric_value(metrics, "fusc_pacs_failed_total", {"code": "corrupt_image"}) == 2
    assert metric_value(metrics, "fusc_pacs_failed_total", {"code": "dicom_no_pixel_data"}) == 2
    # The direct PDF: accepted, ignored, counted (the routed one never left Orthanc).
    assert metric_value(metrics, "fusc_pacs_ignored_total", {"source": "cstore", "reason": "sop_class"}) >= 1
    assert metric_value(metrics, "fusc_pacs_duplicates_total", {"source": "cstore"}) >= 6
    assert metric_value(metrics, "fusc_pacs_writebacks_total", {"form": "sr"}) == images
    assert metric_value(metrics, "fusc_pacs_queue_jobs", {"state": "done"}) == images
    assert metric_value(metrics, "fusc_pacs_oldest_job_age_seconds") == 0
    assert_no_phi(*worker.outputs())


def test_watcher_outage_and_sigkill_keep_exactly_one_result(stack: tuple[Orthanc, WorkerProcess]) -> None:
    orthanc, worker = stack
    worker.env.update(
        {
            "FUSC_PACS_WATCH": "orthanc-changes",
            "FUSC_PACS_WRITEBACK": "metadata,sr",
            "FUSC_PACS_SR_STORE": "stow",
        }
    )
    orthanc.start()
    first = mixed_set(8, start=200)
    for inst in first:
        orthanc.upload(inst.data)
    worker.start()
    worker.wait_settled(expected=7, timeout_s=60)  # the PDF is never queued

    # Orthanc goes down; the scanner keeps sending to the receiver, which queues without Orthanc.
    orthanc.stop(crash=True)
    second = mixed_set(6, start=300, odd=())
    assert set(cstore(second, worker.receiver_port).values()) == {0x0000}
    # Wait until the write-backs are failing and being retried: results stored, forms pending.
    queue = worker.queue()
    deadline = time.monotonic() + 30
    while (
        not all(queue.result(i.sop_instance_uid) for i in second)
        or "fusc_pacs_retried_total{" not in worker.metrics()
    ):
        assert time.monotonic() < deadline, "the second batch was not processed up to its write-back"
        time.sleep(0.2)
    queue.close()
    worker.kill()
    worker.start()  # Orthanc still down: the worker is ready anyway; jobs wait and back off
    time.sleep(2.0)
    before = worker.metrics()
    assert metric_value(before, "fusc_pacs_retried_total", {"code": "pacs_unavailable"}) >= 1
    assert metric_value(before, "fusc_pacs_watcher_errors_total", {"code": "pacs_unavailable"}) >= 1
    assert metric_value(before, "fusc_pacs_oldest_job_age_seconds") > 0

    orthanc.start()
    for inst in second:  # the scanner's copy for the PACS arrives once it is back
        orthanc.upload(inst.data)
    worker.wait_settled(expected=7 + len(second), timeout_s=90)
    check_results(orthanc, worker, first + second, {"metadata", "sr"})
    assert_no_phi(*worker.outputs())


def test_qido_watcher_finds_new_instances_by_study_date(stack: tuple[Orthanc, WorkerProcess]) -> None:
    """The PACS-neutral mode: QIDO-RS by StudyDate, WADO-RS, the SR by STOW-RS; the cursor survives a
    restart (a second run queues nothing twice)."""
    orthanc, worker = stack
    worker.env.update(
        {
            "FUSC_PACS_WATCH": "qido",
            "FUSC_PACS_QIDO_START_DATE": "20250101",
            "FUSC_PACS_WRITEBACK": "sr",
            "FUSC_PACS_SR_STORE": "stow",
            "FUSC_PACS_RECEIVER": "false",
        }
    )
    orthanc.start()
    instances = mixed_set(6, start=400, odd=("pdf",))
    for inst in instances:
        orthanc.upload(inst.data)
    worker.start()
    worker.wait_settled(expected=5, timeout_s=60)
    queue = worker.queue()
    assert queue.cursor("qido-study-date") == "20250102"
    queue.close()
    worker.stop()
    worker.start()
    time.sleep(1.5)  # a few polls over the same day
    counts = worker.wait_settled(expected=5, timeout_s=30)
    assert counts["done"] == 5 and sum(counts.values()) == 5
    assert metric_value(worker.metrics(), "fusc_pacs_duplicates_total", {"source": "dicomweb"}) >= 5
    check_results(orthanc, worker, instances, {"sr"})


def test_every_nth_frame_policy_votes_over_the_frames(
    stack: tuple[Orthanc, WorkerProcess], repository: Path
) -> None:
    """``FUSC_PACS_FRAME_POLICY=every_nth``: the worker looks at frames 0, N, 2N, ... of each instance and
    answers the cluster most of them fall in; the votes equal those of the same frames run here."""
    orthanc, worker = stack
    worker.env.update(
        {
            "FUSC_PACS_FRAME_POLICY": "every_nth",
            "FUSC_PACS_FRAME_STEP": "2",
            "FUSC_PACS_WRITEBACK": "sr",
            "FUSC_PACS_SR_STORE": "cstore",
            "FUSC_PACS_ALLOWED_CALLING_AETS": "US_SCANNER",
        }
    )
    orthanc.start()
    worker.start()
    instances = [make_instance(k, 300 + i) for i, k in enumerate(("us_mf", "us_mf_jpeg", "us_mf", "us"))]
    assert set(cstore(instances, worker.receiver_port).values()) == {0x0000}
    worker.wait_settled(expected=len(instances), timeout_s=60)
    jobs = check_results(orthanc, worker, instances, {"sr"})

    pipeline = load_pipeline(Settings(model_repository=repository))
    for inst in instances:
        result = jobs[inst.sop_instance_uid]["result"]
        n = MF_FRAMES.get(inst.kind, 1)
        assert (result["frame_policy"], result["n_frames"]) == ("every_nth", n)
        assert result["frames"] == list(range(0, n, 2))
        tensors = [pipeline.prepare(inst.data, frame_index=i).tensor for i in result["frames"]]
        winners = pipeline.infer(np.stack(tensors)).probs.argmax(axis=1)
        votes = Counter(str(int(c)) for c in winners)
        assert result["votes"] == dict(sorted(votes.items()))
        assert votes[str(result["cluster"])] == max(votes.values())
    assert_no_phi(*worker.outputs())
