"""service.backends.TritonBackend without a server: chosen by FUSC_BACKEND=triton, and a Triton that is
down, or that accepts connections and never answers, gives BackendUnavailableError (503) quickly on both
protocols instead of a hang. The real server is exercised in tests/integration/test_triton.py."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from service.backends import BackendNotSupportedError, TritonBackend, make_backend
from service.card import load_card
from service.errors import BackendUnavailableError
from service.settings import Settings

pytest.importorskip("tritonclient.grpc")
pytest.importorskip("tritonclient.http")

PROTOCOLS = ["http", "grpc"]


@pytest.fixture
def closed_port() -> int:
    """A loopback port where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts connections (the kernel's backlog) and never answers a byte."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield int(s.getsockname()[1])


def test_settings_choose_the_triton_backend_and_its_protocol(tiny_repo: Path) -> None:
    settings = Settings.from_env(
        {
            "FUSC_MODEL_REPOSITORY": str(tiny_repo),
            "FUSC_BACKEND": "triton",
            "FUSC_TRITON_URL": "127.0.0.1:8001",
            "FUSC_TRITON_PROTOCOL": "grpc",
            "FUSC_TRITON_TIMEOUT_S": "2.5",
        }
    )
    # Making the backend contacts nothing: the service may start before Triton does.
    backend = make_backend(settings, load_card(tiny_repo))
    assert isinstance(backend, TritonBackend)
    assert backend.describe()["protocol"] == "grpc" and backend.describe()["url"] == "127.0.0.1:8001"
    assert Settings().triton_protocol == "http"
    with pytest.raises(BackendNotSupportedError):
        TritonBackend(load_card(tiny_repo), url="127.0.0.1:8000", protocol="websocket")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_server_that_is_down_is_unavailable_at_once(
    tiny_repo: Path, closed_port: int, protocol: str
) -> None:
    card = load_card(tiny_repo)
    backend = TritonBackend(card, url=f"127.0.0.1:{closed_port}", protocol=protocol)
    t0 = time.monotonic()
    assert backend.ready() is False
    x = np.zeros((2, 1, card.preprocess.size, card.preprocess.size), np.float32)
    for call, arg in ((backend.embed, x), (backend.assign, np.zeros((2, card.embedding_dim), np.float32))):
        with pytest.raises(BackendUnavailableError) as info:
            call(arg)
        assert info.value.code == "backend_unavailable" and info.value.http_status == 503
    assert time.monotonic() - t0 < 2.0


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_server_that_never_answers_times_out(tiny_repo: Path, silent_port: int, protocol: str) -> None:
    card = load_card(tiny_repo)
    backend = TritonBackend(
        card, url=f"127.0.0.1:{silent_port}", protocol=protocol, timeout_s=0.5, connect_timeout_s=0.3
    )
    t0 = time.monotonic()
    assert backend.ready() is False
    assert time.monotonic() - t0 < 2.0
    # The readiness answer is kept for a moment: /readyz probes do not pile up on a sick server.
    t1 = time.monotonic()
    assert backend.ready() is False and time.monotonic() - t1 < 0.1
    x = np.zeros((1, 1, card.preprocess.size, card.preprocess.size), np.float32)
    t2 = time.monotonic()
    with pytest.raises(BackendUnavailableError):
        backend.embed(x)
    assert time.monotonic() - t2 < 2.0
