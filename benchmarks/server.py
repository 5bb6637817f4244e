"""Helpers of the service benchmarks: start ``bentoml serve`` on a free loopback port, sample the resident
memory of all its processes, build a model repository and pick images. No pytest here: the slow
integration tests and ``python -m benchmarks.load`` / ``benchmarks.memory`` share these.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from service.localserver import run_service

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("FUSC_TEST_DATA", ROOT.parent / "shared" / "data"))
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process."""
    out: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_bytes()
                # After the command name (which may hold spaces and parentheses): state, ppid, ...
                out[int(entry.name)] = int(stat[stat.rindex(b")") + 2 :].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    return out


@dataclass
class Server:
    url: str
    pid: int  # `bentoml serve` itself; its workers run in sessions of their own, so found by parentage
    log: Path

    def pids(self) -> list[int]:
        """The server process and all its descendants."""
        children: dict[int, list[int]] = {}
        for pid, parent in _parents().items():
            children.setdefault(parent, []).append(pid)
        found, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo += children.get(pid, [])
        return found

    def rss_bytes(self) -> int:
        """Resident memory of every process of the server (the bentoml arbiter, its worker and helpers)."""
        total = 0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/statm", "rb") as f:
                    total += int(f.read().split()[1]) * _PAGE
            except (OSError, ValueError, IndexError):
                continue
        return total

    def processes(self) -> int:
        return len(self.pids())


@dataclass
class MemorySampler:
    """Samples ``server.rss_bytes()`` every ``interval_s`` on a thread, from start() to stop()."""

    server: Server
    interval_s: float = 0.05
    samples: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> MemorySampler:
        def run() -> None:
            t0 = time.monotonic()
            while not self._stop.is_set():
                self.samples.append((time.monotonic() - t0, self.server.rss_bytes()))
                self._stop.wait(self.interval_s)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> MemorySampler:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self

    @property
    def peak(self) -> int:
        return max((b for _, b in self.samples), default=0)

    def mean_between(self, t0: float, t1: float) -> float:
        values = [b for t, b in self.samples if t0 <= t < t1]
        return sum(values) / len(values) if values else float("nan")


@contextlib.contextmanager
def serve(
    repository: Path, workdir: Path, env: dict[str, str] | None = None, ready_timeout_s: float = 120.0
) -> Iterator[Server]:
    """``bentoml serve service.api:FuscService`` on 127.0.0.1 and a free port, until the block ends, its log
    and BentoML home in ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"server-{time.monotonic_ns()}.log"
    with run_service(
        repository, env=env, log=log, bentoml_home=workdir / "bentoml_home", ready_timeout_s=ready_timeout_s
    ) as running:
        yield Server(url=running.url, pid=running.pid, log=log)


def repository(name: str, workdir: Path) -> Path:
    """``bundled``: the repository under model_repository/; ``tiny``: the test fixture's (needs onnx)."""
    if name == "bundled":
        return ROOT / "model_repository"
    from tests.service.conftest import build_tiny_repository

    return build_tiny_repository(workdir / "tiny_repository")


def real_images(n: int, data: Path = DEFAULT_DATA) -> list[bytes]:
    """Up to ``n`` HC18 and FETAL_PLANES_DB images (as uploaded), else synthetic sector frames."""
    files: list[Path] = []
    for sub in ("hc18/images", "fetal_planes_db/images"):
        folder = data / sub
        if folder.is_dir():
            files += sorted(folder.glob("*.png"))[: n // 2 + 1]
    if files:
        return [f.read_bytes() for f in files[:n]]
    import cv2

    from tests.service.conftest import synthetic_frame

    return [cv2.imencode(".png", synthetic_frame(s, 540, 800))[1].tobytes() for s in range(n)]


def big_png(side: int = 7000, seed: int = 0) -> bytes:
    """A ``side`` x ``side`` gray PNG of noise: incompressible, so 49 MB at 7000 px."""
    import cv2
    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 256, size=(side, side), dtype=np.uint8)
    ok, buf = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    assert ok
    return buf.tobytes()


def scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="fusc-bench-"))
