"""service/pacs: frame policy, SR, settings, multipart parsing, the worker's failure handling (with stand-in
write-back targets: unit tests of our own logic) and the receiver over a real pynetdicom association."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest

from service.errors import BackendUnavailableError, DecodeError, FuscError
from service.pacs.__main__ import main
from service.pacs.frames import classify, frame_indices, majority
from service.pacs.queue import JobQueue, spool_name
from service.pacs.receiver import Receiver
from service.pacs.settings import PacsSettings
from service.pacs.sr import build_sr, read_sr, sr_uid
from service.pacs.watcher import parse_multipart
from service.pacs.worker import Worker, retryable
from service.pacs.writeback import PacsUnavailableError, SourceNotInPacsError, metadata_values
from service.pipeline import Pipeline, load_pipeline
from service.settings import Settings, SettingsError
from tests.pacs.phantoms import PHI_MARKS, make_instance
from tests.pacs.servers import cstore


@pytest.fixture(scope="module")
def pipeline(tiny_repo: Path) -> Pipeline:
    return load_pipeline(Settings(model_repository=tiny_repo))


def settings(tmp_path: Path, **kw: Any) -> PacsSettings:
    return PacsSettings(data_dir=tmp_path, writeback=(), **kw)


# ------------------------------------------------------------------------------------------ frame policy
def test_frame_indices() -> None:
    assert frame_indices(1, "middle", 10, 16) == [0]
    assert frame_indices(5, "middle", 10, 16) == [2]
    assert frame_indices(4, "middle", 10, 16) == [2]  # n // 2, as decode_image picks it
    assert frame_indices(25, "every_nth", 10, 16) == [0, 10, 20]
    assert frame_indices(100, "every_nth", 3, 4) == [0, 3, 6, 9]
    assert frame_indices(1, "every_nth", 3, 4) == [0]


def test_majority_vote_and_its_tie_breaks() -> None:
    probs = np.array([[0.6, 0.4, 0.0], [0.1, 0.9, 0.0], [0.7, 0.3, 0.0]])
    assert majority(probs) == (0, 2, {0: 2, 1: 1})  # two votes for 0; frame 2 is its surest
    tie = np.array([[0.5, 0.4, 0.1], [0.2, 0.8, 0.0]])
    assert majority(tie)[0] == 1  # one vote each: the larger summed probability (1.2 against 0.7)
    even = np.array([[0.6, 0.4], [0.4, 0.6]])
    assert majority(even)[0] == 0  # equal votes and sums: the lower id


def test_classify_middle_and_every_nth_agree_on_a_single_frame(pipeline: Pipeline) -> None:
    data = make_instance("us", 1).data
    middle = classify(pipeline, data, 1, policy="middle", step=10, limit=16)
    nth = classify(pipeline, data, 1, policy="every_nth", step=10, limit=16)
    for key in ("cluster", "confidence", "view", "ood", "model_version"):
        assert middle[key] == nth[key], key
    assert middle["frames"] == [0] and middle["votes"] is None and nth["votes"] == {str(nth["cluster"]): 1}


def test_classify_every_nth_votes_over_the_frames(pipeline: Pipeline) -> None:
    inst = make_instance("us_mf", 2)  # 5 frames
    result = classify(pipeline, inst.data, 5, policy="every_nth", step=2, limit=16)
    assert result["frames"] == [0, 2, 4] and sum(result["votes"].values()) == 3
    assert result["votes"][str(result["cluster"])] == max(result["votes"].values())
    middle = classify(pipeline, inst.data, 5, policy="middle", step=2, limit=16)
    assert middle["frames"] == [2] and middle["n_frames"] == 5


@pytest.mark.parametrize("kind,code", [("corrupt", "corrupt_image"), ("no_pixels", "dicom_no_pixel_data")])
def test_classify_raises_the_instances_own_code(pipeline: Pipeline, kind: str, code: str) -> None:
    for policy in ("middle", "every_nth"):
        with pytest.raises(FuscError) as info:
            classify(pipeline, make_instance(kind, 3).data, 1, policy=policy, step=1, limit=4)
        assert info.value.code == code
        assert not retryable(info.value)
        assert not any(mark in info.value.message for mark in PHI_MARKS)


# -------------------------------------------------------------------------------------------------- SR
def test_sr_references_its_source_and_round_trips_through_highdicom() -> None:
    source = make_instance("us_mf", 4).dataset
    result = {
        "cluster": 3,
        "view": "femur",
        "view_reason": None,
        "confidence": 0.8125,
        "ood": False,
        "ood_score": 0.5,
        "model_version": "m-1",
        "frames": [2],
        "n_frames": 5,
    }
    sr = build_sr(source, result)
    buffer = io.BytesIO()
    sr.save_as(buffer)
    document = hd.sr.srread(io.BytesIO(buffer.getvalue()))
    assert isinstance(document, hd.sr.ComprehensiveSR)
    back = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    fields = read_sr(back)
    assert fields == {
        "references": {source.SOPInstanceUID},
        "view": "femur",
        "cluster": 3,
        "confidence": 0.8125,
        "ood": False,
        "model_version": "m-1",
    }
    # Same study and patient as the source; the multi-frame reference names frame 3 (1-based).
    assert back.StudyInstanceUID == source.StudyInstanceUID and back.PatientID == source.PatientID
    image = back.ContentSequence[0].ContentSequence[0]
    assert image.ReferencedSOPSequence[0].ReferencedFrameNumber == 3
    # Deterministic: the same source and model give the same SR (a PACS keeps it once); another model not.
    assert (
        back.SOPInstanceUID == sr_uid(source.SOPInstanceUID, "m-1") == build_sr(source, result).SOPInstanceUID
    )
    assert sr_uid(source.SOPInstanceUID, "m-2") != back.SOPInstanceUID


def test_sr_of_a_withheld_view_says_why() -> None:
    source = make_instance("us", 5).dataset
    result = {
        "cluster": 1,
        "view": None,
        "view_reason": "out_of_distribution",
        "confidence": 0.4,
        "ood": True,
    }
    sr = build_sr(source, {**result, "ood_score": 0.1, "model_version": "m", "frames": [0], "n_frames": 1})
    fields = read_sr(sr)
    assert fields["view"] is None and fields["ood"] is True
    reason = sr.ContentSequence[0].ContentSequence[1]
    assert reason.TextValue == "out_of_distribution"


def test_metadata_values_are_strings_orthanc_can_store() -> None:
    values = metadata_values(
        {"cluster": 2, "view": None, "confidence": 0.5, "ood": None, "model_version": "v", "frames": [0]}
    )
    assert values["FuscCluster"] == "2" and values["FuscView"] == "" and values["FuscOod"] == ""
    assert values["FuscConfidence"] == "0.500000" and json.loads(values["FuscResult"])["cluster"] == 2


# ------------------------------------------------------------------------------------------- settings
def test_settings_from_env_and_their_checks() -> None:
    s = PacsSettings.from_env(
        {
            "FUSC_PACS_ALLOWED_CALLING_AETS": "US1, US2",
            "FUSC_PACS_WRITEBACK": "sr",
            "FUSC_PACS_SR_STORE": "cstore",
            "FUSC_PACS_FRAME_POLICY": "every_nth",
            "FUSC_OTHER": "ignored",
        }
    )
    assert (
        s.allowed_calling_aets == ("US1", "US2") and s.writeback == ("sr",) and s.frame_policy == "every_nth"
    )
    with pytest.raises(SettingsError, match="FUSC_PACS_WACTH"):
        PacsSettings.from_env({"FUSC_PACS_WACTH": "qido"})  # a typo is an error, not a silent default
    with pytest.raises(SettingsError, match="orthanc_url"):
        PacsSettings.from_env({"FUSC_PACS_WRITEBACK": "metadata"})
    with pytest.raises(SettingsError, match="AE title"):
        PacsSettings.from_env({"FUSC_PACS_AE_TITLE": "A_TITLE_LONGER_THAN_16", "FUSC_PACS_WRITEBACK": ""})
    with pytest.raises(SettingsError, match="dicomweb_url"):
        PacsSettings.from_env({"FUSC_PACS_WATCH": "qido", "FUSC_PACS_WRITEBACK": ""})


def test_parse_multipart() -> None:
    body = (
        b"--b1\r\nContent-Type: application/dicom\r\n\r\nPART1\r\n"
        b"--b1\r\nContent-Type: x\r\n\r\nP2\r\n--b1--\r\n"
    )
    assert parse_multipart('multipart/related; type="application/dicom"; boundary=b1', body) == [
        b"PART1",
        b"P2",
    ]
    assert parse_multipart('multipart/related; boundary="b1"', body) == [b"PART1", b"P2"]
    with pytest.raises(PacsUnavailableError):
        parse_multipart("application/dicom", body)


# --------------------------------------------------------------------------------------------- worker
class Target:
    """A write-back target that fails ``failures`` times with ``exc``, then records what it got."""

    def __init__(self, form: str, failures: int = 0, exc: FuscError | None = None) -> None:
        self.form, self.failures, self.exc = form, failures, exc
        self.calls: list[tuple[str, dict]] = []

    def write(self, uid: str, result: dict, source: Any) -> None:
        if self.failures:
            self.failures -= 1
            assert self.exc is not None
            raise self.exc
        assert source is not None and source.SOPInstanceUID == uid
        self.calls.append((uid, result))


def test_retryable_split() -> None:
    assert retryable(PacsUnavailableError("x")) and retryable(SourceNotInPacsError("x"))
    assert retryable(BackendUnavailableError("x")) and retryable(FuscError("bug"))
    assert not retryable(DecodeError("x")) and not retryable(FuscError("x", code="preprocess_failed"))


def test_worker_retries_a_failing_writeback_without_redoing_what_succeeded(
    tmp_path: Path, pipeline: Pipeline
) -> None:
    s = settings(tmp_path, backoff_base_s=0.001, backoff_max_s=0.001, max_attempts=5)
    queue = JobQueue(s.queue_path, s.spool_dir).open()
    inst = make_instance("us_jpeg", 6)
    queue.enqueue(inst.sop_instance_uid, inst.sop_class_uid, "cstore", inst.data)
    metadata = Target("metadata")
    sr = Target("sr", failures=2, exc=PacsUnavailableError("down"))
    worker = Worker(s, queue, pipeline, [metadata, sr])
    outcomes = []
    while (job := queue.claim(now=(queue.next_due() or 0) + 1)) is not None:
        outcomes.append(worker.handle(job))
    assert outcomes == ["queued", "queued", "done"]
    assert len(metadata.calls) == 1 and len(sr.calls) == 1  # metadata written once, not on every retry
    assert metadata.calls[0][1] == sr.calls[0][1] == queue.result(inst.sop_instance_uid)
    (job,) = queue.jobs()
    assert job["state"] == "done" and job["attempts"] == 3
    assert not any(s.spool_dir.iterdir())
    queue.close()


def test_worker_dead_letters_bad_instances_and_spent_retries(tmp_path: Path, pipeline: Pipeline) -> None:
    s = settings(tmp_path, backoff_base_s=0.001, backoff_max_s=0.001, max_attempts=2)
    queue = JobQueue(s.queue_path, s.spool_dir).open()
    for kind in ("corrupt", "no_pixels", "us"):
        inst = make_instance(kind, 7)
        queue.enqueue(inst.sop_instance_uid, inst.sop_class_uid, "cstore", inst.data)
    worker = Worker(s, queue, pipeline, [Target("sr", failures=10, exc=PacsUnavailableError("down"))])
    while (job := queue.claim(now=(queue.next_due() or 0) + 1)) is not None:
        worker.handle(job)
    dead = {j["error_code"]: j["attempts"] for j in queue.jobs("dead")}
    # The instance's own faults on the first attempt; the PACS's after max_attempts.
    assert dead == {"corrupt_image": 1, "dicom_no_pixel_data": 1, "pacs_unavailable": 2}
    # The image's result was kept: a requeue after the PACS is back does not run the model again.
    assert queue.requeue_dead() == 1
    queue.close()


# -------------------------------------------------------------------------------------------- receiver
def test_receiver_queues_ultrasound_ignores_the_rest_and_refuses_strangers(tmp_path: Path) -> None:
    s = settings(tmp_path, host="127.0.0.1", port=0, allowed_calling_aets=("US_SCANNER",))
    queue = JobQueue(s.queue_path, s.spool_dir).open()
    receiver = Receiver(s, queue)
    port = receiver.start()
    try:
        instances = [make_instance(kind, 8) for kind in ("us", "us_mf_jpeg", "sc", "pdf")]
        assert set(cstore(instances, port).values()) == {0x0000}
        assert set(cstore(instances[:1], port).values()) == {0x0000}  # again: a duplicate, still success
        assert set(cstore(instances[:1], port, calling="STRANGER").values()) == {None}
        jobs = queue.jobs()
        assert sorted(j["sop_instance_uid"] for j in jobs) == sorted(
            i.sop_instance_uid for i in instances[:3]
        )
        # The spool holds the instance as sent (its pixel data and transfer syntax untouched).
        spooled = pydicom.dcmread(next(s.spool_dir.glob("*.dcm")))
        assert spooled.SOPInstanceUID in {i.sop_instance_uid for i in instances}
        jpeg = next(i for i in instances if i.kind == "us_mf_jpeg")
        kept = pydicom.dcmread(s.spool_dir / spool_name(jpeg.sop_instance_uid))
        assert kept.file_meta.TransferSyntaxUID == jpeg.dataset.file_meta.TransferSyntaxUID
        assert kept.PixelData == jpeg.dataset.PixelData
    finally:
        receiver.stop()
        queue.close()


# --------------------------------------------------------------------------------------------- command
def test_status_dead_and_requeue_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    s = settings(tmp_path)
    queue = JobQueue(s.queue_path, s.spool_dir).open()
    for uid in ("1.5.1", "1.5.2"):
        queue.enqueue(uid, "1.2.840.10008.5.1.4.1.1.6.1", "cstore", b"x")
    job = queue.claim()
    assert job is not None
    queue.retry(job, "pacs_unavailable", max_attempts=1, base_s=1, max_s=1)
    queue.close()
    monkeypatch.setenv("FUSC_PACS_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("FUSC_PACS_WRITEBACK", "")

    assert main(["status"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["jobs"] == {"queued": 1, "running": 0, "done": 0, "dead": 1} and "pending" not in status
    assert main(["dead"]) == 0
    (dead,) = json.loads(capsys.readouterr().out)["dead"]
    assert dead["error_code"] == "pacs_unavailable" and "sop_instance_uid" not in dead
    assert main(["dead", "--uids"]) == 0
    assert json.loads(capsys.readouterr().out)["dead"][0]["sop_instance_uid"] == "1.5.1"
    assert main(["requeue-dead"]) == 0
    assert json.loads(capsys.readouterr().out) == {"requeued": 1}
    monkeypatch.setenv("FUSC_PACS_WACTH", "x")
    assert main(["status"]) == 2
    assert "invalid_settings" in capsys.readouterr().err
