"""Exactly-once: ``python -m service.archive run`` killed with SIGKILL at about half way (a real process and
its pool, killed as a group) and run again ends with every image exactly once, with the answers of a run
that was never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from service.archive import store
from service.archive.ledger import Ledger
from service.archive.sources import list_folder, resolve
from tests.archive.conftest import make_archive

REPO_ROOT = Path(__file__).resolve().parents[2]
N_PNG = 240
CHUNK = 4
TIMEOUT_S = 120


def archive_command(source: Path, out: Path, repo: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "service.archive",
        "run",
        str(source),
        "--out",
        str(out),
        "--model-repository",
        str(repo),
        "--workers",
        "2",
        "--chunk-size",
        str(CHUNK),
        "--map",
        "pca",
        "--no-report",
        "--no-progress",
    ]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


@pytest.fixture(scope="module")
def big_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_archive(tmp_path_factory.mktemp("resume") / "src", N_PNG, seed=1)


def test_sigkill_at_half_way_then_rerun_gives_every_image_once(
    big_archive: Path, tiny_repo: Path, tmp_path: Path
) -> None:
    out, log = tmp_path / "run", tmp_path / "run.log"
    listed = list_folder(resolve(str(big_archive))).table.column("key").to_pylist()
    n_chunks = Ledger.chunk_count(len(listed), CHUNK)
    proc = start(archive_command(big_archive, out, tiny_repo), log)
    ledger = Ledger(out)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while len(ledger.done()) < n_chunks // 2:
            assert proc.poll() is None, f"the run ended before half way:\n{log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "the run did not get half way in time"
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its pool, no chance to clean up
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    done_set = ledger.done()
    done_at_kill = len(done_set)
    assert n_chunks // 2 <= done_at_kill < n_chunks, done_at_kill
    assert store.read_manifest(out).status == "running"
    assert not (out / store.RESULTS).exists()

    rerun = subprocess.run(
        archive_command(big_archive, out, tiny_repo),
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming: {done_at_kill} of {n_chunks} chunks" in rerun.stderr

    run = store.load_run(out)
    keys = run.table.column("key").to_pylist()
    assert keys == listed  # every listed image, once, in key order
    rows = run.table.column("embedding_row").drop_null().to_pylist()
    assert sorted(rows) == list(range(len(run.embeddings)))  # every embedding row used once
    (session,) = run.manifest.extra["sessions"]  # the killed session had no chance to record itself
    assert session["chunks_before"] == done_at_kill
    sizes = [min(CHUNK, len(listed) - i * CHUNK) for i in range(n_chunks)]
    assert session["images"] == sum(size for i, size in enumerate(sizes) if i not in done_set)

    whole = tmp_path / "whole"
    subprocess.run(
        archive_command(big_archive, whole, tiny_repo),
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        check=True,
        capture_output=True,
        timeout=TIMEOUT_S,
    )
    reference = store.load_run(whole)
    for column in ("key", "cluster", "error_code", "top_clusters", "embedding_row", "sop_instance_uid"):
        assert run.table.column(column).equals(reference.table.column(column)), column
    np.testing.assert_allclose(run.embeddings, reference.embeddings, atol=1e-6)


def _children(pid: int) -> list[int]:
    """The pool's worker processes of ``pid`` (its children running multiprocessing's spawn_main)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"spawn_main" in cmdline:
            out.append(int(entry.name))
    return out


def test_a_worker_killed_mid_run_costs_nothing(big_archive: Path, tiny_repo: Path, tmp_path: Path) -> None:
    """The OOM killer (or a decoder crash) takes one pool worker: the run redoes the chunks that were in the
    pool, image by image, and finishes with every image answered once."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    proc = start(archive_command(big_archive, out, tiny_repo), log)
    ledger = Ledger(out)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while len(ledger.done()) < 3 or not _children(proc.pid):
            assert proc.poll() is None, f"the run ended too soon:\n{log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "the run did not start in time"
            time.sleep(0.005)
        os.kill(_children(proc.pid)[0], signal.SIGKILL)
        assert proc.wait(timeout=TIMEOUT_S) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert "a worker process died" in log.read_text()
    run = store.load_run(out)
    assert (
        run.table.column("key").to_pylist()
        == list_folder(resolve(str(big_archive))).table.column("key").to_pylist()
    )
    codes = [c for c in run.table.column("error_code").to_pylist() if c]
    assert sorted(codes) == ["empty_input", "truncated_image", "unsupported_format"]  # the archive's own
