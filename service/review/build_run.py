"""A run folder for the review app from a folder of images, through the service's pipeline.

The archive command (``python -m service.archive run``) is the way to cluster a real archive; this small
builder makes the same run folder (service/archive/store.py) for demonstrations, tests and measurements:
every image goes through ``service.pipeline`` (decode -> clean -> embed -> assign), and the 2-D map is the
embeddings' first two principal components.

    python -m service.review.build_run SOURCE_DIR --out RUN_DIR [--model-repository model_repository]
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

from service.archive.store import RESULT_SCHEMA, RunManifest, write_manifest, write_results
from service.card import CARD_FILENAME, sha256_file
from service.errors import FuscError
from service.pipeline import ClusterResult, Prepared, load_pipeline
from service.settings import DEFAULT_MODEL_REPOSITORY, Settings

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ""}


def find_images(source: Path) -> list[Path]:
    """Image files under ``source`` (DICOM files often have no suffix), sorted."""
    return sorted(p for p in Path(source).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def subject_key(data: bytes, secret: bytes) -> str | None:
    """A keyed hash of a DICOM file's PatientID (never the identifier itself); None for other files."""
    if len(data) < 132 or data[128:132] != b"DICM":
        return None
    import io

    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=["PatientID"])
    except Exception:
        return None
    pid = str(getattr(ds, "PatientID", "") or "")
    return hmac.new(secret, pid.encode(), hashlib.sha256).hexdigest()[:16] if pid else None


def pca_map(emb: np.ndarray) -> np.ndarray:
    """[N, 2]: the first two principal components of the embeddings, scaled to [-1, 1]."""
    if len(emb) == 0:
        return np.zeros((0, 2), np.float32)
    x = emb - emb.mean(axis=0, keepdims=True)
    if len(emb) < 3:
        return np.zeros((len(emb), 2), np.float32)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    xy = x @ vt[:2].T
    xy = xy / max(float(np.abs(xy).max()), 1e-12)
    return xy.astype(np.float32)


def build_run(
    source: Path,
    out: Path,
    *,
    repository: Path = DEFAULT_MODEL_REPOSITORY,
    files: Sequence[Path] | None = None,
    batch: int = 64,
    subject_secret: bytes | None = None,
) -> Path:
    """Cluster every image under ``source`` (or ``files``, paths under it) and write a finished run."""
    source, out, repository = Path(source).resolve(), Path(out), Path(repository).resolve()
    out.mkdir(parents=True, exist_ok=True)
    pipeline = load_pipeline(Settings(model_repository=repository))
    card = pipeline.card
    # Without a given secret the subject hashes of this run only compare with each other.
    secret = subject_secret or os.environ.get("FUSC_SUBJECT_SECRET", "").encode() or os.urandom(32)
    paths = [Path(p).resolve() for p in files] if files is not None else find_images(source)
    created = datetime.now(timezone.utc)
    rows: list[dict] = []
    embeddings: list[np.ndarray] = []
    for start in range(0, len(paths), batch):
        chunk = paths[start : start + batch]
        datas = [p.read_bytes() for p in chunk]
        prepared = pipeline.prepare_each(datas)
        good = [p.tensor for p in prepared if isinstance(p, Prepared)]
        inference = pipeline.infer(np.stack(good)) if good else None
        answers = pipeline.answers(prepared, inference)
        j = 0
        for path, data, answer in zip(chunk, datas, answers, strict=True):
            rel = path.relative_to(source).as_posix()
            row = {
                "key": rel,
                "source": rel,
                "sop_instance_uid": None,
                "subject_key": subject_key(data, secret),
                "model_version": card.version,
            }
            if isinstance(answer, ClusterResult):
                assert inference is not None
                embeddings.append(inference.embeddings[j])
                j += 1
                row.update(
                    cluster=answer.cluster,
                    confidence=answer.confidence,
                    top_clusters=[t.cluster for t in answer.top],
                    top_probs=[t.probability for t in answer.top],
                    view=answer.view,
                    ood=answer.ood,
                    ood_score=answer.ood_score,
                    embedding_row=len(embeddings) - 1,
                )
            else:
                assert isinstance(answer, FuscError)
                row["error_code"] = answer.code
            rows.append(row)
    dim = card.embedding_dim
    emb = np.stack(embeddings).astype(np.float32) if embeddings else np.zeros((0, dim), np.float32)
    xy = pca_map(emb)
    for row in rows:
        r = row.get("embedding_row")
        if r is not None:
            row["map_x"], row["map_y"] = float(xy[r, 0]), float(xy[r, 1])
    columns = {f.name: [row.get(f.name) for row in rows] for f in RESULT_SCHEMA}
    write_results(out, pa.table(columns, schema=RESULT_SCHEMA), emb)
    n_ok = len(embeddings)
    write_manifest(
        out,
        RunManifest(
            status="complete",
            model_version=card.version,
            card_sha256=sha256_file(repository / CARD_FILENAME),
            model_repository=str(repository),
            source=str(source),
            source_root=str(source),
            engine="service.review.build_run",
            created=created,
            finished=datetime.now(timezone.utc),
            counts={"items": len(rows), "answered": n_ok, "errors": len(rows) - n_ok},
            embedding_dim=dim,
            map_method="pca",
        ),
    )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m service.review.build_run", description=__doc__.splitlines()[0]
    )
    ap.add_argument("source", type=Path, help="folder of images (PNG, JPEG, DICOM, ...)")
    ap.add_argument("--out", type=Path, required=True, help="run folder to write")
    ap.add_argument("--model-repository", type=Path, default=DEFAULT_MODEL_REPOSITORY)
    args = ap.parse_args(argv)
    out = build_run(args.source, args.out, repository=args.model_repository)
    print(f"wrote a run of {args.source} to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
