"""The job worker: take a job, run the instance through the pipeline once, write the result back.

``handle`` is one attempt. The result is stored before any write-back and each write-back form is recorded
when it succeeds, so an attempt after a failure or a crash does only what is left. Failures split in two:

* the instance is at fault (it does not decode, has no pixel data, cannot be cleaned; the model raises on
  it): the job is dead at once with the error's stable code; retrying would fail the same way;
* the world is at fault (the PACS or the inference backend does not answer, a bug): the job is retried
  after an exponential backoff, and dead with that code once ``max_attempts`` are spent.

Log lines name the job by its queue id and the failure by its code: never a UID or a header value.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from typing import Protocol

from pydicom.dataset import Dataset

from service.errors import BackendUnavailableError, DecodeError, FuscError
from service.pacs import metrics
from service.pacs.dicom import number_of_frames, read_header
from service.pacs.frames import classify
from service.pacs.queue import Job, JobQueue
from service.pacs.settings import PacsSettings
from service.pacs.writeback import PacsUnavailableError
from service.pipeline import Pipeline

logger = logging.getLogger("fusc.pacs.worker")


class Writer(Protocol):
    form: str

    def write(self, sop_instance_uid: str, result: dict, source: Dataset | None) -> None: ...


class SpoolMissingError(FuscError):
    code = "pacs_spool_missing"


def retryable(exc: FuscError) -> bool:
    """True when the failure is not the instance's own (see the module docstring)."""
    if isinstance(exc, (PacsUnavailableError, BackendUnavailableError)):
        return True
    if isinstance(exc, DecodeError) or exc.code in (
        "preprocess_failed",
        "model_failed",
        "pacs_spool_missing",
    ):
        return False
    return True


def _where(exc: BaseException) -> str:
    """file:line of the innermost frame: enough to find a bug, without the message (which may quote data)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"


class Worker:
    def __init__(
        self, settings: PacsSettings, queue: JobQueue, pipeline: Pipeline, writers: list[Writer]
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.pipeline = pipeline
        self.writers = writers

    def handle(self, job: Job) -> str:
        """One attempt at ``job``; returns the state it ends in (done, queued, dead)."""
        s = self.settings
        try:
            self._attempt(job)
        except FuscError as exc:
            return self._failed(job, exc)
        except Exception as exc:
            logger.error("job %d: %s at %s", job.id, type(exc).__name__, _where(exc))
            return self._failed(job, FuscError("an unexpected error; see the log", code="internal_error"))
        self.queue.complete(job)
        metrics.PROCESSED.inc()
        metrics.JOB_LATENCY.observe(max(0.0, time.time() - job.received_at))
        logger.debug("job %d done (attempt %d/%d)", job.id, job.attempts, s.max_attempts)
        return "done"

    def _attempt(self, job: Job) -> None:
        uid = job.sop_instance_uid
        header: Dataset | None = None
        data: bytes | None = None
        if job.spool is not None and job.spool.exists():
            data = job.spool.read_bytes()
        result = self.queue.result(uid)
        if result is None:
            if data is None:
                raise SpoolMissingError("the queued instance is no longer in the spool")
            header = read_header(data)
            result = classify(
                self.pipeline,
                data,
                number_of_frames(header),
                policy=self.settings.frame_policy,
                step=self.settings.frame_step,
                limit=self.settings.frame_max,
            )
            result = self.queue.save_result(uid, result)
        done = self.queue.written(uid)
        for writer in self.writers:
            if writer.form in done:
                continue
            if header is None and data is not None:
                header = read_header(data)
            writer.write(uid, result, header)
            self.queue.mark_written(uid, writer.form)
            metrics.WRITEBACKS.labels(form=writer.form).inc()

    def _failed(self, job: Job, exc: FuscError) -> str:
        s = self.settings
        if not retryable(exc):
            self.queue.dead(job, exc.code)
            metrics.FAILED.labels(code=exc.code).inc()
            logger.warning("job %d dead-lettered: %s", job.id, exc.code)
            return "dead"
        if self.queue.retry(
            job, exc.code, max_attempts=s.max_attempts, base_s=s.backoff_base_s, max_s=s.backoff_max_s
        ):
            metrics.RETRIED.labels(code=exc.code).inc()
            logger.info(
                "job %d attempt %d/%d failed (%s); retrying", job.id, job.attempts, s.max_attempts, exc.code
            )
            return "queued"
        metrics.FAILED.labels(code=exc.code).inc()
        logger.warning("job %d dead-lettered after %d attempts: %s", job.id, job.attempts, exc.code)
        return "dead"

    def run(self, stop: threading.Event) -> None:
        """Take jobs until ``stop``; sleep until the next one is due (or one is queued) when none is."""
        while not stop.is_set():
            try:
                job = self.queue.claim()
            except Exception as exc:  # the database is busy or gone: wait, do not spin
                logger.error("claiming a job raised %s", type(exc).__name__)
                stop.wait(self.settings.idle_poll_s)
                continue
            if job is not None:
                self.handle(job)
                continue
            due = self.queue.next_due()
            wait = (
                self.settings.idle_poll_s
                if due is None
                else min(self.settings.idle_poll_s, due - time.time())
            )
            if wait > 0:
                self.queue.wait(wait)
