"""POST /v1/similar against the real ``bentoml serve`` given an archive run's index (FUSC_SIMILAR_INDEX), and
the archive run's cluster ids against the same server's /v1/cluster answers; a server whose model is not
the index's refuses the route (409 index_model_mismatch) and goes on clustering."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.archive import store
from service.archive.run import RunOptions, run_archive
from service.archive.similar import build_index
from tests.archive.conftest import make_archive
from tests.integration.conftest import Server, start_server
from tests.service.conftest import build_tiny_repository

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def indexed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    base = tmp_path_factory.mktemp("similar")
    repo = build_tiny_repository(base / "model_repository")
    source = make_archive(base / "src", 30, seed=3)
    out = base / "run"
    opts = RunOptions(
        out=out, model_repository=repo, workers=1, progress=False, map_method="pca", report=False
    )
    run_archive(str(source), opts)
    build_index(out)
    return repo, source, out


@pytest.fixture(scope="module")
def served(indexed_run, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    repo, _, out = indexed_run
    yield from start_server(repo, tmp_path_factory.mktemp("server"), {"FUSC_SIMILAR_INDEX": str(out)})


@pytest.fixture(scope="module")
def mismatched(indexed_run, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    _, _, out = indexed_run
    work = tmp_path_factory.mktemp("server-other")
    other = build_tiny_repository(work / "model_repository", version="tiny-test-2", seed=4)
    yield from start_server(other, work, {"FUSC_SIMILAR_INDEX": str(out)})


def post(url: str, route: str, data: bytes, **params) -> httpx.Response:
    return httpx.post(f"{url}{route}", files={"image": ("x", data, "image/png")}, params=params, timeout=30)


def test_similar_finds_the_archive_image_itself(served: Server, indexed_run) -> None:
    _, source, out = indexed_run
    run = store.load_run(out)
    rows = [r for r in run.table.to_pylist() if r["error_code"] is None]
    for i, row in enumerate(rows[:8]):
        data = (source / row["source"]).read_bytes()
        r = post(served.url, "/v1/similar", data, k=5)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_version"] == "tiny-test-1" == body["index"]["model_version"]
        assert body["index"] == {**body["index"], "kind": "flat", "count": len(rows)}
        hits = body["neighbours"]
        assert len(hits) == 5 and hits[0]["key"] == row["key"] and hits[0]["similarity"] > 0.9999
        assert [h["similarity"] for h in hits] == sorted((h["similarity"] for h in hits), reverse=True)
        for hit in hits:  # every neighbour carries its cluster as the run recorded it
            assert hit["cluster"] == run.table.column("cluster")[hit["row"]].as_py()
        if i == 0:
            assert post(served.url, "/v1/similar", data, k=0).json()["error"]["code"] == "bad_request"
            assert (
                post(served.url, "/v1/similar", b"not an image").json()["error"]["code"]
                == "unsupported_format"
            )


def test_archive_cluster_ids_equal_the_services_answers(served: Server, indexed_run) -> None:
    _, source, out = indexed_run
    run = store.load_run(out)
    checked = 0
    for row in run.table.to_pylist():
        r = post(served.url, "/v1/cluster", (source / row["source"]).read_bytes())
        if row["error_code"] is None:
            assert r.status_code == 200, r.text
            assert r.json()["cluster"] == row["cluster"], row["key"]
            assert r.json()["top"][0]["probability"] == pytest.approx(row["confidence"], abs=1e-6)
            checked += 1
        else:
            assert r.json()["error"]["code"] == row["error_code"], row["key"]
    assert checked == 34


def test_an_index_of_another_model_is_refused(mismatched: Server, indexed_run) -> None:
    _, source, _ = indexed_run
    data = (source / "study_a" / "img0001.png").read_bytes()
    r = post(mismatched.url, "/v1/similar", data)
    assert r.status_code == 409
    error = r.json()["error"]
    assert error["code"] == "index_model_mismatch" and "tiny-test-1" in error["message"]
    assert post(mismatched.url, "/v1/cluster", data).status_code == 200  # the other routes still serve
