"""Settings of the PACS worker: one typed model read from ``FUSC_PACS_*`` variables (the model and its
backend still come from the service's own ``FUSC_*`` settings, :class:`service.settings.Settings`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.settings import SettingsError, validate_settings

ENV_PREFIX = "FUSC_PACS_"

FramePolicyName = Literal["middle", "every_nth"]
WritebackForm = Literal["metadata", "sr"]


def _aet(value: str) -> str:
    value = value.strip()
    if not 0 < len(value) <= 16 or not value.isascii() or "\\" in value:
        raise ValueError(f"an AE title has 1 to 16 ASCII characters without a backslash: {value!r}")
    return value


class PacsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- Where the queue lives: the SQLite database and the spool of received instances (a volume).
    data_dir: Path = Path("/var/lib/fusc-pacs")

    # --- C-STORE receiver (off with receiver=false).
    receiver: bool = True
    ae_title: str = "FUSC"
    host: str = "0.0.0.0"
    port: int = Field(default=11112, ge=0, le=65535)
    # Calling AE titles allowed to associate; empty: any calling AE (only inside a closed network).
    allowed_calling_aets: tuple[str, ...] = ()
    # Associations at once (pynetdicom's maximum_associations).
    max_associations: int = Field(default=10, ge=1, le=100)

    # --- DICOMweb watcher (off with watch=none).
    watch: Literal["none", "orthanc-changes", "qido"] = "none"
    # The PACS's DICOMweb root for QIDO-RS/WADO-RS/STOW-RS, e.g. http://orthanc:8042/dicom-web
    dicomweb_url: str = ""
    # Orthanc's REST root, for its /changes feed and for the metadata write-back, e.g. http://orthanc:8042
    orthanc_url: str = ""
    # HTTP basic credentials for the PACS (Orthanc REST and DICOMweb), if it wants them.
    pacs_username: str = ""
    pacs_password: str = Field(default="", repr=False)
    poll_interval_s: float = Field(default=5.0, gt=0, le=3600)
    # QIDO mode: the first StudyDate (YYYYMMDD) looked at when there is no cursor yet; empty: today.
    qido_start_date: str = ""
    http_timeout_s: float = Field(default=30.0, gt=0, le=600)

    # --- Worker: threads that take jobs, retries and backoff.
    workers: int = Field(default=2, ge=1, le=64)
    max_attempts: int = Field(default=10, ge=1, le=1000)
    backoff_base_s: float = Field(default=2.0, gt=0)
    backoff_max_s: float = Field(default=300.0, gt=0)
    # How long an idle worker sleeps before it looks at the queue again (new jobs wake it at once).
    idle_poll_s: float = Field(default=1.0, gt=0, le=60)

    # --- Multi-frame instances: "middle" (one frame), or "every_nth" (frames 0, N, 2N, ... up to
    # frame_max, a majority vote of their clusters).
    frame_policy: FramePolicyName = "middle"
    frame_step: int = Field(default=10, ge=1)
    frame_max: int = Field(default=16, ge=1, le=256)

    # --- Write-back: Orthanc user metadata, a DICOM Comprehensive SR, or both (comma-separated).
    writeback: tuple[WritebackForm, ...] = ("metadata", "sr")
    # How the SR is stored back: C-STORE to the PACS's AE, or STOW-RS to dicomweb_url.
    sr_store: Literal["cstore", "stow"] = "stow"
    pacs_ae_title: str = "ORTHANC"
    pacs_host: str = "127.0.0.1"
    pacs_port: int = Field(default=4242, ge=1, le=65535)
    # The metadata form needs the instance in Orthanc; an instance that came straight from a modality may
    # reach Orthanc a little later, so a missing instance is retried like an unreachable Orthanc.

    # --- /metrics, /livez, /readyz.
    http_host: str = "0.0.0.0"
    http_port: int = Field(default=9464, ge=0, le=65535)

    @field_validator("allowed_calling_aets", "writeback", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        return value

    @field_validator("ae_title", "pacs_ae_title")
    @classmethod
    def _check_aet(cls, value: str) -> str:
        return _aet(value)

    @field_validator("allowed_calling_aets")
    @classmethod
    def _check_aets(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_aet(v) for v in value)

    @field_validator("qido_start_date")
    @classmethod
    def _check_date(cls, value: str) -> str:
        if value and not (len(value) == 8 and value.isdigit()):
            raise ValueError("a DICOM date YYYYMMDD")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> PacsSettings:
        if self.watch == "orthanc-changes" and not self.orthanc_url:
            raise ValueError("watch=orthanc-changes needs orthanc_url")
        if self.watch != "none" and not self.dicomweb_url:
            raise ValueError(f"watch={self.watch} retrieves by WADO-RS and needs dicomweb_url")
        if "metadata" in self.writeback and not self.orthanc_url:
            raise ValueError("the metadata write-back needs orthanc_url")
        if "sr" in self.writeback and self.sr_store == "stow" and not self.dicomweb_url:
            raise ValueError("sr_store=stow needs dicomweb_url")
        if len(set(self.writeback)) != len(self.writeback):
            raise ValueError("a write-back form is listed twice")
        if self.backoff_max_s < self.backoff_base_s:
            raise ValueError("backoff_max_s must not be below backoff_base_s")
        return self

    @property
    def queue_path(self) -> Path:
        return self.data_dir / "queue.sqlite3"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PacsSettings:
        """Build from ``FUSC_PACS_<FIELD>`` variables; an unknown ``FUSC_PACS_*`` name is an error (a typo
        would otherwise keep a default silently)."""
        environ = os.environ if environ is None else environ
        values: dict[str, str] = {}
        unknown: list[str] = []
        for key, value in environ.items():
            if key.upper().startswith(ENV_PREFIX):
                name = key[len(ENV_PREFIX) :].lower()
                if name in cls.model_fields:
                    values[name] = value
                else:
                    unknown.append(key)
        if unknown:
            raise SettingsError(f"unknown PACS settings: {', '.join(sorted(unknown))}")
        return validate_settings(cls, values, ENV_PREFIX, "PACS settings")
