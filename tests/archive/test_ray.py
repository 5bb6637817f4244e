"""The Ray engine against a real local Ray cluster: a head and one worker node, each its own ``ray start``,
on loopback addresses (127.0.0.2 and 127.0.0.3) with token authentication, bounded in time and always
stopped (by their own process groups). The run over a few hundred images equals the process pool's.

Needs the ``ray`` extra (``pip install -e '.[ray]'``); skipped without it.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from service.archive import store
from service.localserver import free_port, stop_process_group
from tests.archive.conftest import make_archive

pytest.importorskip("ray.data", reason="the ray extra is not installed (pip install -e '.[ray]')")

REPO_ROOT = Path(__file__).resolve().parents[2]
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
START_TIMEOUT_S = 60
RUN_TIMEOUT_S = 240
N_PNG = 300


def _ray() -> str:
    script = Path(sys.executable).with_name("ray")
    if not script.exists():
        pytest.skip("no ray command beside the interpreter")
    return str(script)


def _leftovers(marker: str) -> list[int]:
    """Processes whose command line names this cluster's own temporary folder (and nothing else's)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if marker.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
    return pids


def _active_nodes(env: dict[str, str], address: str) -> int:
    out = subprocess.run(
        [_ray(), "status", "--address", address], env=env, capture_output=True, text=True, timeout=30
    )
    active = out.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return len(re.findall(r"node_[0-9a-f]+", active))


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[tuple[str, dict[str, str]]]:
    temp = tempfile.mkdtemp(prefix="fusc-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    port = free_port(HEAD_IP)
    address = f"{HEAD_IP}:{port}"
    common = ["--block", "--num-cpus", "1", "--disable-usage-stats", "--temp-dir", temp]
    procs: list[subprocess.Popen] = []
    log = open(Path(temp) / "cluster.log", "wb")  # noqa: SIM115 (closed in the finalizer)
    try:
        head = [_ray(), "start", "--head", "--node-ip-address", HEAD_IP, "--port", str(port)]
        procs.append(
            subprocess.Popen(
                [*head, "--include-dashboard=false", *common],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        started_worker = False
        while True:
            assert all(p.poll() is None for p in procs), "a ray node exited while starting"
            nodes = _active_nodes(env, address)
            if nodes >= 1 and not started_worker:
                worker = [_ray(), "start", "--address", address, "--node-ip-address", WORKER_IP, *common]
                procs.append(
                    subprocess.Popen(
                        worker, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
                started_worker = True
            if nodes >= 2:
                break
            assert time.monotonic() < deadline, "the local Ray cluster did not come up in time"
            time.sleep(0.5)
        yield address, env
    finally:
        for proc in reversed(procs):
            stop_process_group(proc)
        for pid in _leftovers(temp):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "service.archive",
        "run",
        *args,
        "--map",
        "pca",
        "--no-report",
        "--no-progress",
    ]
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_ray_cluster_gives_the_pools_results(
    ray_cluster: tuple[str, dict[str, str]], tiny_repo: Path, tmp_path: Path
) -> None:
    address, env = ray_cluster
    source = make_archive(tmp_path / "src", N_PNG, seed=2)
    common = [str(source), "--model-repository", str(tiny_repo), "--chunk-size", "16"]
    _run([*common, "--out", str(tmp_path / "ray"), "--engine", "ray", "--address", address], env)
    _run([*common, "--out", str(tmp_path / "pool"), "--workers", "2"], env)
    ray_run, pool = store.load_run(tmp_path / "ray"), store.load_run(tmp_path / "pool")
    assert ray_run.manifest.engine == "ray" and pool.manifest.engine == "pool"
    (session,) = ray_run.manifest.extra["sessions"]
    assert session["ray_actors"] == 2 and session["ray_cluster_cpus"] == 2
    # Both nodes did chunks: the work was spread over the cluster, not run on the head alone.
    assert set(session["chunks_per_node"]) == {HEAD_IP, WORKER_IP}, session["chunks_per_node"]
    assert sum(session["chunks_per_node"].values()) == -(-(N_PNG + 7) // 16)
    assert len(ray_run.table) == N_PNG + 4 + 3
    for column in (
        "key",
        "cluster",
        "error_code",
        "top_clusters",
        "view",
        "embedding_row",
        "sop_instance_uid",
    ):
        assert ray_run.table.column(column).equals(pool.table.column(column)), column
    np.testing.assert_allclose(ray_run.embeddings, pool.embeddings, atol=1e-6)
    np.testing.assert_allclose(
        ray_run.table.column("confidence").to_numpy(zero_copy_only=False),
        pool.table.column("confidence").to_numpy(zero_copy_only=False),
        atol=1e-6,
    )
