"""Start the real service (``bentoml serve service.api:FuscService``) on 127.0.0.1 and a free port, wait until
it is ready, and stop it with its whole process group: what the README example, the service evaluation and
the benchmarks all need. No pytest, no torch."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent


def stop_process_group(proc: subprocess.Popen, term_wait_s: float = 20.0, kill_wait_s: float = 5.0) -> None:
    """SIGTERM the process group of ``proc`` (started with ``start_new_session=True``), SIGKILL if it is still
    there after ``term_wait_s``."""
    for sig, wait_s in ((signal.SIGTERM, term_wait_s), (signal.SIGKILL, kill_wait_s)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait_s)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS's pick)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _bentoml() -> list[str]:
    script = Path(sys.executable).with_name("bentoml")
    return [str(script)] if script.exists() else [sys.executable, "-m", "bentoml"]


@dataclass(frozen=True)
class Running:
    url: str
    pid: int  # `bentoml serve` itself, leader of its process group
    log: Path | None


@contextlib.contextmanager
def run_service(
    repository: Path,
    *,
    env: dict[str, str] | None = None,
    log: Path | None = None,
    bentoml_home: Path | None = None,
    ready_timeout_s: float = 120.0,
) -> Iterator[Running]:
    """The service on ``repository`` until the block ends. ``FUSC_*`` settings of the caller's environment
    are not passed on (only ``env``'s), so the server runs with the defaults plus what was asked for; its
    output goes to ``log`` (else nowhere)."""
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("FUSC_", "PROMETHEUS_MULTIPROC_DIR"))}
    full_env = {
        **clean,
        "FUSC_MODEL_REPOSITORY": str(Path(repository).resolve()),
        "PYTHONPATH": str(REPO_ROOT),
        "BENTOML_DO_NOT_TRACK": "True",
        **({"BENTOML_HOME": str(bentoml_home)} if bentoml_home else {}),
        **(env or {}),
    }
    cmd = [*_bentoml(), "serve", "service.api:FuscService", "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") if log else open(os.devnull, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    running = Running(url=f"http://127.0.0.1:{port}", pid=proc.pid, log=log)
    where = f"; see {log}" if log else ""
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the service exited with code {proc.returncode} before it was ready{where}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{running.url}/readyz", timeout=2.0).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the service was not ready within {ready_timeout_s:.0f} s{where}")
            time.sleep(0.25)
        yield running
    finally:
        stop_process_group(proc)
