"""Prometheus metrics of the data path (prefix ``fusc_``), exported by BentoML's ``/metrics``.

Labels carry only stage names, cluster ids, error codes, endpoints and status codes: never anything that
comes from a patient or from the caller (no file names, no DICOM tags), so a label cannot leak identity.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

STAGES = ("decode", "clean", "embed", "assign")

# Stage latencies span ~0.1 ms (assign) to seconds (a big DICOM decode, a cold model).
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)

STAGE_LATENCY = Histogram(
    "fusc_stage_latency_seconds",
    "Latency of one data-path stage; decode/clean per image, embed/assign per model batch.",
    ["stage"],
    buckets=_LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "fusc_batch_size",
    "Number of images in one model call (after batching across requests).",
    buckets=_BATCH_BUCKETS,
)
CLUSTER_ASSIGNMENTS = Counter(
    "fusc_cluster_assignments_total",
    "Images assigned to each cluster id (drift shows as a change of this distribution).",
    ["cluster"],
)
CONFIDENCE = Histogram(
    "fusc_confidence",
    "Max cluster probability of each assigned image.",
    buckets=_CONFIDENCE_BUCKETS,
)
OOD = Counter(
    "fusc_ood_total",
    "Images flagged out of distribution (OOD score below the model card's threshold).",
)
VIEW_WITHHELD = Counter(
    "fusc_view_withheld_total",
    "Answers without a view name, by reason (out_of_distribution, cluster_unnamed, low_confidence).",
    ["reason"],
)
ERRORS = Counter("fusc_errors_total", "Failures by stable error code.", ["code"])
REQUESTS = Counter(
    "fusc_requests_total", "HTTP requests by endpoint and status code.", ["endpoint", "status"]
)
# "liveall": under BentoML's multiprocess collector only live workers report the model they serve.
MODEL_INFO = Gauge(
    "fusc_model_info",
    "The model version this process serves (value 1).",
    ["name", "version", "backend"],
    multiprocess_mode="liveall",
)

# Admission and batching (service/batching.py). "livesum": one value per live worker, summed.
INFLIGHT_REQUESTS = Gauge(
    "fusc_inflight_requests",
    "Requests admitted and not yet answered.",
    multiprocess_mode="livesum",
)
INFLIGHT_BYTES = Gauge(
    "fusc_inflight_bytes",
    "Upload bytes held by admitted requests.",
    multiprocess_mode="livesum",
)
INFLIGHT_IMAGES = Gauge(
    "fusc_inflight_images",
    "Images admitted and not yet answered (decoding, cleaning, queued for or in a model batch).",
    multiprocess_mode="livesum",
)
QUEUE_WAIT = Histogram(
    "fusc_queue_wait_seconds",
    "Time an image waited between its preprocessing and the start of its model batch.",
    buckets=_LATENCY_BUCKETS,
)
# Drift (service/drift.py): the mix of the last N answers against the training mix of the model card.
CLUSTER_MIX_DIVERGENCE = Gauge(
    "fusc_cluster_mix_divergence",
    "Jensen-Shannon divergence (base 2, 0..1) of the cluster mix of the last N answers from training.",
    multiprocess_mode="livemax",
)
CLUSTER_MIX_ANSWERS = Gauge(
    "fusc_cluster_mix_answers",
    "Answers in the window behind fusc_cluster_mix_divergence (N once the window is full).",
    multiprocess_mode="livemax",
)


def observe_stage(stage: str, seconds: float) -> None:
    STAGE_LATENCY.labels(stage=stage).observe(seconds)


def count_error(code: str) -> None:
    ERRORS.labels(code=code).inc()


def count_request(endpoint: str, status: int) -> None:
    REQUESTS.labels(endpoint=endpoint, status=str(status)).inc()


def record_assignment(cluster: int, confidence: float) -> None:
    CLUSTER_ASSIGNMENTS.labels(cluster=str(cluster)).inc()
    CONFIDENCE.observe(confidence)


def count_view_withheld(reason: str) -> None:
    VIEW_WITHHELD.labels(reason=reason).inc()


def set_model_info(name: str, version: str, backend: str) -> None:
    MODEL_INFO.labels(name=name, version=version, backend=backend).set(1)
