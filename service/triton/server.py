"""The CPU ``tritonserver`` from PyPI (``nvidia-pytriton``), started as a subprocess on 127.0.0.1.

For development and the integration tests; production runs the NGC image (docs/triton.md). The wheel
bundles a real Triton (Python backend only) under ``site-packages/pytriton/tritonserver``; it lives in its
own venv (``make triton-venv`` -> ``.venv-triton``) because nvidia-pytriton pins numpy<2. The recipe:

- a server folder made once per venv (``<venv>/fusc-tritonserver``): a copy of ``pytriton/tritonserver``
  with the stub for the venv's Python version in ``backends/python/``;
- ``LD_LIBRARY_PATH``: the wheel's ``nvidia_pytriton.libs`` and the venv Python's ``LIBDIR``;
- the venv's ``bin`` first on ``PATH``: the Python stub finds its interpreter (and so numpy, onnxruntime,
  OpenCV of that venv) through ``python3``.

The process runs in its own session, so :meth:`TritonServer.kill` takes the Python stubs with it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from service.localserver import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VENV = REPO_ROOT / ".venv-triton"
VENV_ENV = "FUSC_TRITON_VENV"
SERVER_DIR = "fusc-tritonserver"
READY_TIMEOUT_S = 60.0


class TritonServerError(RuntimeError):
    """The CPU tritonserver is not installed, or did not become ready."""


@dataclass(frozen=True)
class TritonVenv:
    root: Path
    site_packages: Path
    libdir: str
    python_version: str  # "3.11"

    @property
    def bundle(self) -> Path:
        return self.site_packages / "pytriton" / "tritonserver"


def default_venv() -> Path:
    return Path(os.environ.get(VENV_ENV) or DEFAULT_VENV)


@lru_cache(maxsize=4)
def inspect_venv(root: Path) -> TritonVenv:
    """The venv's site-packages, Python LIBDIR and version; TritonServerError when it lacks the server."""
    python = root / "bin" / "python"
    if not python.exists():
        raise TritonServerError(f"no Triton venv at {root}: run `make triton-venv`")
    probe = (
        "import json, sys, sysconfig; print(json.dumps([sysconfig.get_paths()['purelib'], "
        "sysconfig.get_config_var('LIBDIR'), '%d.%d' % sys.version_info[:2]]))"
    )
    out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True, timeout=30)
    site, libdir, version = json.loads(out.stdout)
    venv = TritonVenv(Path(root), Path(site), libdir or "", version)
    if not (venv.bundle / "bin" / "tritonserver").is_file():
        raise TritonServerError(
            f"{root} has no nvidia-pytriton (pytriton/tritonserver): run `make triton-venv`"
        )
    return venv


def server_dir(venv: TritonVenv) -> Path:
    """``<venv>/fusc-tritonserver``: made once (atomically), reused by every start."""
    target = venv.root / SERVER_DIR
    if (target / "backends" / "python" / "triton_python_backend_stub").is_file():
        return target
    stub = venv.bundle / "python_backend_stubs" / venv.python_version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonServerError(
            f"nvidia-pytriton has no Python backend stub for Python {venv.python_version}"
        )
    staging = venv.root / f".{SERVER_DIR}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(venv.bundle, staging, ignore=shutil.ignore_patterns("python_backend_stubs"))
    shutil.copy2(stub, staging / "backends" / "python" / "triton_python_backend_stub")
    try:
        staging.rename(target)
    except OSError:  # another process made it first
        shutil.rmtree(staging, ignore_errors=True)
    return target


@dataclass
class TritonServer:
    """A running tritonserver; ``http_url``/``grpc_url`` are ``host:port`` as tritonclient takes them."""

    process: subprocess.Popen[bytes]
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int
    log: Path
    repository: Path

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def ready(self, timeout_s: float = 1.0) -> bool:
        try:
            url = f"http://{self.http_url}/v2/health/ready"
            with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (loopback)
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if self.process.poll() is not None:
                raise TritonServerError(
                    f"tritonserver exited with {self.process.returncode} before it was ready:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise TritonServerError(f"tritonserver not ready within {timeout_s:.0f} s:\n{self.tail()}")
            time.sleep(0.1)

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _signal(self, sig: int, wait_s: float) -> bool:
        if self.process.poll() is not None:
            return True
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            return True
        try:
            self.process.wait(timeout=wait_s)
            return True
        except subprocess.TimeoutExpired:
            return False

    def terminate(self) -> None:
        """SIGTERM without waiting (from a signal handler, while another frame waits for the process)."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL the server and its Python stubs at once (a crash, as the tests need it)."""
        self._signal(signal.SIGKILL, 10.0)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (Triton drains in-flight requests), then SIGKILL if it does not exit in time."""
        if not self._signal(signal.SIGTERM, timeout_s):
            self.kill()


def start_cpu_server(
    repository: Path,
    *,
    venv: Path | None = None,
    workdir: Path,
    host: str = "127.0.0.1",
    http_port: int | None = None,
    grpc_port: int | None = None,
    metrics_port: int | None = None,
    wait: bool = True,
    ready_timeout_s: float = READY_TIMEOUT_S,
    log_verbose: int = 0,
) -> TritonServer:
    """Start the CPU tritonserver of ``venv`` on ``repository`` (a ``cpu`` variant); ports default to free
    ephemeral ones. With ``wait``, return once ``/v2/health/ready`` answers 200 (every model ready)."""
    info = inspect_venv(Path(venv or default_venv()).resolve())
    folder = server_dir(info)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ports = [p or free_port(host) for p in (http_port, grpc_port, metrics_port)]
    libs = [str(info.site_packages / "nvidia_pytriton.libs"), info.libdir]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "FUSC_"))}
    env["LD_LIBRARY_PATH"] = ":".join(
        [p for p in libs if p] + [os.environ.get("LD_LIBRARY_PATH", "")]
    ).rstrip(":")
    env["PATH"] = f"{info.root / 'bin'}:{os.environ.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(info.root)
    cmd = [
        str(folder / "bin" / "tritonserver"),
        f"--model-repository={Path(repository).resolve()}",
        f"--backend-directory={folder / 'backends'}",
        f"--cache-directory={folder / 'caches'}",
        f"--http-address={host}",
        f"--grpc-address={host}",
        f"--metrics-address={host}",
        f"--http-port={ports[0]}",
        f"--grpc-port={ports[1]}",
        f"--metrics-port={ports[2]}",
        "--allow-gpu-metrics=false",
        "--strict-readiness=true",
        "--exit-on-error=true",
        f"--log-verbose={log_verbose}",
    ]
    log = workdir / f"tritonserver-{ports[0]}.log"
    # cwd is the work folder: the Python stub puts its cwd on sys.path, and a project checkout there
    # would shadow the service modules copied into fusc_preprocess.
    with open(log, "ab") as log_file:
        process = subprocess.Popen(
            cmd, cwd=workdir, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = TritonServer(process, host, *ports, log=log, repository=Path(repository))
    if wait:
        server.wait_ready(ready_timeout_s)
    return server
