"""/v1/similar on a service started without a similar-image index: 404 no_similar_index, and the route is in
the OpenAPI document with its codes (the in-process service of conftest.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starlette.testclient import TestClient


def test_similar_without_an_index_is_404(service_app: TestClient, good_png: bytes) -> None:
    r = service_app.post("/v1/similar", files={"image": ("x", good_png, "image/png")})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "no_similar_index"
    assert "FUSC_SIMILAR_INDEX" in r.json()["error"]["message"]


def test_similar_is_documented(service_app: TestClient) -> None:
    doc = service_app.get("/docs.json").json()
    operation = doc["paths"]["/v1/similar"]["post"]
    assert {"200", "404", "409"} <= set(operation["responses"])
    assert "SimilarResponse" in doc["components"]["schemas"]
    assert operation["parameters"][0]["name"] == "k"
