"""The DICOM C-STORE receiver: ultrasound instances in, durably queued before the sender hears success.

A pynetdicom storage SCP (plus Verification). Every storage SOP class is accepted in every transfer syntax
pynetdicom knows, so that a sender never fails on a class we do not want: ultrasound and Secondary Capture
instances are queued (spool file fsync'd, job committed) and only then answered 0x0000; other classes are
answered 0x0000 and counted as ignored. An instance that cannot be queued (disk full) is answered 0xA700,
so that the sender keeps it and retries. ``allowed_calling_aets`` rejects other callers at association.
"""

from __future__ import annotations

import logging

from pydicom.uid import UID
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from service.pacs import metrics
from service.pacs.dicom import is_wanted
from service.pacs.queue import JobQueue, QueueFullError
from service.pacs.settings import PacsSettings

logger = logging.getLogger("fusc.pacs.receiver")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000


class Receiver:
    def __init__(self, settings: PacsSettings, queue: JobQueue) -> None:
        self.settings = settings
        self.queue = queue
        self.ae = AE(ae_title=settings.ae_title)
        self.ae.maximum_associations = settings.max_associations
        self.ae.network_timeout = self.ae.acse_timeout = self.ae.dimse_timeout = 60
        # No 128 limit here: that bounds the contexts one association *proposes*, not what an SCP supports.
        for context in AllStoragePresentationContexts:
            self.ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification)
        if settings.allowed_calling_aets:
            self.ae.require_calling_aet = list(settings.allowed_calling_aets)
        self._server = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the receiver is not running")
        return int(self._server.server_address[1])

    def start(self) -> int:
        """Listen (in background threads); returns the port (useful with port 0)."""
        handlers = [(evt.EVT_C_STORE, self.on_store), (evt.EVT_C_ECHO, lambda event: SUCCESS)]
        self._server = self.ae.start_server(
            (self.settings.host, self.settings.port), block=False, evt_handlers=handlers
        )
        logger.info("C-STORE receiver %s listening on port %d", self.settings.ae_title, self.port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def on_store(self, event: evt.Event) -> int:
        metrics.RECEIVED.labels(source="cstore").inc()
        request = event.request
        sop_class = str(request.AffectedSOPClassUID or "")
        uid = str(request.AffectedSOPInstanceUID or "")
        if not uid or not UID(uid).is_valid:
            return CANNOT_UNDERSTAND
        if not is_wanted(sop_class):
            metrics.IGNORED.labels(source="cstore", reason="sop_class").inc()
            return SUCCESS
        try:
            if self.queue.known(uid):
                metrics.DUPLICATES.labels(source="cstore").inc()
                return SUCCESS
            # The bytes as received, with a file meta header: no decode, no re-encode.
            queued = self.queue.enqueue(uid, sop_class, "cstore", event.encoded_dataset(include_meta=True))
        except QueueFullError as exc:
            metrics.REFUSED.inc()
            logger.error("could not queue an instance (%s): answering 0xA700", exc.code)
            return OUT_OF_RESOURCES
        except Exception as exc:
            metrics.REFUSED.inc()
            logger.error("could not queue an instance (%s): answering 0xA700", type(exc).__name__)
            return OUT_OF_RESOURCES
        (metrics.QUEUED if queued else metrics.DUPLICATES).labels(source="cstore").inc()
        return SUCCESS
