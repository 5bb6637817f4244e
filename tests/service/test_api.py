"""The BentoML service in-process: its ASGI app (``FuscService.to_asgi()``) under Starlette's TestClient.

The app is the one ``bentoml serve`` runs, lifespan included, so the model call goes through BentoML's
adaptive batcher exactly as in the server; only the sockets are missing.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import bentoml
import numpy as np
import pytest

with warnings.catch_warnings():
    # Starlette 1.x nudges towards httpx2 for its TestClient; httpx is what this environment has.
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from service.api import FuscService
from service.card import CARD_FILENAME
from tests.service.conftest import TINY_K, TINY_VERSION, BrokenBackend, reference_probs

TEXT = b"this is a plain text file, not an image\n" * 4
MAX_UPLOAD = 300_000  # small, so that the size limit can be hit cheaply
MAX_BATCH = 4


@pytest.fixture(scope="module")
def client(tiny_repo: Path) -> Iterator[TestClient]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FUSC_MODEL_REPOSITORY", str(tiny_repo))
        mp.setenv("FUSC_MAX_UPLOAD_BYTES", str(MAX_UPLOAD))
        mp.setenv("FUSC_MAX_BATCH_FILES", str(MAX_BATCH))
        mp.setenv("FUSC_RETRY_AFTER_S", "7")
        with TestClient(FuscService.to_asgi(), raise_server_exceptions=False) as c:
            yield c


def post_one(client: TestClient, data: bytes, content_type: str = "image/png") -> tuple[int, dict]:
    # The file name is arbitrary on purpose: the service must never read it.
    r = client.post("/v1/cluster", files={"image": ("upload.bin", data, content_type)})
    assert r.headers["content-type"].startswith("application/json")
    return r.status_code, r.json()


def assert_error(status: int, body: dict, expected_status: int, code: str) -> None:
    assert status == expected_status, body
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def test_health_endpoints(client: TestClient) -> None:
    for path in ("/readyz", "/livez", "/healthz"):
        assert client.get(path).status_code == 200


def test_cluster_one_image(client: TestClient, tiny_repo: Path, good_png: bytes) -> None:
    status, body = post_one(client, good_png)
    assert status == 200, body
    assert set(body) == {
        "cluster",
        "confidence",
        "top",
        "view",
        "view_reason",
        "ood",
        "ood_score",
        "model_version",
        "timings_ms",
    }
    ref = reference_probs(tiny_repo, good_png)
    assert body["cluster"] == int(np.argmax(ref))
    assert body["confidence"] == pytest.approx(float(ref.max()), abs=1e-5)
    assert body["model_version"] == TINY_VERSION
    assert len(body["top"]) == 3
    assert body["top"][0]["cluster"] == body["cluster"]
    for item in body["top"]:
        assert item["probability"] == pytest.approx(float(ref[item["cluster"]]), abs=1e-5)
    assert set(body["timings_ms"]) == {"decode", "clean", "embed", "assign"}


def test_cluster_batch_keeps_order(
    client: TestClient, tiny_repo: Path, good_png: bytes, other_pngs: list[bytes]
) -> None:
    images = [good_png, good_png[: len(good_png) // 2], other_pngs[1]]
    files = [("images", (f"f{i}", data, "image/png")) for i, data in enumerate(images)]
    r = client.post("/v1/cluster/batch", files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 3
    assert results[1] == {"error": {"code": "truncated_image", "message": results[1]["error"]["message"]}}
    for i in (0, 2):
        ref = reference_probs(tiny_repo, images[i])
        assert results[i]["cluster"] == int(np.argmax(ref))
        assert results[i]["confidence"] == pytest.approx(float(ref.max()), abs=1e-5)


def test_batch_of_only_bad_images_is_200_with_errors(client: TestClient) -> None:
    files = [("images", ("a", TEXT, "text/plain")), ("images", ("b", b"", "image/png"))]
    r = client.post("/v1/cluster/batch", files=files)
    assert r.status_code == 200
    assert [x["error"]["code"] for x in r.json()["results"]] == ["unsupported_format", "empty_input"]


def test_truncated_png_is_400(client: TestClient, good_png: bytes) -> None:
    assert_error(*post_one(client, good_png[: len(good_png) - 40]), 400, "truncated_image")


def test_text_file_is_415(client: TestClient) -> None:
    assert_error(*post_one(client, TEXT, "text/plain"), 415, "unsupported_format")


def test_empty_upload_is_400(client: TestClient) -> None:
    assert_error(*post_one(client, b""), 400, "empty_input")


def test_missing_field_is_400(client: TestClient, good_png: bytes) -> None:
    r = client.post("/v1/cluster", files={"picture": ("x", good_png, "image/png")})
    assert_error(r.status_code, r.json(), 400, "missing_field")
    r = client.post("/v1/cluster/batch", files={"image": ("x", good_png, "image/png")})
    assert_error(r.status_code, r.json(), 400, "missing_field")


def test_text_value_instead_of_file_is_400(client: TestClient) -> None:
    r = client.post("/v1/cluster", files={"image": (None, "not a file")})
    assert_error(r.status_code, r.json(), 400, "bad_request")


def test_not_multipart_is_415(client: TestClient, good_png: bytes) -> None:
    r = client.post("/v1/cluster", json={"image": "aGVsbG8="})
    assert_error(r.status_code, r.json(), 415, "unsupported_media_type")
    r = client.post("/v1/cluster", content=good_png, headers={"content-type": "image/png"})
    assert_error(r.status_code, r.json(), 415, "unsupported_media_type")


def test_malformed_multipart_is_400(client: TestClient) -> None:
    r = client.post(
        "/v1/cluster",
        content=b'--zzz\r\nContent-Disposition: form-data; name="image"\r\n\r\nno end',
        headers={"content-type": "multipart/form-data"},  # no boundary at all
    )
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "malformed_multipart"


def test_too_many_files(client: TestClient, good_png: bytes) -> None:
    two = [("image", ("a", good_png, "image/png")), ("image", ("b", good_png, "image/png"))]
    r = client.post("/v1/cluster", files=two)
    assert_error(r.status_code, r.json(), 400, "too_many_files")
    many = [("images", (f"f{i}", good_png, "image/png")) for i in range(MAX_BATCH + 1)]
    r = client.post("/v1/cluster/batch", files=many)
    assert_error(r.status_code, r.json(), 400, "too_many_files")


def test_upload_over_limit_is_413(client: TestClient) -> None:
    status, body = post_one(client, b"\x89PNG\r\n\x1a\n" + b"\0" * (MAX_UPLOAD + 100_000))
    assert_error(status, body, 413, "image_too_large")


def test_unknown_method_is_json(client: TestClient) -> None:
    r = client.get("/v1/cluster")
    assert_error(r.status_code, r.json(), 405, "method_not_allowed")


def test_model_summary(client: TestClient) -> None:
    r = client.get("/v1/model")
    assert r.status_code == 200
    body = r.json()
    assert body["version"] == TINY_VERSION
    assert body["num_clusters"] == TINY_K
    assert body["cluster_names"]["0"] == "brain"
    assert body["preprocess"]["size"] == 32
    assert "provenance" in body and "quality" in body
    assert body["backend"]["name"] == "onnxruntime"
    assert body["limits"]["max_batch_files"] == MAX_BATCH


def test_backend_failure_is_503_with_retry_after(client: TestClient, good_png: bytes) -> None:
    pipeline = bentoml.get_current_service().pipeline
    healthy = pipeline.backend
    pipeline.backend = BrokenBackend()
    try:
        r = client.post("/v1/cluster", files={"image": ("x", good_png, "image/png")})
        assert_error(r.status_code, r.json(), 503, "backend_unavailable")
        assert r.headers["retry-after"] == "7"
        r = client.post("/v1/cluster/batch", files=[("images", ("x", good_png, "image/png"))])
        assert_error(r.status_code, r.json(), 503, "backend_unavailable")
        assert r.headers["retry-after"] == "7"
        assert client.get("/readyz").status_code == 503
    finally:
        pipeline.backend = healthy
    assert client.get("/readyz").status_code == 200
    assert post_one(client, good_png)[0] == 200


def test_every_image_route_goes_through_the_batcher(client: TestClient, good_png: bytes) -> None:
    svc = bentoml.get_current_service()
    batcher = svc.scheduler.batcher
    assert batcher.merge is True
    seen: list[int] = []
    submit = batcher.submit

    async def spy(x: np.ndarray):
        seen.append(len(x))
        return await submit(x)

    batcher.submit = spy
    try:
        assert post_one(client, good_png)[0] == 200
        r = client.post("/v1/embed", files={"image": ("x", good_png, "image/png")})
        assert r.status_code == 200
        files = [("images", (f"f{i}", good_png, "image/png")) for i in range(3)]
        assert client.post("/v1/cluster/batch", files=files).status_code == 200
    finally:
        del batcher.submit
    assert seen == [1, 1, 3]  # one job per request; the batcher may merge jobs of concurrent requests


def test_metrics_have_the_fusc_families(client: TestClient, good_png: bytes) -> None:
    assert post_one(client, good_png)[0] == 200
    post_one(client, TEXT, "text/plain")
    text = client.get("/metrics").text
    for family in (
        "fusc_stage_latency_seconds_bucket",
        "fusc_batch_size_count",
        "fusc_cluster_assignments_total",
        "fusc_confidence_count",
        'fusc_errors_total{code="unsupported_format"}',
        'fusc_requests_total{endpoint="cluster",status="200"}',
        "fusc_model_info",
    ):
        assert family in text, family
    for stage in ("decode", "clean", "embed", "assign"):
        assert f'fusc_stage_latency_seconds_count{{stage="{stage}"}}' in text


def test_streamed_body_over_limit_is_413(client: TestClient) -> None:
    # No Content-Length (chunked): the limit is enforced while reading, not trusted from a header.
    boundary = "fuscboundary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x"\r\n\r\n'.encode()

    def body() -> Iterator[bytes]:
        yield head + b"\x89PNG\r\n\x1a\n"
        for _ in range(40):
            yield b"\0" * 10_000
        yield f"\r\n--{boundary}--\r\n".encode()

    r = client.post(
        "/v1/cluster", content=body(), headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    assert "content-length" not in r.request.headers
    assert_error(r.status_code, r.json(), 413, "image_too_large")


def test_unloadable_repository_leaves_the_service_unready(tiny_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo)
    (repo / CARD_FILENAME).write_text("{not json")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FUSC_MODEL_REPOSITORY", str(repo))
        instance = FuscService.inner()  # __init__ alone, without touching the running test app
    assert instance.pipeline is None
    assert instance.__is_ready__() is False
