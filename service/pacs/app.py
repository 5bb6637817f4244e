"""The PACS worker process: queue, pipeline, C-STORE receiver, DICOMweb watcher, job threads and a small
HTTP server for ``/metrics``, ``/livez`` and ``/readyz``. ``python -m service.pacs run`` starts it.

Readiness means: the queue is open (this process owns it), the model is loaded, the receiver listens (when
enabled) and every thread is alive. The PACS being down does not make the worker unready: jobs wait in the
queue and are retried, which is the point of having one.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import REGISTRY, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from service.pacs.dicom import silence_pydicom
from service.pacs.metrics import QueueCollector
from service.pacs.queue import JobQueue
from service.pacs.receiver import Receiver
from service.pacs.settings import PacsSettings
from service.pacs.watcher import Watcher
from service.pacs.worker import Worker
from service.pacs.writeback import http_client, make_writers
from service.pipeline import Pipeline, load_pipeline
from service.settings import Settings

logger = logging.getLogger("fusc.pacs")


def quiet_libraries() -> None:
    """pynetdicom logs association details (and dumps datasets at DEBUG); highdicom and pydicom may quote
    values. None of it belongs in this process's log: warnings and errors only, with no header values."""
    for name in ("pynetdicom", "highdicom", "pydicom", "httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    silence_pydicom()


class PacsApp:
    def __init__(
        self,
        settings: PacsSettings,
        service_settings: Settings | None = None,
        pipeline: Pipeline | None = None,
    ) -> None:
        self.settings = settings
        self.service_settings = service_settings or Settings.from_env()
        self.pipeline = pipeline
        self.queue = JobQueue(settings.queue_path, settings.spool_dir)
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []
        self.receiver: Receiver | None = None
        self.http: ThreadingHTTPServer | None = None
        self.collector: QueueCollector | None = None
        self.ready = False

    # ----------------------------------------------------------------------------------------- start
    def start(self) -> None:
        quiet_libraries()
        self.queue.open(exclusive=True)
        self.collector = QueueCollector(self.queue)
        REGISTRY.register(self.collector)
        self._start_http()
        if self.pipeline is None:
            self.pipeline = load_pipeline(self.service_settings)
        client = http_client(self.settings)
        writers = make_writers(self.settings, client)
        for i in range(self.settings.workers):
            worker = Worker(self.settings, self.queue, self.pipeline, writers)
            self._thread(f"fusc-pacs-worker-{i}", worker.run)
        if self.settings.watch != "none":
            watcher = Watcher(self.settings, self.queue, http_client(self.settings))
            self._thread("fusc-pacs-watcher", watcher.run)
        if self.settings.receiver:
            self.receiver = Receiver(self.settings, self.queue)
            self.receiver.start()
        self.ready = True
        logger.info(
            "PACS worker ready: model %s, %d worker thread(s), receiver %s, watch %s, write-back %s",
            self.pipeline.card.version,
            self.settings.workers,
            "on" if self.receiver else "off",
            self.settings.watch,
            ",".join(self.settings.writeback) or "none",
        )

    def _thread(self, name: str, target: Any) -> None:
        thread = threading.Thread(target=target, args=(self.stop_event,), name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def stop(self) -> None:
        """Stop taking C-STOREs first, then let the threads finish their current job."""
        self.ready = False
        if self.receiver is not None:
            self.receiver.stop()
        self.stop_event.set()
        self.queue.notify()
        for thread in self.threads:
            thread.join(timeout=60)
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
        if self.collector is not None:
            REGISTRY.unregister(self.collector)
            self.collector = None
        self.queue.close()

    # ---------------------------------------------------------------------------------------- health
    def health(self) -> dict[str, Any]:
        checks = {
            "queue": self.queue.owned,
            "model": self.pipeline is not None,
            "receiver": (self.receiver is not None and self.receiver.running) or not self.settings.receiver,
            "threads": bool(self.threads) and all(t.is_alive() for t in self.threads),
        }
        return {"ready": self.ready and all(checks.values()), "checks": checks}

    @property
    def http_port(self) -> int:
        assert self.http is not None
        return int(self.http.server_address[1])

    def _start_http(self) -> None:
        app = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server API)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
                elif path == "/livez":
                    self._send(200, b'{"live":true}', "application/json")
                elif path == "/readyz":
                    health = app.health()
                    self._send(
                        200 if health["ready"] else 503, json.dumps(health).encode(), "application/json"
                    )
                else:
                    self._send(404, b'{"error":{"code":"not_found"}}', "application/json")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return  # scrapes and probes every few seconds would drown the log

        self.http = ThreadingHTTPServer((self.settings.http_host, self.settings.http_port), Handler)
        self.http.daemon_threads = True
        threading.Thread(target=self.http.serve_forever, name="fusc-pacs-http", daemon=True).start()
