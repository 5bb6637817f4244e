"""External tools the deploy tests run, and the rule for when one is missing.

Locally a missing tool skips its tests with the package to install; in CI (the ``CI`` variable set) it
fails them, so that a runner without the tool cannot pass by skipping the checks.
"""

from __future__ import annotations

import importlib
import os
import shutil
import socket
import subprocess
from types import ModuleType

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(what: str, install: str) -> None:
    message = f"{what} is not available: {install}"
    if in_ci():
        pytest.fail(f"{message} (CI is set, so a missing tool is a failure, not a skip)", pytrace=False)
    pytest.skip(message)


def require_executable(name: str, debian_package: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing(f"the executable '{name}'", f"apt-get install -y {debian_package}")
    return str(path)


def require_module(name: str, pip_package: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(f"the Python module '{name}'", f"pip install {pip_package}")
        raise  # unreachable: missing() always raises


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate a server started by a test; kill it if it does not exit in time."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
