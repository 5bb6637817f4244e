"""The app's access rules and what its pages may show, through the real ASGI app (in-process)."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest
from starlette.testclient import TestClient

from service.review.app import ReviewConfig, create_app
from tests.review.conftest import write_synthetic_run

PATIENT = "DOE^JANE_1980"  # a key that carries a patient's name, as archive paths sometimes do


@pytest.fixture
def run_with_names_in_keys(tmp_path):
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((12, 4))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    keys = [f"{PATIENT}/study/img{i}.png" for i in range(12)]
    return write_synthetic_run(tmp_path / "run", emb, [i % 3 for i in range(12)], keys=keys)


def _csrf(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def test_no_page_shows_a_key_or_source_path(run_with_names_in_keys):
    client = TestClient(create_app(ReviewConfig(run_dir=run_with_names_in_keys)))
    pages = ["/", "/cluster/0", "/cluster/1?order=least", "/next", "/decisions", "/export", "/state.json"]
    html = client.get("/cluster/0").text
    image_ids = re.findall(r'href="/image/([0-9a-f]+)"', html)
    assert image_ids
    pages += [f"/image/{i}" for i in image_ids[:3]]
    csrf = _csrf(html)
    client.post("/action/mark", data={"csrf": csrf, "mark": "outlier", "img": image_ids[0], "next": "/"})
    for page in pages:
        r = client.get(page)
        assert r.status_code == 200, page
        assert PATIENT not in r.text and "img0.png" not in r.text, page
    # The exported table does carry the key: that is what it is for.
    assert PATIENT in client.get("/export/labels.csv").text


def test_forms_without_the_csrf_token_are_refused(run_with_names_in_keys):
    client = TestClient(create_app(ReviewConfig(run_dir=run_with_names_in_keys)))
    r = client.post("/action/name", data={"cluster": "0", "view": "brain", "csrf": "forged"})
    assert r.status_code == 403
    csrf = _csrf(client.get("/").text)
    r = client.post(
        "/action/name", data={"cluster": "0", "view": "brain", "csrf": csrf}, follow_redirects=False
    )
    assert r.status_code == 303 and "msg=" in r.headers["location"]
    assert client.get("/state.json").json()["clusters"][0]["name"] == "brain"
    # A redirect target off the site is not followed.
    r = client.post(
        "/action/name",
        data={"cluster": "0", "view": "femur", "csrf": csrf, "next": "//evil.example/"},
        follow_redirects=False,
    )
    assert r.headers["location"].startswith("/?")


def test_beyond_loopback_an_access_rule_is_required(run_with_names_in_keys):
    with pytest.raises(ValueError, match="no access control"):
        create_app(ReviewConfig(run_dir=run_with_names_in_keys, host="0.0.0.0"))
    with pytest.raises(ValueError, match="at least 16"):
        create_app(ReviewConfig(run_dir=run_with_names_in_keys, host="0.0.0.0", token="short"))


def test_token_access(run_with_names_in_keys):
    token = "t" * 24
    client = TestClient(create_app(ReviewConfig(run_dir=run_with_names_in_keys, host="0.0.0.0", token=token)))
    assert client.get("/state.json").status_code == 401
    r = client.get("/", headers={"accept": "text/html"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert client.get("/state.json", headers={"authorization": f"Bearer {token}"}).status_code == 200
    assert (
        client.post("/login", data={"token": "wrong"}, follow_redirects=False)
        .headers["location"]
        .startswith("/login?err=")
    )
    client.post("/login", data={"token": token})
    assert client.get("/state.json").status_code == 200  # the cookie set by /login


def test_basic_auth_names_who_decided(run_with_names_in_keys):
    app = create_app(
        ReviewConfig(run_dir=run_with_names_in_keys, host="10.0.0.5", users={"ana": "s3cret-pw"})
    )
    client = TestClient(app)
    assert client.get("/").status_code == 401
    auth = {"authorization": "Basic " + base64.b64encode(b"ana:s3cret-pw").decode()}
    html = client.get("/", headers=auth).text
    client.post("/action/name", data={"cluster": "1", "view": "femur", "csrf": _csrf(html)}, headers=auth)
    log = client.get("/decisions", headers=auth).text
    assert "ana" in log and "named cluster 1 femur" in log
    bad = {"authorization": "Basic " + base64.b64encode(b"ana:nope").decode()}
    assert client.get("/", headers=bad).status_code == 401
