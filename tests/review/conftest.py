"""Fixtures of the review tests: run folders, real or synthetic, and the review app as a real server.

- ``phantom_run``: phantoms of the bundled model's views, clustered by the archive command
  (``python -m service.archive run``) with the bundled model; their true views are kept apart from the run
  folder (the app never sees them); the model repository is a copy, so a published card lands there.
- ``synthetic_run``: a run folder written straight with ``store.write_results`` from hand-made
  embeddings, for fast unit tests of the review state.
- ``ReviewServer``: ``python -m service.review`` on 127.0.0.1 and a free port, always stopped.
"""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pytest

from service.archive.store import RESULT_SCHEMA, RunManifest, write_manifest, write_results
from service.localserver import free_port, stop_process_group

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLED = REPO_ROOT / "model_repository"
# The views the bundled model was trained on (Makefile: BUNDLED_PHANTOM_VIEWS).
BUNDLED_VIEWS = ("brain", "abdomen", "femur", "thorax_4ch", "spine", "profile", "kidneys")


def pytest_configure(config: pytest.Config) -> None:
    # starlette's TestClient asks for httpx2 from its 1.x on; the httpx it ships with still works.
    config.addinivalue_line("filterwarnings", "ignore:Using `httpx` with `starlette.testclient`")


def copy_repository(dst: Path) -> Path:
    """The bundled repository without its int8 backbone (the review does not need it): a card can be
    published into the copy without touching the committed one."""
    shutil.copytree(BUNDLED, dst, ignore=shutil.ignore_patterns("fusc_backbone_int8"))
    return dst


def archive_run(source: Path, out: Path, repository: Path, map_method: str = "pca") -> Path:
    """The archive command over ``source``, in one process (what a hospital runs, at test size)."""
    cmd = [
        sys.executable, "-m", "service.archive", "run", str(source), "--out", str(out),
        "--model-repository", str(repository), "--workers", "1", "--no-report", "--no-progress",
        "--map", map_method,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@dataclass(frozen=True)
class PhantomRun:
    run: Path
    repository: Path
    truth: dict[str, str]  # key -> true view (never given to the app)


def make_phantom_run(
    root: Path, n: int, seed: int, views=BUNDLED_VIEWS, map_method: str = "pca"
) -> PhantomRun:
    from training.data.phantoms import generate_dataset  # numpy + OpenCV only

    data = generate_dataset(root / "phantoms", n, views=views, seed=seed, progress=False)
    with open(data / "labels.csv") as f:
        truth = {r["filename"]: r["label"] for r in csv.DictReader(f)}
    repo = copy_repository(root / "model_repository")
    # Only the images folder is the source: labels.csv lies outside it, out of the app's reach.
    run = archive_run(data / "images", root / "run", repo, map_method)
    return PhantomRun(run=run, repository=repo, truth=truth)


@pytest.fixture(scope="session")
def phantom_run(tmp_path_factory) -> PhantomRun:
    return make_phantom_run(tmp_path_factory.mktemp("review-phantoms"), 84, seed=5)


def write_synthetic_run(
    root: Path,
    embeddings: np.ndarray,
    clusters: list[int | None],
    confidence: list[float] | None = None,
    keys: list[str] | None = None,
    source_root: Path | None = None,
) -> Path:
    """A finished run folder from hand-made answers (no model): ``None`` in ``clusters`` is an error."""
    root.mkdir(parents=True, exist_ok=True)
    n = len(clusters)
    keys = keys or [f"img_{i:04d}.png" for i in range(n)]
    confidence = confidence or [0.9] * n
    rows, emb, k = [], [], max(c for c in clusters if c is not None) + 1
    for i, c in enumerate(clusters):
        row = {"key": keys[i], "source": keys[i], "model_version": "synthetic-1", "subject_key": f"s{i % 3}"}
        if c is None:
            row["error_code"] = "corrupt_image"
        else:
            other = (c + 1) % k
            p = confidence[i]
            row.update(
                cluster=c, confidence=p, top_clusters=[c, other], top_probs=[p, 1 - p], ood=False,
                ood_score=0.8, embedding_row=len(emb), map_x=float(embeddings[i, 0]),
                map_y=float(embeddings[i, 1]),
            )  # fmt: skip
            emb.append(embeddings[i])
        rows.append(row)
    table = pa.table({f.name: [r.get(f.name) for r in rows] for f in RESULT_SCHEMA}, schema=RESULT_SCHEMA)
    write_results(root, table, np.asarray(emb, np.float32))
    write_manifest(
        root,
        RunManifest(
            status="complete",
            model_version="synthetic-1",
            card_sha256="0" * 64,
            source="synthetic",
            source_root=str(source_root or root),
            counts={"items": n, "answered": len(emb), "errors": n - len(emb)},
            embedding_dim=embeddings.shape[1],
        ),
    )
    return root


@pytest.fixture
def synthetic_run(tmp_path) -> Path:
    """Three clusters of 10 in 3-D (two of them close together), one error."""
    rng = np.random.default_rng(0)
    centres = np.eye(3)
    centres[1] = [0.9, 0.43, 0.0]
    emb, clusters = [], []
    for c in range(3):
        for _ in range(10):
            v = centres[c] + 0.05 * rng.standard_normal(3)
            emb.append(v / np.linalg.norm(v))
            clusters.append(c)
    emb.append(np.ones(3) / np.sqrt(3))
    clusters.append(None)
    conf = list(np.linspace(0.5, 0.99, len(clusters)))
    return write_synthetic_run(tmp_path / "run", np.asarray(emb), clusters, conf)


@dataclass
class ReviewServer:
    url: str
    proc: subprocess.Popen


@contextlib.contextmanager
def review_server(
    run: Path,
    *,
    state: Path,
    repository: Path,
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
    log: Path | None = None,
) -> Iterator[ReviewServer]:
    """``python -m service.review RUN`` on 127.0.0.1 and a free port until the block ends."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "service.review", str(run), "--port", str(port), "--state", str(state),
        "--model-repository", str(repository), "--user", "test-reviewer", *(extra or []),
    ]  # fmt: skip
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    with open(log, "ab") if log else open(os.devnull, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = ReviewServer(f"http://127.0.0.1:{port}", proc)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the review app exited with code {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(server.url + "/state.json", timeout=2).status_code in (200, 401):
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the review app was not ready after 60 s")
            time.sleep(0.2)
        yield server
    finally:
        stop_process_group(proc, term_wait_s=15.0)
