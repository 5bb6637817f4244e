"""Integration fixtures: the real ``bentoml serve`` process on 127.0.0.1 and an ephemeral port.

One server per model repository under test: the tiny fixture repository always, and the bundled
``model_repository/`` when it holds a model card. The server is always stopped in the finalizer.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from service.card import CARD_FILENAME
from service.localserver import free_port, stop_process_group
from tests.service.conftest import build_tiny_repository

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLED_REPOSITORY = REPO_ROOT / "model_repository"
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "integration: starts real servers as subprocesses on 127.0.0.1 (slow, seconds each)"
    )


@dataclass(frozen=True)
class Server:
    url: str
    repository: Path
    log: Path


def _bentoml_command() -> list[str]:
    script = Path(sys.executable).with_name("bentoml")
    return [str(script)] if script.exists() else [sys.executable, "-m", "bentoml"]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start_server(
    repository: Path, workdir: Path, extra_env: dict[str, str] | None = None, *, probe: str = "/readyz"
) -> Iterator[Server]:
    """Start ``bentoml serve service.api:FuscService`` on a free port, wait for ``probe``, yield, stop."""
    port = free_port()
    log = workdir / f"server-{port}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FUSC_", "PROMETHEUS_MULTIPROC_DIR"))}
    env.update(
        {
            "FUSC_MODEL_REPOSITORY": str(repository),
            "PYTHONPATH": str(REPO_ROOT),
            "BENTOML_HOME": str(workdir / "bentoml_home"),
            "BENTOML_DO_NOT_TRACK": "True",
            **(extra_env or {}),
        }
    )
    cmd = [
        *_bentoml_command(),
        "serve",
        "service.api:FuscService",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode} before it was ready:\n{_tail(log)}")
            try:
                if httpx.get(f"{url}{probe}", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{probe} did not answer 200 within {READY_TIMEOUT_S:.0f} s:\n{_tail(log)}")
            time.sleep(0.25)
        yield Server(url=url, repository=repository, log=log)
    finally:
        stop_process_group(proc, term_wait_s=STOP_TIMEOUT_S)


def _repository_params() -> list[object]:
    params: list[object] = [pytest.param("tiny", id="tiny")]
    if (BUNDLED_REPOSITORY / CARD_FILENAME).is_file():
        params.append(pytest.param("bundled", id="bundled"))
    return params


@pytest.fixture(scope="module", params=_repository_params())
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp(f"server-{request.param}")
    if request.param == "tiny":
        repository = build_tiny_repository(workdir / "model_repository")
    else:
        repository = BUNDLED_REPOSITORY
    yield from start_server(repository, workdir)
