"""End to end: the real BentoML server answers exactly what onnxruntime gives on the same preprocessed input.

Needs: the project venv (bentoml, onnxruntime), a free loopback port, ~5 s per server start. The HC18 check
needs the shared data folder (``FUSC_TEST_DATA``, default ``/work/shared/data``) and is skipped without it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from service.card import load_card
from tests.integration.conftest import Server, start_server
from tests.service.conftest import (
    build_tiny_repository,
    expected_view,
    png_bytes,
    reference_probs,
    synthetic_frame,
)

pytestmark = pytest.mark.integration

DATA_ROOT = Path(os.environ.get("FUSC_TEST_DATA", "/work/shared/data"))
TEXT = b"this is a plain text file, not an image\n" * 4
TIMEOUT = httpx.Timeout(30.0)


def hc18_image() -> bytes:
    images = DATA_ROOT / "hc18" / "images"
    preferred = images / "train_100_HC.png"
    if preferred.is_file():
        return preferred.read_bytes()
    candidates = sorted(images.glob("*.png")) if images.is_dir() else []
    if not candidates:
        pytest.skip(f"no HC18 images under {images}: the shared data folder is absent")
    return candidates[0].read_bytes()


def phantom_image(view: str = "brain", seed: int = 7) -> bytes:
    try:
        from training.data.phantoms import generate
    except ImportError:  # the phantom generator is optional for the service; fall back to a plain drawing
        return png_bytes(synthetic_frame(seed, 240, 320))
    return png_bytes(generate(seed, view).image)


def post_image(server: Server, data: bytes, content_type: str = "image/png") -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/cluster", files={"image": ("upload", data, content_type)}, timeout=TIMEOUT
    )


def assert_matches_reference(server: Server, body: dict, data: bytes) -> None:
    ref = reference_probs(server.repository, data)
    assert body["cluster"] == int(np.argmax(ref))
    assert abs(body["confidence"] - float(ref.max())) <= 1e-5
    assert [t["cluster"] for t in body["top"]] == [int(c) for c in np.argsort(-ref, kind="stable")[:3]]
    for t in body["top"]:
        assert abs(t["probability"] - float(ref[t["cluster"]])) <= 1e-5
    card = load_card(server.repository)
    assert body["model_version"] == card.version
    assert (body["view"], body["view_reason"]) == expected_view(card, body)
    if body["ood"]:
        assert all(t["view"] is None for t in body["top"])


def test_real_hc18_image_matches_onnxruntime(server: Server) -> None:
    data = hc18_image()
    r = post_image(server, data)
    assert r.status_code == 200, r.text
    assert_matches_reference(server, r.json(), data)


@pytest.mark.parametrize("view", ["brain", "abdomen", "femur"])
def test_phantom_matches_onnxruntime(server: Server, view: str) -> None:
    data = phantom_image(view)
    r = post_image(server, data)
    assert r.status_code == 200, r.text
    assert_matches_reference(server, r.json(), data)


def test_bad_inputs_are_4xx_json_and_the_server_keeps_serving(server: Server) -> None:
    good = phantom_image("femur", 3)
    r = post_image(server, good[: len(good) // 2])
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "truncated_image"
    r = post_image(server, TEXT, "text/plain")
    assert r.status_code == 415
    assert r.json()["error"]["code"] == "unsupported_format"
    r = httpx.post(f"{server.url}/v1/cluster", files={"note": (None, "no file")}, timeout=TIMEOUT)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "missing_field"
    r = post_image(server, good)
    assert r.status_code == 200, r.text
    assert_matches_reference(server, r.json(), good)


def test_batch_endpoint_matches_single_calls(server: Server) -> None:
    images = [phantom_image("brain", 11), TEXT, phantom_image("abdomen", 12)]
    files = [("images", (f"f{i}", data, "application/octet-stream")) for i, data in enumerate(images)]
    r = httpx.post(f"{server.url}/v1/cluster/batch", files=files, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert results[1]["error"]["code"] == "unsupported_format"
    for i in (0, 2):
        assert_matches_reference(server, results[i], images[i])


def test_concurrent_requests_all_answer_exactly(server: Server) -> None:
    """Many callers at once share model batches; batching must not change any answer."""
    images = [png_bytes(cv2.flip(synthetic_frame(s, 240, 320), 1)) for s in range(6)]
    refs = [reference_probs(server.repository, d) for d in images]

    async def run() -> list[httpx.Response]:
        # 32 at a time: within the admission limits, so every call must be answered (not shed).
        gate = asyncio.Semaphore(32)
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as client:

            async def call(i: int) -> httpx.Response:
                async with gate:
                    files = {"image": ("u", images[i % len(images)], "image/png")}
                    return await client.post("/v1/cluster", files=files)

            return await asyncio.gather(*(call(i) for i in range(120)))

    for i, r in enumerate(asyncio.run(run())):
        assert r.status_code == 200, r.text
        ref = refs[i % len(images)]
        assert r.json()["cluster"] == int(np.argmax(ref))
        assert abs(r.json()["confidence"] - float(ref.max())) <= 1e-5


def test_model_and_metrics_endpoints(server: Server) -> None:
    assert post_image(server, phantom_image("brain", 5)).status_code == 200
    r = httpx.get(f"{server.url}/v1/model", timeout=TIMEOUT)
    assert r.status_code == 200
    card = load_card(server.repository)
    assert r.json()["version"] == card.version
    assert r.json()["num_clusters"] == card.num_clusters
    text = httpx.get(f"{server.url}/metrics", timeout=TIMEOUT).text
    for family in (
        "fusc_stage_latency_seconds",
        "fusc_cluster_assignments_total",
        "fusc_batch_size",
        "fusc_confidence",
        "fusc_requests_total",
        "fusc_model_info",
    ):
        assert family in text, family
    assert 'fusc_stage_latency_seconds_count{stage="embed"}' in text


def test_tampered_repository_leaves_the_server_alive_but_unready(tmp_path: Path) -> None:
    repo = build_tiny_repository(tmp_path / "model_repository")
    with open(load_card(repo).backbone.path(repo), "ab") as f:
        f.write(b"\0")  # changed after export: the card's SHA-256 no longer matches
    servers = start_server(repo, tmp_path, probe="/livez")
    server = next(servers)
    try:
        assert httpx.get(f"{server.url}/readyz", timeout=TIMEOUT).status_code == 503
        r = post_image(server, phantom_image("brain", 1))
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "model_not_loaded"
        assert int(r.headers["retry-after"]) > 0
        assert httpx.get(f"{server.url}/v1/model", timeout=TIMEOUT).status_code == 503
        assert "SHA-256" in server.log.read_text(errors="replace")  # the operator learns why
    finally:
        servers.close()  # runs start_server's finally: the server is stopped


def _open_request(server: Server, content_length: int, body: bytes = b"") -> socket.socket:
    """A POST /v1/cluster whose headers are sent with ``body`` (a first part of it, or nothing)."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    head = (
        f"POST /v1/cluster HTTP/1.1\r\nHost: {host}\r\n"
        "Content-Type: multipart/form-data; boundary=fuscboundary\r\n"
        f"Content-Length: {content_length}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def _status_and_headers(sock: socket.socket) -> tuple[int, str]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    return int(head.split()[1]), head.lower()


def test_admission_answers_before_the_body_is_read(tmp_path: Path) -> None:
    """Requests over the limits are answered 503 overloaded (with Retry-After) from their headers alone,
    while admitted requests still hold their places; the server serves normally afterwards."""
    repo = build_tiny_repository(tmp_path / "model_repository")
    env = {
        "FUSC_MAX_CONCURRENT_REQUESTS": "2",
        "FUSC_MAX_REQUEST_BYTES": "1000000",
        "FUSC_MAX_INFLIGHT_BYTES": "1500000",
        "FUSC_MAX_BATCH_FILES": "4",
    }
    servers = start_server(repo, tmp_path, env)
    server = next(servers)
    held: list[socket.socket] = []
    try:
        held.append(_open_request(server, 900_000, b"--fuscboundary\r\n"))  # admitted, body never finished
        time.sleep(0.5)
        over_bytes = _open_request(server, 700_000)  # 900k + 700k > 1.5 MB: no byte of its body is sent
        status, head = _status_and_headers(over_bytes)
        assert status == 503 and "retry-after:" in head, head
        held.append(_open_request(server, 100, b"--fuscboundary\r\n"))
        time.sleep(0.5)
        over_requests = _open_request(server, 100)
        status, head = _status_and_headers(over_requests)
        assert status == 503 and "retry-after:" in head, head
        over_bytes.close(), over_requests.close()
        for sock in held:
            sock.close()  # the held requests end (client gone): their places come back
        time.sleep(0.5)
        r = post_image(server, phantom_image("brain", 2))
        assert r.status_code == 200, r.text
        metrics = httpx.get(f"{server.url}/metrics", timeout=TIMEOUT).text
        assert 'fusc_errors_total{code="overloaded"} 2.0' in metrics
        assert "fusc_inflight_requests 0.0" in metrics
    finally:
        for sock in held:
            sock.close()
        servers.close()


def test_docs_and_openapi_from_the_real_server(server: Server) -> None:
    doc = httpx.get(f"{server.url}/docs.json", timeout=TIMEOUT).json()
    assert {"/v1/cluster", "/v1/cluster/batch", "/v1/embed", "/v1/model"} <= set(doc["paths"])
    page = httpx.get(f"{server.url}/", timeout=TIMEOUT)
    assert page.status_code == 200 and "<script" not in page.text.lower()
    r = httpx.get(f"{server.url}/readyz", timeout=TIMEOUT)
    assert r.status_code == 200
    r = httpx.post(f"{server.url}/v1/embed", files={"image": ("u", phantom_image("femur", 4), "image/png")})
    assert r.status_code == 200 and abs(np.linalg.norm(r.json()["embedding"]) - 1.0) < 1e-5


def test_worker_processes_answer_exactly_and_survive_a_killed_worker(tmp_path: Path) -> None:
    """FUSC_PREPROCESS_MODE=processes: decode + clean in worker processes of the real server; the answers
    are the ones onnxruntime gives, and a worker killed by the kernel costs no answer and no restart."""
    import psutil

    repo = build_tiny_repository(tmp_path / "repo")
    images = [png_bytes(synthetic_frame(s, 480, 640)) for s in range(4)]
    refs = [reference_probs(repo, d) for d in images]
    env = {"FUSC_PREPROCESS_MODE": "processes", "FUSC_PREPROCESS_THREADS": "2"}
    servers = start_server(repo, tmp_path, env)
    server = next(servers)
    try:

        def check_all() -> None:
            for data, ref in zip(images, refs, strict=True):
                r = post_image(server, data)
                assert r.status_code == 200, r.text
                assert r.json()["cluster"] == int(np.argmax(ref))
                assert abs(r.json()["confidence"] - float(ref.max())) <= 1e-5

        check_all()
        workers = []  # this server's worker processes: spawned children that carry its environment
        for p in psutil.process_iter():
            try:
                if "multiprocessing.spawn" in " ".join(p.cmdline()) and p.environ().get(
                    "FUSC_MODEL_REPOSITORY"
                ) == str(repo):
                    workers.append(p)
            except psutil.Error:
                continue
        assert len(workers) >= 2, [p.cmdline() for p in workers]
        workers[0].kill()
        check_all()
        assert httpx.get(f"{server.url}/readyz", timeout=TIMEOUT).status_code == 200
    finally:
        servers.close()
