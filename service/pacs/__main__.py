"""``python -m service.pacs``: run the PACS worker, or look at and manage its queue.

    python -m service.pacs run            # receiver + watcher + workers + /metrics (settings: FUSC_PACS_*)
    python -m service.pacs status         # jobs by state, the oldest pending job's age (JSON)
    python -m service.pacs dead           # the dead-letter jobs: queue id, error code, attempts (JSON)
    python -m service.pacs requeue-dead   # dead jobs whose retries ran out go back to the queue

``status`` and ``dead`` print job ids, codes and counts; ``--uids`` adds SOP Instance UIDs for the operator
who needs to find an instance in the PACS.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence

from service.errors import FuscError
from service.pacs.queue import JobQueue
from service.pacs.settings import PacsSettings

logger = logging.getLogger("fusc.pacs")


def _run(settings: PacsSettings) -> int:
    from service.pacs.app import PacsApp
    from service.settings import Settings

    service_settings = Settings.from_env()
    logging.basicConfig(
        level=service_settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = PacsApp(settings, service_settings)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("signal %d: stopping", signum)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    app.start()
    logger.info("metrics and health on port %d", app.http_port)
    while not stopping.wait(1.0):
        if not app.health()["checks"]["threads"]:
            logger.error("a worker thread died; exiting so that the pod restarts")
            app.stop()
            return 1
    app.stop()
    return 0


def _queue(settings: PacsSettings) -> JobQueue:
    return JobQueue(settings.queue_path, settings.spool_dir).open(exclusive=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.pacs", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the receiver, the watcher and the workers")
    status = sub.add_parser("status", help="jobs by state and the oldest pending job's age")
    dead = sub.add_parser("dead", help="the dead-letter jobs")
    for p in (status, dead):
        p.add_argument("--uids", action="store_true", help="include SOP Instance UIDs")
    sub.add_parser("requeue-dead", help="retry dead jobs whose retries ran out")
    args = parser.parse_args(argv)
    try:
        settings = PacsSettings.from_env()
        if args.command == "run":
            return _run(settings)
        queue = _queue(settings)
        if args.command == "status":
            stats = queue.stats()
            out: dict = {"jobs": stats.counts, "oldest_pending_age_s": round(stats.oldest_pending_age_s, 1)}
            if args.uids:
                out["pending"] = [j["sop_instance_uid"] for j in queue.jobs("queued") + queue.jobs("running")]
        elif args.command == "dead":
            keep = ("id", "error_code", "attempts", "source", "updated_at") + (
                ("sop_instance_uid",) if args.uids else ()
            )
            out = {"dead": [{k: j[k] for k in keep} for j in queue.jobs("dead")], "at": time.time()}
        else:
            out = {"requeued": queue.requeue_dead()}
        print(json.dumps(out, indent=2))
        return 0
    except FuscError as exc:
        print(f"error [{exc.code}]: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
