"""Optional API keys (FUSC_API_KEYS): every /v1 route wants one; health, metrics and docs stay open.

BentoML registers its own metrics once per process, so these tests share test_api's app (one per
process) and switch the keys on in its settings while they run.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import bentoml
import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from service.api import _key_matches
from service.settings import Settings, SettingsError

KEYS = ("alpha-key-0123456789", "bravo-key-0123456789")


@pytest.fixture()
def client(service_app: TestClient) -> Iterator[TestClient]:
    svc = bentoml.get_current_service()
    plain = svc.settings
    svc.settings = plain.model_copy(update={"api_keys": KEYS})
    try:
        yield service_app
    finally:
        svc.settings = plain


def post(client: TestClient, png: bytes, headers: dict[str, str]) -> tuple[int, dict, dict]:
    r = client.post("/v1/cluster", files={"image": ("x", png, "image/png")}, headers=headers)
    return r.status_code, r.json(), r.headers


def test_v1_routes_want_a_key(client: TestClient, good_png: bytes) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789"}, {"X-API-Key": KEYS[0][:-1]}):
        status, body, response_headers = post(client, good_png, headers)
        assert status == 401 and body["error"]["code"] == "unauthorized", headers
        assert response_headers["www-authenticate"] == "Bearer"
    for path in ("/v1/model", "/v1/nothing-here"):  # no route is told apart without a key
        r = client.get(path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"


def test_either_header_with_any_configured_key_passes(client: TestClient, good_png: bytes) -> None:
    assert post(client, good_png, {"Authorization": f"Bearer {KEYS[0]}"})[0] == 200
    assert post(client, good_png, {"authorization": f"bearer {KEYS[1]}"})[0] == 200
    assert post(client, good_png, {"X-API-Key": KEYS[1]})[0] == 200
    assert client.get("/v1/model", headers={"X-API-Key": KEYS[0]}).status_code == 200


def test_health_metrics_and_docs_stay_open(client: TestClient) -> None:
    for path in ("/readyz", "/livez", "/healthz", "/metrics", "/docs.json", "/"):
        assert client.get(path).status_code == 200, path
    doc = client.get("/docs.json").json()
    assert set(doc["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert doc["paths"]["/v1/cluster"]["post"]["security"] == [{"bearer": []}, {"apiKey": []}]
    assert "401" in doc["paths"]["/v1/cluster"]["post"]["responses"]
    assert "security" not in doc["paths"]["/readyz"]["get"]


def test_keys_are_compared_whole_and_never_shown() -> None:
    assert _key_matches(KEYS[1], KEYS)
    assert not _key_matches("", KEYS) and not _key_matches(KEYS[0] + "x", KEYS)
    settings = Settings.from_env({"FUSC_API_KEYS": ",".join(KEYS)})
    assert settings.api_keys == KEYS
    assert KEYS[0] not in repr(settings)
    with pytest.raises(SettingsError, match="16 characters") as info:
        Settings.from_env({"FUSC_API_KEYS": "short"})
    assert "short" not in info.value.message
