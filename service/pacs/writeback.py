"""Write-back: a result goes back to where people look, in one or both forms.

* ``metadata``: Orthanc user-defined metadata on the source instance (Orthanc 1.10 has no labels; they came
  with 1.12). The keys must be declared in Orthanc's ``UserMetadata`` (deploy/orthanc/orthanc.json):
  FuscCluster, FuscView, FuscConfidence, FuscOod, FuscModelVersion and FuscResult (the whole record, JSON).
  Read back with ``GET /instances/{id}/metadata/FuscView``.
* ``sr``: the Comprehensive SR of :mod:`service.pacs.sr`, stored by STOW-RS or by C-STORE.

Both are idempotent: the same PUTs, the same SR UID. A PACS that cannot be reached, or answers with an
error, raises :class:`PacsUnavailableError` (retried with backoff); nothing here logs a header value.
"""

from __future__ import annotations

import io
import json
import uuid
from typing import Any

import httpx
from pydicom.dataset import Dataset
from pynetdicom import AE

from service.errors import FuscError
from service.pacs.settings import PacsSettings
from service.pacs.sr import build_sr

METADATA_KEYS = {
    "FuscCluster": 4201,
    "FuscView": 4202,
    "FuscConfidence": 4203,
    "FuscOod": 4204,
    "FuscModelVersion": 4205,
    "FuscResult": 4206,
}
# DICOM status codes of a C-STORE that stored the object (success, and the coercion/elements warnings).
_STORED = {0x0000, 0xB000, 0xB006, 0xB007}


class PacsUnavailableError(FuscError):
    """The PACS did not answer, or refused the write-back for now: retried with backoff."""

    code = "pacs_unavailable"
    http_status = 503


class SourceNotInPacsError(PacsUnavailableError):
    """The source instance is not (yet) in Orthanc, so its metadata cannot be set: retried, as an instance
    sent to the worker and to the PACS at once may reach the PACS a little later."""

    code = "source_not_in_pacs"


def http_client(settings: PacsSettings) -> httpx.Client:
    auth = (settings.pacs_username, settings.pacs_password) if settings.pacs_username else None
    return httpx.Client(auth=auth, timeout=settings.http_timeout_s)


def metadata_values(result: dict[str, Any]) -> dict[str, str]:
    """The user metadata, as strings (Orthanc stores text): empty string for a withheld view or no OOD."""
    ood = result.get("ood")
    return {
        "FuscCluster": str(int(result["cluster"])),
        "FuscView": result.get("view") or "",
        "FuscConfidence": f"{float(result['confidence']):.6f}",
        "FuscOod": "" if ood is None else ("true" if ood else "false"),
        "FuscModelVersion": str(result["model_version"]),
        "FuscResult": json.dumps(result, sort_keys=True, separators=(",", ":")),
    }


class OrthancMetadataWriter:
    form = "metadata"

    def __init__(self, settings: PacsSettings, client: httpx.Client) -> None:
        self.base = settings.orthanc_url.rstrip("/")
        self.client = client

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.client.request(method, f"{self.base}{path}", **kwargs)
        except httpx.HTTPError as exc:
            raise PacsUnavailableError(f"Orthanc did not answer ({type(exc).__name__})") from exc
        if response.status_code >= 400:
            raise PacsUnavailableError(f"Orthanc answered HTTP {response.status_code} to {method}")
        return response

    def orthanc_id(self, sop_instance_uid: str) -> str:
        found = self._call("POST", "/tools/lookup", content=sop_instance_uid).json()
        ids = [item["ID"] for item in found if item.get("Type") == "Instance"]
        if not ids:
            raise SourceNotInPacsError("the source instance is not in Orthanc (yet)")
        return str(ids[0])

    def write(self, sop_instance_uid: str, result: dict[str, Any], source: Dataset | None) -> None:
        instance = self.orthanc_id(sop_instance_uid)
        for key, value in metadata_values(result).items():
            self._call("PUT", f"/instances/{instance}/metadata/{key}", content=value.encode())


class SrWriter:
    """Stores the SR by STOW-RS (``sr_store=stow``) or by C-STORE (``sr_store=cstore``)."""

    form = "sr"

    def __init__(self, settings: PacsSettings, client: httpx.Client) -> None:
        self.settings = settings
        self.client = client
        self.ae = AE(ae_title=settings.ae_title)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = settings.http_timeout_s
        self.ae.add_requested_context("1.2.840.10008.5.1.4.1.1.88.33")  # Comprehensive SR, Explicit VR LE

    def write(self, sop_instance_uid: str, result: dict[str, Any], source: Dataset | None) -> None:
        if source is None:
            raise FuscError("the SR write-back needs the source header", code="pacs_spool_missing")
        sr = build_sr(source, result)
        if self.settings.sr_store == "stow":
            self._stow(sr)
        else:
            self._cstore(sr)

    def _stow(self, sr: Dataset) -> None:
        buffer = io.BytesIO()
        sr.save_as(buffer, enforce_file_format=True)
        boundary = uuid.uuid4().hex
        body = (
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + buffer.getvalue()
            + f"\r\n--{boundary}--\r\n".encode()
        )
        url = self.settings.dicomweb_url.rstrip("/") + "/studies"
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        }
        try:
            response = self.client.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise PacsUnavailableError(f"STOW-RS did not answer ({type(exc).__name__})") from exc
        if response.status_code >= 400:
            raise PacsUnavailableError(f"STOW-RS answered HTTP {response.status_code}")
        # 200 with a Failed SOP Sequence (0008,1198) still means this object was not stored.
        try:
            failed = response.json().get("00081198", {}).get("Value") if response.content else None
        except ValueError:
            failed = None
        if failed:
            raise PacsUnavailableError("STOW-RS listed the SR among the failed instances")

    def _cstore(self, sr: Dataset) -> None:
        s = self.settings
        try:
            assoc = self.ae.associate(s.pacs_host, s.pacs_port, ae_title=s.pacs_ae_title)
        except Exception as exc:  # socket errors surface here on some platforms
            raise PacsUnavailableError(f"C-STORE association failed ({type(exc).__name__})") from exc
        if not assoc.is_established:
            raise PacsUnavailableError("the PACS refused or did not answer the C-STORE association")
        try:
            status = assoc.send_c_store(sr)
        finally:
            assoc.release()
        code = getattr(status, "Status", None)
        if code not in _STORED:
            raise PacsUnavailableError(
                "C-STORE of the SR failed" + ("" if code is None else f" (status 0x{int(code):04X})")
            )


def make_writers(settings: PacsSettings, client: httpx.Client) -> list[OrthancMetadataWriter | SrWriter]:
    writers: list[OrthancMetadataWriter | SrWriter] = []
    for form in settings.writeback:
        writers.append(
            OrthancMetadataWriter(settings, client) if form == "metadata" else SrWriter(settings, client)
        )
    return writers
