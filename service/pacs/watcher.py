"""DICOMweb mode: watch a PACS for new ultrasound instances, retrieve them by WADO-RS and queue them.

Two ways to find what is new, each with a cursor kept in the queue database (so a restart goes on where the
last run stopped, and what it saw twice is skipped as already queued):

* ``orthanc-changes``: Orthanc's ``/changes`` feed (cursor: the last sequence number handled). A NewInstance
  whose ``SopClassUid`` metadata is not wanted is skipped without retrieval; the others are looked up by
  QIDO-RS (study, series, class, modality) and retrieved by WADO-RS.
* ``qido``: any DICOMweb PACS. QIDO-RS for instances with ``StudyDate`` from the cursor on (cursor: the
  latest study date seen; that day is asked again, as it may still grow), paged with limit/offset.

A PACS that does not answer makes the watcher back off (doubling up to ``backoff_max_s``) and retry; the
cursor moves only after every instance of a page is queued.
"""

from __future__ import annotations

import datetime
import logging
import re
import threading
from typing import Any

import httpx

from service.errors import FuscError
from service.pacs import metrics
from service.pacs.dicom import is_wanted
from service.pacs.queue import JobQueue, backoff_delay
from service.pacs.settings import PacsSettings
from service.pacs.writeback import PacsUnavailableError

logger = logging.getLogger("fusc.pacs.watcher")

CHANGES_CURSOR = "orthanc-changes"
QIDO_CURSOR = "qido-study-date"
PAGE = 100


def _first(tags: dict[str, Any], tag: str) -> str | None:
    values = tags.get(tag, {}).get("Value") or []
    return str(values[0]) if values else None


def parse_multipart(content_type: str, body: bytes) -> list[bytes]:
    """The parts of a multipart/related body (WADO-RS), without their headers."""
    match = re.search(r'boundary="?([^";]+)"?', content_type, re.IGNORECASE)
    if match is None:
        raise PacsUnavailableError("WADO-RS answered without a multipart boundary")
    delimiter = b"--" + match.group(1).encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        head, sep, payload = chunk.partition(b"\r\n\r\n")
        if not sep:
            continue
        if payload.endswith(b"\r\n"):
            payload = payload[:-2]
        parts.append(payload)
    return parts


class Watcher:
    def __init__(self, settings: PacsSettings, queue: JobQueue, client: httpx.Client) -> None:
        self.settings = settings
        self.queue = queue
        self.client = client
        self.dicomweb = settings.dicomweb_url.rstrip("/")
        self.orthanc = settings.orthanc_url.rstrip("/")
        self.failures = 0
        # UIDs this process has already offered: QIDO mode lists the cursor's day again at every poll, and
        # those instances are neither counted again nor looked up. Bounded; forgetting only costs a lookup.
        self._seen: set[str] = set()

    # ---------------------------------------------------------------------------------------- HTTP
    def _get(self, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.client.get(url, **kwargs)
        except httpx.HTTPError as exc:
            raise PacsUnavailableError(f"the PACS did not answer ({type(exc).__name__})") from exc
        if response.status_code >= 400:
            raise PacsUnavailableError(f"the PACS answered HTTP {response.status_code}")
        return response

    def retrieve(self, study: str, series: str, instance: str) -> bytes:
        """One instance by WADO-RS, in the transfer syntax the PACS holds it in."""
        url = f"{self.dicomweb}/studies/{study}/series/{series}/instances/{instance}"
        response = self._get(
            url, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
        )
        parts = parse_multipart(response.headers.get("content-type", ""), response.content)
        if len(parts) != 1:
            raise PacsUnavailableError(f"WADO-RS answered {len(parts)} parts for one instance")
        return parts[0]

    def offer(self, tags: dict[str, Any]) -> bool:
        """Queue the instance a QIDO-RS answer describes, unless unwanted or known. True when queued."""
        uid = _first(tags, "00080018")
        if uid in self._seen:
            return False
        metrics.RECEIVED.labels(source="dicomweb").inc()
        sop_class = _first(tags, "00080016") or ""
        study, series = _first(tags, "0020000D"), _first(tags, "0020000E")
        if not (uid and study and series):
            metrics.IGNORED.labels(source="dicomweb", reason="incomplete_qido").inc()
            return False
        if not is_wanted(sop_class, _first(tags, "00080060")):
            metrics.IGNORED.labels(source="dicomweb", reason="sop_class").inc()
            self._remember(uid)
            return False
        if self.queue.known(uid):
            metrics.DUPLICATES.labels(source="dicomweb").inc()
            self._remember(uid)
            return False
        queued = self.queue.enqueue(uid, sop_class, "dicomweb", self.retrieve(study, series, uid))
        (metrics.QUEUED if queued else metrics.DUPLICATES).labels(source="dicomweb").inc()
        self._remember(uid)
        return queued

    def _remember(self, uid: str) -> None:
        if len(self._seen) >= 100_000:
            self._seen.clear()
        self._seen.add(uid)

    # ------------------------------------------------------------------------------ orthanc-changes
    def poll_changes(self) -> int:
        """Handle pages of Orthanc's /changes until it is done; returns instances queued."""
        queued = 0
        while True:
            since = int(self.queue.cursor(CHANGES_CURSOR) or 0)
            page = self._get(f"{self.orthanc}/changes", params={"since": since, "limit": PAGE}).json()
            for change in page.get("Changes", []):
                if change.get("ChangeType") != "NewInstance" or change.get("ResourceType") != "Instance":
                    continue
                queued += self._changed_instance(str(change["ID"]))
            last = int(page.get("Last", since))
            if last > since:
                self.queue.set_cursor(CHANGES_CURSOR, str(last))
            if page.get("Done", True) or last <= since:
                return queued

    def _changed_instance(self, orthanc_id: str) -> int:
        base = f"{self.orthanc}/instances/{orthanc_id}"
        try:
            sop_class = self._get(f"{base}/metadata/SopClassUid").text.strip()
        except PacsUnavailableError:
            # Deleted since (404), or Orthanc went away: the latter fails the next call too.
            self._get(f"{self.orthanc}/system")
            return 0
        if not is_wanted(sop_class, "US"):
            metrics.RECEIVED.labels(source="dicomweb").inc()
            metrics.IGNORED.labels(source="dicomweb", reason="sop_class").inc()
            return 0
        uid = self._get(base).json().get("MainDicomTags", {}).get("SOPInstanceUID")
        if not uid:
            return 0
        if self.queue.known(uid):
            metrics.RECEIVED.labels(source="dicomweb").inc()
            metrics.DUPLICATES.labels(source="dicomweb").inc()
            return 0
        found = self._get(f"{self.dicomweb}/instances", params={"00080018": uid}).json()
        return sum(self.offer(tags) for tags in found[:1])

    # ----------------------------------------------------------------------------------------- qido
    def poll_qido(self) -> int:
        start = self.queue.cursor(QIDO_CURSOR) or self.settings.qido_start_date
        start = start or datetime.date.today().strftime("%Y%m%d")
        queued, offset, latest = 0, 0, start
        while True:
            params = {
                "StudyDate": f"{start}-",
                "limit": PAGE,
                "offset": offset,
                "includefield": "00080016,00080060,00080020",
            }
            found = self._get(f"{self.dicomweb}/instances", params=params).json()
            for tags in found:
                queued += self.offer(tags)
                date = _first(tags, "00080020")
                if date and date.isdigit() and date > latest:
                    latest = date
            if len(found) < PAGE:
                break
            offset += len(found)
        if latest != start:
            self.queue.set_cursor(QIDO_CURSOR, latest)
        return queued

    # ----------------------------------------------------------------------------------------- loop
    def poll_once(self) -> int:
        return self.poll_changes() if self.settings.watch == "orthanc-changes" else self.poll_qido()

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                queued = self.poll_once()
                self.failures = 0
                if queued:
                    logger.info("watcher queued %d instance(s)", queued)
                delay = self.settings.poll_interval_s
            except FuscError as exc:
                self.failures += 1
                metrics.WATCHER_ERRORS.labels(code=exc.code).inc()
                delay = backoff_delay(
                    self.failures, self.settings.backoff_base_s, self.settings.backoff_max_s
                )
                logger.warning("watcher poll failed (%s); retrying in %.1f s", exc.code, delay)
            except Exception as exc:  # a bug or an odd answer: back off, never die
                self.failures += 1
                metrics.WATCHER_ERRORS.labels(code="internal_error").inc()
                delay = backoff_delay(
                    self.failures, self.settings.backoff_base_s, self.settings.backoff_max_s
                )
                logger.error("watcher poll raised %s; retrying in %.1f s", type(exc).__name__, delay)
            stop.wait(delay)
