"""service.archive.run: a run over a small tree gives the finished run folder the review app reads, with the
very answers of the service's pipeline, keyed subject hashes and every bad file recorded by its code."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from service.archive import store
from service.archive.errors import LedgerError, RunLockedError, SourceError
from service.archive.ledger import Ledger
from service.archive.run import RunOptions, run_archive
from service.archive.sources import list_folder, list_paths, resolve
from service.archive.subjects import SubjectHasher
from service.pipeline import ClusterResult, load_pipeline
from service.settings import Settings
from tests.archive.conftest import PATIENT_IDS
from tests.service.conftest import build_tiny_repository

EXPECTED_ERRORS = {"study_a/truncated.png": "truncated_image", "study_a/empty.jpg": "empty_input"}


def opts(out: Path, repo: Path, **kw) -> RunOptions:
    base = dict(out=out, model_repository=repo, workers=1, chunk_size=8, progress=False, map_method="pca")
    return RunOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def finished(archive: Path, tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> store.Run:
    out = tmp_path_factory.mktemp("run") / "run"
    manifest = run_archive(str(archive), opts(out, tiny_repo))
    assert manifest.status == "complete"
    return store.load_run(out)


def test_every_listed_file_is_one_row_in_key_order(finished: store.Run, archive: Path) -> None:
    keys = finished.table.column("key").to_pylist()
    on_disk = sorted(p.relative_to(archive).as_posix() for p in archive.rglob("*") if p.is_file())
    assert keys == sorted(keys) and len(keys) == len(set(keys))
    assert keys == [k for k in on_disk if k != "README.txt"]  # the text file is left out by its suffix
    assert finished.manifest.extra["left_out"] == {"suffix .txt": 1}
    assert finished.manifest.counts == {"items": 47, "answered": 44, "errors": 3, "ood": 0}


def test_bad_files_are_recorded_with_their_code(finished: store.Run) -> None:
    rows = {r["key"]: r for r in finished.table.to_pylist()}
    for key, code in EXPECTED_ERRORS.items():
        assert rows[key]["error_code"] == code
        assert rows[key]["cluster"] is None and rows[key]["embedding_row"] is None
    assert rows["study_b/noise.png"]["error_code"] == "unsupported_format"
    assert Counter(r["error_code"] for r in rows.values() if r["error_code"]) == Counter(
        {"truncated_image": 1, "empty_input": 1, "unsupported_format": 1}
    )


def test_answers_and_embeddings_are_the_pipelines_own(
    finished: store.Run, archive: Path, tiny_repo: Path
) -> None:
    pipeline = load_pipeline(Settings(model_repository=tiny_repo))
    answered = [r for r in finished.table.to_pylist() if r["error_code"] is None]
    images = [(archive / r["source"]).read_bytes() for r in answered]
    answers = pipeline.cluster(images)
    embeds = pipeline.cluster(images, kind="embed")
    for row, answer, embed in zip(answered, answers, embeds, strict=True):
        assert isinstance(answer, ClusterResult)
        assert row["cluster"] == answer.cluster
        assert row["confidence"] == pytest.approx(answer.confidence, abs=1e-6)
        assert row["top_clusters"] == [t.cluster for t in answer.top]
        assert row["view"] == answer.view and row["model_version"] == answer.model_version
        np.testing.assert_allclose(finished.embeddings[row["embedding_row"]], embed.embedding, atol=1e-5)
    assert finished.embeddings.shape == (len(answered), pipeline.card.embedding_dim)
    assert sorted(r["embedding_row"] for r in answered) == list(range(len(answered)))
    assert not any(np.isnan(r["map_x"]) for r in answered)


def test_dicom_subjects_are_keyed_hashes_and_identifiers_go_nowhere(finished: store.Run) -> None:
    dicom = [r for r in finished.table.to_pylist() if r["key"].startswith("dicom/")]
    assert len(dicom) == 4 and all(r["sop_instance_uid"] for r in dicom)
    keys = [r["subject_key"] for r in dicom]
    assert keys[0] == keys[2] != keys[1] == keys[3]  # the files alternate between the two patients
    assert all(k.startswith("s-") and len(k) == 22 for k in keys)
    for path in finished.root.rglob("*"):
        if path.is_file() and path.name != "subject-key":
            data = path.read_bytes()
            for secret in (*PATIENT_IDS, "DOE^JANE"):
                assert secret.encode() not in data, (path.name, secret)


def test_the_subject_key_secret_is_the_runs_own_unless_given(
    tmp_path: Path, archive: Path, tiny_repo: Path
) -> None:
    key_file = tmp_path / "secret"
    key_file.write_text("a shared secret of the hospital")
    runs = []
    for name in ("one", "two"):
        out = tmp_path / name
        run_archive(str(archive / "dicom"), opts(out, tiny_repo, subject_key_file=key_file, report=False))
        runs.append(store.load_run(out).table.column("subject_key").to_pylist())
        assert not (out / "subject-key").exists()
    assert runs[0] == runs[1]  # the same secret: comparable across runs
    own = tmp_path / "own"
    run_archive(str(archive / "dicom"), opts(own, tiny_repo, report=False))
    assert (own / "subject-key").stat().st_mode & 0o777 == 0o600
    assert store.load_run(own).table.column("subject_key").to_pylist() != runs[0]
    assert "random secret" in store.read_manifest(own).extra["subject_key_origin"]


def test_a_pool_of_two_gives_the_same_run(
    finished: store.Run, archive: Path, tiny_repo: Path, tmp_path: Path
) -> None:
    run_archive(str(archive), opts(tmp_path / "pool", tiny_repo, workers=2, report=False))
    pool = store.load_run(tmp_path / "pool")
    for column in ("key", "cluster", "error_code", "top_clusters", "sop_instance_uid", "embedding_row"):
        assert pool.table.column(column).equals(finished.table.column(column)), column
    # Each run has its own random subject secret here: the same rows have keys, not the same keys.
    assert pool.table.column("subject_key").is_null().equals(finished.table.column("subject_key").is_null())
    np.testing.assert_allclose(pool.embeddings, finished.embeddings, atol=1e-6)


def test_the_report_names_no_files(finished: store.Run) -> None:
    report = finished.root / "report"
    page = (report / "index.html").read_text()
    summary = json.loads((report / "summary.json").read_text())
    assert summary["counts"] == {"items": 47, "answered": 44, "errors": 3}
    assert summary["errors_by_code"] == {"truncated_image": 1, "empty_input": 1, "unsupported_format": 1}
    assert sum(c["images"] for c in summary["clusters"]) == 44
    thumbs = list((report / "thumbs").glob("*.png"))
    assert thumbs and all(f"thumbs/{t.name}" in page for t in thumbs)
    assert (report / "map.png").stat().st_size > 1000
    for key in finished.table.column("key").to_pylist():
        assert Path(key).name not in page


def test_a_complete_run_is_not_run_again(finished: store.Run, archive: Path, tiny_repo: Path) -> None:
    before = (finished.root / store.RESULTS).stat().st_mtime_ns
    manifest = run_archive(str(archive), opts(finished.root, tiny_repo))
    assert manifest.status == "complete"
    assert (finished.root / store.RESULTS).stat().st_mtime_ns == before


def test_an_unfinished_run_refuses_another_model(archive: Path, tiny_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    stopped = run_archive(str(archive), opts(out, tiny_repo, stop_after_chunks=2, report=False))
    assert stopped.status == "running" and len(Ledger(out).done()) == 2
    other = build_tiny_repository(tmp_path / "other_model", version="tiny-test-2", seed=3)
    with pytest.raises(LedgerError, match="tiny-test-1"):
        run_archive(str(archive), opts(out, other))
    with pytest.raises(LedgerError, match="limit"):
        run_archive(str(archive), opts(out, tiny_repo, limit=5))
    finished = run_archive(str(archive), opts(out, tiny_repo, report=False))
    assert finished.status == "complete" and finished.counts["items"] == 47
    assert [s["chunks_before"] for s in finished.extra["sessions"]] == [0, 2]


def test_one_driver_per_run_folder(tmp_path: Path) -> None:
    first, second = Ledger(tmp_path), Ledger(tmp_path)
    first.lock()
    try:
        with pytest.raises(RunLockedError):
            second.lock()
    finally:
        first.unlock()
    second.lock()
    second.unlock()


def test_limit_takes_the_first_keys(archive: Path, tiny_repo: Path, tmp_path: Path) -> None:
    run_archive(str(archive), opts(tmp_path / "r", tiny_repo, limit=5, report=False))
    keys = store.load_run(tmp_path / "r").table.column("key").to_pylist()
    assert keys == list_folder(resolve(str(archive))).table.column("key").to_pylist()[:5]


def test_a_list_of_paths(archive: Path, tmp_path: Path) -> None:
    hasher = SubjectHasher(b"0123456789abcdef0123", "test")
    listing = tmp_path / "list.csv"
    rows = [
        "path,subject",
        f"{archive}/study_a/img0001.png,P1",
        "../x/missing.png,P2",
        f"{archive}/study_a/img0001.png,P1",
    ]
    listing.write_text("\n".join(rows) + "\n")
    spec = resolve(str(listing))
    assert spec.kind == "list" and spec.root == str(tmp_path)
    out = list_paths(spec, hasher)
    assert out.left_out == {"listed twice": 1}
    assert out.table.column("subject_key").to_pylist() == [
        hasher.hash("subject=P2"),
        hasher.hash("subject=P1"),
    ]
    table = pa.table({"file": ["a.png", "b.png"]})
    import pyarrow.parquet as pq

    pq.write_table(table, tmp_path / "list.parquet")
    assert list_paths(resolve(str(tmp_path / "list.parquet")), hasher).table.column("key").to_pylist() == [
        "a.png",
        "b.png",
    ]


def test_a_source_that_is_nothing(tmp_path: Path) -> None:
    with pytest.raises(SourceError):
        resolve(str(tmp_path / "nowhere"))


def test_a_vanished_file_is_source_unreadable(archive: Path, tiny_repo: Path, tmp_path: Path) -> None:
    listing = tmp_path / "list.csv"
    listing.write_text(f"path\n{archive}/study_a/img0001.png\n{tmp_path}/gone.png\n")
    run_archive(str(listing), opts(tmp_path / "r", tiny_repo, report=False))
    codes = store.load_run(tmp_path / "r").table.column("error_code").to_pylist()
    assert sorted(codes, key=str) == [None, "source_unreadable"]


def test_ray_without_a_cluster_says_so_at_once(archive: Path, tiny_repo: Path, tmp_path: Path) -> None:
    import socket
    import time

    from service.archive.errors import EngineUnavailableError

    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        address = f"127.0.0.2:{s.getsockname()[1]}"
    t0 = time.monotonic()
    with pytest.raises(EngineUnavailableError):
        run_archive(str(archive), opts(tmp_path / "r", tiny_repo, engine="ray", ray_address=address))
    assert time.monotonic() - t0 < 30
    assert (
        store.read_manifest(tmp_path / "r").status == "running"
    )  # planned: a rerun with a cluster continues
