"""A real tritonserver (the CPU one from PyPI, in its own venv) serving the ``cpu`` variant of the model
repository on 127.0.0.1 and ephemeral ports, against the embedded ONNX Runtime backend.

- the same real (HC18) and phantom images (PNG and DICOM) give the same cluster ids and embeddings within
  1e-4 through ONNX Runtime, Triton over HTTP, Triton over gRPC, and the ``fusc_pipeline`` ensemble over
  gRPC fed the encoded file bytes (decode + clean inside Triton);
- Triton killed during a load: every call answers (BackendUnavailableError within a second, nothing
  else, no hang), and the same backend objects recover when a new server comes up on the same ports;
- the BentoML service on Triton answers 503 while Triton is down and 200 again after, without a restart.

Needs ``make triton-venv`` (.venv-triton, or FUSC_TRITON_VENV); skipped with the reason when it is absent.
Uses the bundled model when its card verifies (it may be rebuilt while tests run), else the tiny one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from service.backends import OnnxRuntimeBackend, TritonBackend
from service.card import ModelCard, load_card
from service.errors import BackendUnavailableError, ModelRepositoryError
from service.pipeline import ClusterResult, Pipeline
from service.triton.repository import (
    BYTES_INPUT,
    PIPELINE_NAME,
    TritonRepositoryOptions,
    write_triton_repository,
)
from service.triton.server import (
    TritonServer,
    TritonServerError,
    default_venv,
    inspect_venv,
    start_cpu_server,
)
from tests.service.conftest import build_tiny_repository

pytestmark = pytest.mark.integration
grpcclient = pytest.importorskip("tritonclient.grpc")

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLED = REPO_ROOT / "model_repository"
HC18 = REPO_ROOT.parent / "shared" / "data" / "hc18" / "images"
N_REAL, N_PHANTOM, N_DICOM = 4, 4, 2
ATOL = 1e-4
# The kill test: load for LOAD_S, kill at KILL_AT_S, a new server on the same ports from RESTART_AT_S.
LOAD_S, KILL_AT_S, RESTART_AT_S = 10.0, 2.5, 4.5
UNAVAILABLE_WITHIN_S = 1.0
# On SIGTERM Triton waits up to 30 s for its clients' idle HTTP keep-alive connections: not worth it here.
STOP_S = 3.0


@pytest.fixture(scope="module")
def triton_venv() -> Path:
    try:
        return inspect_venv(default_venv().resolve()).root
    except TritonServerError as exc:
        pytest.skip(f"no CPU tritonserver: {exc}")


def _write_cpu_repository(out: Path, workdir: Path) -> Path:
    """The cpu variant of the bundled repository; of the tiny one when the bundled card does not verify
    (absent, or mid-rebuild by a training run: the generator checks the source and its own copy)."""
    options = TritonRepositoryOptions(variant="cpu", max_batch_size=16)
    for _ in range(2):
        try:
            write_triton_repository(BUNDLED, out, options, force=True)
            return out
        except ModelRepositoryError:
            time.sleep(2.0)
    tiny = build_tiny_repository(workdir / "tiny")
    write_triton_repository(tiny, out, options, force=True)
    return out


@pytest.fixture(scope="module")
def repository(triton_venv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("triton-repo")
    return _write_cpu_repository(workdir / "cpu", workdir)


@pytest.fixture(scope="module")
def card(repository: Path) -> ModelCard:
    return load_card(repository)


@pytest.fixture(scope="module")
def server(
    repository: Path, triton_venv: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonServer]:
    workdir = tmp_path_factory.mktemp("tritonserver")
    srv = start_cpu_server(repository, venv=triton_venv, workdir=workdir)
    try:
        yield srv
    finally:
        srv.stop(timeout_s=STOP_S)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Encoded files: a few HC18 PNGs (when ../shared/data is there), phantom PNGs and DICOMs."""
    from training.data.phantoms import generate_dataset

    out = generate_dataset(
        tmp_path_factory.mktemp("phantoms"), N_PHANTOM, seed=11, dicom=True, progress=False
    )
    files = (
        sorted((out / "images").glob("*.png"))[:N_PHANTOM] + sorted((out / "dicom").glob("*.dcm"))[:N_DICOM]
    )
    files += sorted(HC18.glob("*.png"))[:N_REAL]
    return {f"{f.parent.parent.name}/{f.name}": f.read_bytes() for f in files}


def _ensemble(url: str, data: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    client = grpcclient.InferenceServerClient(url)
    batch = np.array([[d] for d in data], dtype=object)
    inp = grpcclient.InferInput(BYTES_INPUT, list(batch.shape), "BYTES")
    inp.set_data_from_numpy(batch)
    result = client.infer(PIPELINE_NAME, [inp], client_timeout=60)
    return result.as_numpy("embedding"), result.as_numpy("probs")


def test_every_path_gives_the_same_answer(
    repository: Path, card: ModelCard, server: TritonServer, images: dict[str, bytes]
) -> None:
    data = list(images.values())
    reference = Pipeline(card, OnnxRuntimeBackend(repository, card), repository=repository)
    x = np.stack([reference.prepare(d).tensor for d in data])
    emb = reference.backend.embed(x)
    probs = reference.backend.assign(emb)
    clusters = probs.argmax(axis=1)

    answers: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
        backend = TritonBackend(card, url=url, protocol=protocol)
        assert backend.ready()
        e = backend.embed(x)
        answers[f"triton {protocol}"] = (e, backend.assign(e))
        # The whole service pipeline on this backend: same clusters as the embedded one.
        results = Pipeline(card, backend, repository=repository).cluster(data)
        assert all(isinstance(r, ClusterResult) for r in results)
        assert [r.cluster for r in results] == clusters.tolist()  # type: ignore[union-attr]
    answers["ensemble grpc (bytes)"] = _ensemble(server.grpc_url, data)

    for path, (e, p) in answers.items():
        assert e.shape == emb.shape and p.shape == probs.shape, path
        np.testing.assert_allclose(e, emb, atol=ATOL, rtol=0, err_msg=path)
        np.testing.assert_allclose(p, probs, atol=ATOL, rtol=0, err_msg=path)
        assert p.argmax(axis=1).tolist() == clusters.tolist(), path


def test_the_ensemble_answers_a_bad_file_with_the_service_error_code(server: TritonServer) -> None:
    with pytest.raises(grpcclient.InferenceServerException) as info:
        _ensemble(server.grpc_url, [b"GIF89a not an image we read"])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "unsupported_format" in info.value.message()


@dataclass
class Call:
    start: float
    end: float
    outcome: str  # "ok", "unavailable", or the name of any other exception
    detail: str = ""


def _load(backend: TritonBackend, x: np.ndarray, stop: threading.Event, calls: list[Call]) -> None:
    while not stop.is_set():
        start = time.monotonic()
        detail = ""
        try:
            backend.assign(backend.embed(x))
            outcome = "ok"
        except BackendUnavailableError as exc:
            outcome, detail = "unavailable", exc.message
        except Exception as exc:  # anything else is a failure of the test
            outcome, detail = type(exc).__name__, str(exc)
        calls.append(Call(start, time.monotonic(), outcome, detail))
        # A short pause: the point is a steady stream of calls, not to take the cores from others.
        time.sleep(0.02 if outcome == "ok" else 0.05)


def test_a_killed_triton_answers_unavailable_and_the_backend_recovers(
    repository: Path, card: ModelCard, triton_venv: Path, tmp_path: Path
) -> None:
    started = time.monotonic()
    first = start_cpu_server(repository, venv=triton_venv, workdir=tmp_path)
    ports = {"http_port": first.http_port, "grpc_port": first.grpc_port, "metrics_port": first.metrics_port}
    backends = {
        "http": TritonBackend(card, url=first.http_url, protocol="http", timeout_s=5.0),
        "grpc": TritonBackend(card, url=first.grpc_url, protocol="grpc", timeout_s=5.0),
    }
    size = card.preprocess.size
    x = np.random.default_rng(0).normal(size=(4, 1, size, size)).astype(np.float32)
    stop = threading.Event()
    calls: dict[str, list[Call]] = {f"{p}-{i}": [] for p in backends for i in range(2)}
    threads = [
        threading.Thread(target=_load, args=(backends[name.split("-")[0]], x, stop, calls[name]), daemon=True)
        for name in calls
    ]
    second: TritonServer | None = None
    t0 = time.monotonic()
    try:
        for t in threads:
            t.start()
        time.sleep(KILL_AT_S)
        killed_at = time.monotonic()
        first.kill()
        time.sleep(max(0.0, RESTART_AT_S - (time.monotonic() - t0)))
        assert not any(b.ready() for b in backends.values()), "ready while Triton is down"
        restart_at = time.monotonic()
        second = start_cpu_server(repository, venv=triton_venv, workdir=tmp_path, **ports)
        back_at = time.monotonic()
        time.sleep(max(1.5, LOAD_S - (back_at - t0)))
        ready_again = all(b.ready() for b in backends.values())
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
        if second is not None:
            second.stop(timeout_s=STOP_S)
        first.kill()
    assert not any(t.is_alive() for t in threads), "a load thread hangs"

    for name, log in calls.items():
        outcomes = {c.outcome for c in log}
        assert outcomes <= {"ok", "unavailable"}, f"{name}: {outcomes}"
        assert max(c.end - c.start for c in log) < UNAVAILABLE_WITHIN_S + 0.5, f"{name}: a call hung"
        before = [c for c in log if c.end < killed_at]
        down = [c for c in log if killed_at + UNAVAILABLE_WITHIN_S < c.start and c.end < restart_at]
        after = [c for c in log if c.start > back_at]
        failed = [c.detail for c in before if c.outcome != "ok"]
        assert before and not failed, f"{name}: failed before the kill: {failed[:3]}"
        assert down and all(c.outcome == "unavailable" for c in down), f"{name}: answered while down"
        first_unavailable = min(c.end for c in log if c.outcome == "unavailable")
        assert first_unavailable - killed_at < UNAVAILABLE_WITHIN_S, f"{name}: slow to notice the kill"
        # The same backend object serves again once the new server is up: no restart, no new client.
        assert any(c.outcome == "ok" for c in after), f"{name}: never recovered"
        recovered = min(c.end for c in after if c.outcome == "ok")
        assert recovered - back_at < 2.0, f"{name}: recovered {recovered - back_at:.1f} s after Triton"
    assert ready_again, "not ready after Triton came back"
    print(f"first start {t0 - started:.1f} s, restart {back_at - restart_at:.1f} s (tritonserver on CPU)")


def test_the_service_on_triton_answers_503_while_it_is_down(
    repository: Path, card: ModelCard, images: dict[str, bytes], triton_venv: Path, tmp_path: Path
) -> None:
    """The BentoML service with FUSC_BACKEND=triton: 503 backend_unavailable with Retry-After and an unready
    /readyz within a second or two of losing Triton, then 200s again without a restart of the service."""
    import httpx

    from tests.integration.conftest import start_server

    name, data = next(iter(images.items()))
    reference = Pipeline(card, OnnxRuntimeBackend(repository, card), repository=repository).cluster([data])[0]
    assert isinstance(reference, ClusterResult)
    triton = start_cpu_server(repository, venv=triton_venv, workdir=tmp_path / "triton")
    ports = {
        "http_port": triton.http_port,
        "grpc_port": triton.grpc_port,
        "metrics_port": triton.metrics_port,
    }
    env = {"FUSC_BACKEND": "triton", "FUSC_TRITON_URL": triton.http_url, "FUSC_TRITON_PROTOCOL": "http"}
    service = start_server(repository, tmp_path, env)
    restarted: TritonServer | None = None
    try:
        url = next(service).url

        def cluster() -> httpx.Response:
            return httpx.post(f"{url}/v1/cluster", files={"image": ("upload", data, "image/png")}, timeout=10)

        first = cluster()
        assert first.status_code == 200, first.text
        assert first.json()["cluster"] == reference.cluster, name

        triton.kill()
        t0 = time.monotonic()
        down = cluster()
        assert time.monotonic() - t0 < UNAVAILABLE_WITHIN_S
        assert down.status_code == 503 and down.json()["error"]["code"] == "backend_unavailable", down.text
        assert int(down.headers["Retry-After"]) >= 1
        deadline = time.monotonic() + 3.0
        while httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
            assert time.monotonic() < deadline, "/readyz still 200 with Triton down"
            time.sleep(0.2)

        restarted = start_cpu_server(repository, venv=triton_venv, workdir=tmp_path / "triton", **ports)
        deadline = time.monotonic() + 3.0
        while (again := cluster()).status_code != 200:
            assert again.status_code == 503 and time.monotonic() < deadline, again.text
            time.sleep(0.2)
        assert again.json()["cluster"] == reference.cluster
        deadline = time.monotonic() + 3.0
        while httpx.get(f"{url}/readyz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "/readyz not 200 again after Triton came back"
            time.sleep(0.2)
    finally:
        service.close()
        triton.kill()
        if restarted is not None:
            restarted.stop(timeout_s=STOP_S)
