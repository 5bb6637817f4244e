"""Prometheus metrics of the PACS worker (prefix ``fusc_pacs_``), served on its own ``/metrics``.

Labels carry sources, reasons, forms, stages and error codes only: never a UID, a name, an AE title of a
sender or anything read from a DICOM header. The queue's depth and the age of its oldest pending job are
read from the database at each scrape (:class:`QueueCollector`), so they are right after a restart too.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.pacs.queue import STATES, JobQueue

RECEIVED = Counter(
    "fusc_pacs_received_total",
    "Instances offered to the worker (C-STORE or DICOMweb), before any filtering.",
    ["source"],
)
QUEUED = Counter("fusc_pacs_queued_total", "Instances queued as new jobs.", ["source"])
DUPLICATES = Counter(
    "fusc_pacs_duplicates_total",
    "Instances offered again whose job already exists (answered success, not queued twice).",
    ["source"],
)
IGNORED = Counter(
    "fusc_pacs_ignored_total",
    "Instances accepted and not queued: a SOP class or modality that is not ultrasound.",
    ["source", "reason"],
)
REFUSED = Counter(
    "fusc_pacs_refused_total",
    "C-STORE requests answered with a failure status because the instance could not be queued durably.",
)
PROCESSED = Counter("fusc_pacs_processed_total", "Jobs done: result stored and every write-back made.")
FAILED = Counter("fusc_pacs_failed_total", "Jobs moved to the dead-letter state, by error code.", ["code"])
RETRIED = Counter(
    "fusc_pacs_retried_total", "Job attempts that failed and were rescheduled, by code.", ["code"]
)
WRITEBACKS = Counter("fusc_pacs_writebacks_total", "Write-backs made, by form (metadata, sr).", ["form"])
WATCHER_ERRORS = Counter(
    "fusc_pacs_watcher_errors_total", "DICOMweb polls that failed (the watcher backs off).", ["code"]
)
JOB_LATENCY = Histogram(
    "fusc_pacs_job_latency_seconds",
    "From receipt of an instance to its last write-back.",
    buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0),
)


class QueueCollector(Collector):
    """``fusc_pacs_queue_jobs{state}`` and ``fusc_pacs_oldest_job_age_seconds`` from the queue itself."""

    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Describing without collecting: registering must not touch the database.
        yield GaugeMetricFamily("fusc_pacs_queue_jobs", "Jobs in the queue, by state.", labels=["state"])
        yield GaugeMetricFamily(
            "fusc_pacs_oldest_job_age_seconds", "Age of the oldest queued or running job (0 when none)."
        )

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self.queue.stats()
        jobs = GaugeMetricFamily("fusc_pacs_queue_jobs", "Jobs in the queue, by state.", labels=["state"])
        for state in STATES:
            jobs.add_metric([state], stats.counts.get(state, 0))
        yield jobs
        yield GaugeMetricFamily(
            "fusc_pacs_oldest_job_age_seconds",
            "Age of the oldest queued or running job (0 when none).",
            value=stats.oldest_pending_age_s,
        )
