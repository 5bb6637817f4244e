"""Service settings: one typed, validated model read from ``FUSC_*`` environment variables.

Plain pydantic reading ``os.environ`` (no pydantic-settings dependency): the handful of fields here do not
need more, and the defaults work on a laptop CPU with the bundled ``model_repository/``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from service.errors import FuscError

ENV_PREFIX = "FUSC_"
M = TypeVar("M", bound=BaseModel)
# The bundled repository sits at the repository root, beside the ``service`` package.
DEFAULT_MODEL_REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"


def available_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a pod's limit)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


class SettingsError(FuscError):
    """A ``FUSC_*`` variable is invalid: the service refuses to start rather than guess."""

    code = "invalid_settings"
    http_status = 500


def validate_settings(model: type[M], values: Mapping[str, str], prefix: str, what: str) -> M:
    """``model`` from environment values; a SettingsError that names each bad variable (never its value)."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{prefix}{'.'.join(str(p) for p in e['loc']).upper() or '*'}: {e['msg']}"
            for e in exc.errors(include_input=False)
        )
        raise SettingsError(f"invalid {what}: {problems}") from exc


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model_repository: Path = DEFAULT_MODEL_REPOSITORY
    backend: Literal["onnxruntime", "triton"] = "onnxruntime"
    # The backbone's precision: "int8" runs the card's static int8 backbone (made by `make quantize`;
    # in-process ONNX Runtime only), whose agreement with fp32 the card records.
    precision: Literal["fp32", "int8"] = "fp32"
    # Triton: "host:port" of its endpoint for triton_protocol (below); only read when backend == "triton".
    triton_url: str = "127.0.0.1:8000"
    # One upload (one file) may not exceed this; DICOM cine loops are the large case.
    max_upload_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    # One request (all files of a batch together) may not exceed this: uploads are held in memory.
    max_request_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
    # Decoded width*height limit, a guard against decompression bombs.
    max_pixels: int = Field(default=50_000_000, gt=0)
    max_batch_files: int = Field(default=32, gt=0, le=256)
    retry_after_s: int = Field(default=5, ge=1)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # --- Admission, batching and threads (service/batching.py). Past any admission limit a request is
    # answered 503 `overloaded` with Retry-After before its body is read (or, for a body without
    # Content-Length, as soon as its running byte count passes the limit).
    # Requests being read, prepared or waiting for the model, all routes together.
    max_concurrent_requests: int = Field(default=128, gt=0)
    # Upload bytes held in memory by those requests (from Content-Length; counted while streaming otherwise).
    max_inflight_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
    # Images admitted and not yet answered (decoding, cleaning, queued for or in a model batch).
    max_queued_images: int = Field(default=64, gt=0)
    # "on": images of concurrent requests share model calls; "off": one model call per request.
    adaptive_batching: Literal["on", "off"] = "on"
    # A model call takes at most this many images...
    batch_max_size: int = Field(default=32, gt=1, le=256)
    # ... and the batch former holds the first queued image at most this long waiting for more.
    batch_max_wait_ms: float = Field(default=2.0, ge=0, le=1000)
    # Images whose predicted time to an answer exceeds this are refused (503 overloaded), not queued.
    batch_max_latency_ms: int = Field(default=5000, gt=0)
    # Threads that decode and clean (OpenCV releases the GIL). 0: one per core available to the process.
    # With preprocess_mode "processes", the number of worker processes instead.
    preprocess_threads: int = Field(default=0, ge=0)
    # "threads": decode + clean on threads of the server's process; "processes": in worker processes, which
    # share no GIL with HTTP and batching (faster on several cores; a crashing decoder takes only its worker).
    preprocess_mode: Literal["threads", "processes"] = "threads"
    # ONNX Runtime intra-op threads. 0: half the available cores (at least one), so that a model batch
    # and the preprocessing threads together do not ask for much more than the cores there are.
    ort_intra_op_threads: int = Field(default=0, ge=0)

    # --- API keys: when set (comma-separated), every /v1 route wants one, as `Authorization: Bearer KEY`
    # or `X-API-Key: KEY`. Health, metrics and docs stay open (probes and Prometheus carry no key).
    api_keys: tuple[str, ...] = Field(default=(), repr=False)

    # --- Similar-image search: a finished archive run folder with an index (python -m service.archive index);
    # unset, POST /v1/similar answers 404 no_similar_index. The index must come from the served model.
    similar_index: Path | None = None

    # --- Drift: the cluster mix of the last this-many answers is compared with the training mix.
    drift_window: int = Field(default=1000, ge=10)

    # Triton
    # FUSC_TRITON_URL above is the endpoint of this protocol: "host:8000" for HTTP, "host:8001" for gRPC.
    triton_protocol: Literal["http", "grpc"] = "http"
    # Longest wait for one model call; past it the call answers 503 backend_unavailable (retryable).
    triton_timeout_s: float = Field(default=10.0, gt=0, le=300)
    # Connecting and readiness checks: short, so that a lost server shows in /readyz within one probe.
    triton_connect_timeout_s: float = Field(default=1.0, gt=0, le=30)
    # max_batch_size that `python -m service.triton repo` writes into every model; the backend also splits
    # a larger call into pieces of the server's own max_batch_size.
    triton_max_batch_size: int = Field(default=64, gt=0, le=1024)

    @property
    def preprocess_workers(self) -> int:
        return self.preprocess_threads or available_cores()

    @property
    def ort_threads(self) -> int:
        return self.ort_intra_op_threads or max(1, available_cores() // 2)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(k.strip() for k in value.split(",") if k.strip())
        return value

    @model_validator(mode="after")
    def _batch_fits(self) -> Settings:
        if self.max_batch_files > self.batch_max_size:
            # One batch request stays one model call; the batch former never splits a request.
            raise ValueError(
                f"max_batch_files ({self.max_batch_files}) must not exceed "
                f"batch_max_size ({self.batch_max_size})"
            )
        if self.max_request_bytes > self.max_inflight_bytes:
            # A request allowed by its size must be admissible when nothing else is in flight.
            raise ValueError(
                f"max_request_bytes ({self.max_request_bytes}) must not exceed "
                f"max_inflight_bytes ({self.max_inflight_bytes})"
            )
        if self.max_batch_files > self.max_queued_images:
            raise ValueError(
                f"max_batch_files ({self.max_batch_files}) must not exceed "
                f"max_queued_images ({self.max_queued_images})"
            )
        if any(len(k) < 16 for k in self.api_keys):
            raise ValueError("every API key must be at least 16 characters long")
        return self

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``FUSC_<FIELD>`` variables (case-insensitive field names)."""
        environ = os.environ if environ is None else environ
        values: dict[str, str] = {}
        for key, value in environ.items():
            if key.upper().startswith(ENV_PREFIX):
                name = key[len(ENV_PREFIX) :].lower()
                if name in cls.model_fields:
                    values[name] = value
        for name in ("log_level", "adaptive_batching", "precision", "preprocess_mode"):
            if name in values:
                values[name] = values[name].upper() if name == "log_level" else values[name].lower()
        return validate_settings(cls, values, ENV_PREFIX, "service settings")
