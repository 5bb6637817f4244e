"""The BentoML service in-process: its ASGI app (``FuscService.to_asgi()``) under Starlette's TestClient.

The app is the one ``bentoml serve`` runs, lifespan included, so requests go through the same admission,
thread pool and batcher as in the server; only the sockets are missing (``service_app`` in conftest.py).
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
from service.errors import ERROR_CODES, ModelFailedError
from service.openapi import ROUTE_CODES
from tests.service.conftest import (
    APP_MAX_BATCH,
    APP_MAX_UPLOAD,
    TINY_DIM,
    TINY_K,
    TINY_VERSION,
    BrokenBackend,
    reference_probs,
    tiny_embeddings,
)

TEXT = b"this is a plain text file, not an image\n" * 4
MAX_UPLOAD = APP_MAX_UPLOAD
MAX_BATCH = APP_MAX_BATCH


@pytest.fixture(scope="module")
def client(service_app: TestClient) -> TestClient:
    return service_app


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
        r = client.get("/readyz")
        assert_error(r.status_code, r.json(), 503, "model_not_loaded")  # the same JSON shape as /v1
        assert r.headers["retry-after"] == "7"
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


class FailingModel(BrokenBackend):
    """A model that raises on its input, as ONNX Runtime does on a shape it cannot take."""

    def embed(self, x: np.ndarray) -> np.ndarray:
        raise ModelFailedError("the model fusc_backbone failed on this input")

    def ready(self) -> bool:
        return True


def test_embed_is_the_unit_length_backbone_output(
    client: TestClient, tiny_repo: Path, good_png: bytes
) -> None:
    r = client.post("/v1/embed", files={"image": ("x", good_png, "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"embedding", "dim", "model_version", "timings_ms"}
    emb = np.asarray(body["embedding"])
    ref = tiny_embeddings(tiny_repo, [good_png])[0]
    assert body["dim"] == TINY_DIM == len(emb)
    assert np.linalg.norm(emb) == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(emb, ref / np.linalg.norm(ref), atol=1e-5)
    assert body["model_version"] == TINY_VERSION
    r = client.post("/v1/embed", files={"image": ("x", TEXT, "text/plain")})
    assert_error(r.status_code, r.json(), 415, "unsupported_format")


def test_any_number_of_files_over_the_limit_is_too_many_files(client: TestClient, good_png: bytes) -> None:
    for n in (MAX_BATCH + 1, 34, 60):
        files = [("images", (f"f{i}", good_png, "image/png")) for i in range(n)]
        r = client.post("/v1/cluster/batch", files=files)
        assert_error(r.status_code, r.json(), 400, "too_many_files")
    files = [("image", (f"f{i}", good_png, "image/png")) for i in range(40)]
    r = client.post("/v1/cluster", files=files)
    assert_error(r.status_code, r.json(), 400, "too_many_files")


def test_405_says_which_methods_are_allowed_and_404_is_json(client: TestClient) -> None:
    r = client.get("/v1/cluster")
    assert_error(r.status_code, r.json(), 405, "method_not_allowed")
    assert r.headers["allow"] == "POST"
    r = client.post("/v1/model")
    assert_error(r.status_code, r.json(), 405, "method_not_allowed")
    assert "GET" in r.headers["allow"]
    r = client.get("/v1/nothing-here")
    assert_error(r.status_code, r.json(), 404, "not_found")


def test_a_model_failure_is_a_500_with_its_own_code(client: TestClient, good_png: bytes) -> None:
    pipeline = bentoml.get_current_service().pipeline
    healthy = pipeline.backend
    pipeline.backend = FailingModel()
    try:
        for route, field in (
            ("/v1/cluster", "image"),
            ("/v1/cluster/batch", "images"),
            ("/v1/embed", "image"),
        ):
            r = client.post(route, files=[(field, ("x", good_png, "image/png"))])
            assert_error(r.status_code, r.json(), 500, "model_failed")
            assert "retry-after" not in r.headers  # retrying the same input will not help
    finally:
        pipeline.backend = healthy
    assert post_one(client, good_png)[0] == 200


def test_past_the_admission_limits_the_answer_is_503_overloaded(client: TestClient, good_png: bytes) -> None:
    admission = bentoml.get_current_service().scheduler.admission
    for counter, limit in (("requests", "max_requests"), ("bytes", "max_bytes"), ("images", "max_images")):
        saved = getattr(admission, counter)
        setattr(admission, counter, getattr(admission, limit))  # as if other requests held it all
        try:
            status, body = post_one(client, good_png)
            assert_error(status, body, 503, "overloaded")
            r = client.post("/v1/cluster/batch", files=[("images", ("x", good_png, "image/png"))])
            assert_error(r.status_code, r.json(), 503, "overloaded")
            assert r.headers["retry-after"] == "7"
        finally:
            setattr(admission, counter, saved)
    assert admission.snapshot() == {"requests": 0, "bytes": 0, "images": 0}
    assert post_one(client, good_png)[0] == 200
    assert admission.snapshot() == {"requests": 0, "bytes": 0, "images": 0}  # all given back


def test_openapi_describes_every_v1_route_with_its_error_codes(client: TestClient) -> None:
    r = client.get("/docs.json")
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"].startswith("3.1")
    assert {"/v1/cluster", "/v1/cluster/batch", "/v1/embed", "/v1/model", "/readyz"} <= set(doc["paths"])
    schemas = doc["components"]["schemas"]
    assert {"ClusterResult", "BatchResponse", "EmbedResult", "ErrorResponse"} <= set(schemas)
    for route, codes in ROUTE_CODES.items():
        (operation,) = doc["paths"][route].values()
        responses = operation["responses"]
        assert "200" in responses
        text = " ".join(r["description"] for r in responses.values())
        for code in codes:
            if code == "unauthorized":
                continue  # documented only when API keys are on
            assert f"`{code}`" in text, (route, code)
            assert str(ERROR_CODES[code][0]) in responses, (route, code)
        assert "Retry-After" in responses["503"]["headers"]
        assert "Allow" in responses["405"]["headers"]
    batch = doc["paths"]["/v1/cluster/batch"]["post"]
    assert batch["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["images"][
        "maxItems"
    ] == (MAX_BATCH)
    refs = {v for v in _walk(doc) if isinstance(v, str) and v.startswith("#/")}
    for ref in refs:  # every $ref resolves
        node = doc
        for key in ref[2:].split("/"):
            node = node[key]


def _walk(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)
    else:
        yield node


def test_docs_page_loads_nothing_from_elsewhere(client: TestClient) -> None:
    for path in ("/", "/docs"):
        r = client.get(path)
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/html")
        page = r.text.lower()
        assert "/v1/cluster/batch" in page and "/docs.json" in page
        assert "<script" not in page and "http://" not in page and "https://" not in page and "//" not in page
        assert r.headers["content-security-policy"].startswith("default-src 'none'")


def test_drift_shows_in_the_summary_and_the_metrics(client: TestClient, good_png: bytes) -> None:
    assert post_one(client, good_png)[0] == 200
    drift = client.get("/v1/model").json()["drift"]
    assert drift["answers"] >= 1 and drift["window"] == 1000
    assert drift["training_mix_source"] == "uniform"  # the tiny card records no cluster sizes
    assert 0.0 <= drift["divergence"] <= 1.0
    text = client.get("/metrics").text
    for family in ("fusc_cluster_mix_divergence", "fusc_cluster_mix_answers", "fusc_inflight_requests"):
        assert family in text, family
