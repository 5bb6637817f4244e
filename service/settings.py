"""Service settings: one typed, validated model read from ``FUSC_*`` environment variables.

Plain pydantic reading ``os.environ`` (no pydantic-settings dependency): the handful of fields here do not
need more, and the defaults work on a laptop CPU with the bundled ``model_repository/``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.errors import FuscError

ENV_PREFIX = "FUSC_"
# The bundled repository sits at the repository root, beside the ``service`` package.
DEFAULT_MODEL_REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"


class SettingsError(FuscError):
    """A ``FUSC_*`` variable is invalid: the service refuses to start rather than guess."""

    code = "invalid_settings"
    http_status = 500


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model_repository: Path = DEFAULT_MODEL_REPOSITORY
    backend: Literal["onnxruntime", "triton"] = "onnxruntime"
    # Triton: "host:port" of its endpoint for triton_protocol (below); only read when backend == "triton".
    triton_url: str = "127.0.0.1:8000"
    # One upload (one file) may not exceed this; DICOM cine loops are the large case.
    max_upload_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    # One request (all files of a batch together) may not exceed this: uploads are held in memory.
    max_request_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
    # Decoded width*height limit, a guard against decompression bombs.
    max_pixels: int = Field(default=50_000_000, gt=0)
    max_batch_files: int = Field(default=32, gt=0, le=256)
    # Adaptive batching of the model call across concurrent requests (BentoML's dispatcher): a call that
    # it predicts cannot finish within batch_max_latency_ms is shed with a 503 instead of queued.
    # "on": concurrent requests share model calls through BentoML's adaptive batcher; "off": one model call
    # per HTTP request (the batch endpoint still batches its own files).
    adaptive_batching: Literal["on", "off"] = "on"
    batch_max_size: int = Field(default=32, gt=1, le=256)
    batch_max_latency_ms: int = Field(default=5000, gt=0)
    # 0 lets ONNX Runtime choose (one thread per physical core).
    ort_intra_op_threads: int = Field(default=0, ge=0)
    retry_after_s: int = Field(default=5, ge=1)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

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

    @model_validator(mode="after")
    def _batch_fits(self) -> Settings:
        if self.max_batch_files > self.batch_max_size:
            # One batch request stays one model call; the dispatcher would otherwise split it.
            raise ValueError(
                f"max_batch_files ({self.max_batch_files}) must not exceed "
                f"batch_max_size ({self.batch_max_size})"
            )
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
        for name in ("log_level", "adaptive_batching"):
            if name in values:
                values[name] = values[name].upper() if name == "log_level" else values[name].lower()
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{ENV_PREFIX}{'.'.join(str(p) for p in e['loc']).upper() or '*'}: {e['msg']}"
                for e in exc.errors(include_input=False)
            )
            raise SettingsError(f"invalid service settings: {problems}") from exc
