"""The finished archive run folder: the format the archive command writes and the review app reads.

A finished run folder holds::

    run.json          the manifest (RunManifest): format version, model version and card hash, source,
                      engine, counts, status
    results.parquet   one row per input item (RESULT_SCHEMA), ordered by ``key``
    embeddings.npy    float32 [N_ok, D], unit rows; row ``embedding_row`` of an answered item

How a run gets there (parts written as it goes, resumable) is ``service.archive``'s business; readers only
rely on these three files, through ``load_run``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

FORMAT_VERSION = 1
MANIFEST = "run.json"
RESULTS = "results.parquet"
EMBEDDINGS = "embeddings.npy"

# One row per input item (an image file, or one DICOM instance). Errors have a null cluster and embedding.
RESULT_SCHEMA = pa.schema(
    [
        # Unique and stable across reruns: the path relative to the source root (``#f<N>`` appended for a
        # frame of a multi-frame file), or ``sop:<SOP Instance UID>`` for a PACS source.
        pa.field("key", pa.string(), nullable=False),
        # Where the bytes came from: a path relative to the manifest's ``source_root``, or a URL.
        pa.field("source", pa.string(), nullable=False),
        pa.field("sop_instance_uid", pa.string()),
        # A keyed hash (HMAC-SHA-256, truncated) of the patient/subject, never the identifier itself.
        pa.field("subject_key", pa.string()),
        pa.field("cluster", pa.int32()),
        pa.field("confidence", pa.float32()),
        pa.field("top_clusters", pa.list_(pa.int32())),
        pa.field("top_probs", pa.list_(pa.float32())),
        pa.field("view", pa.string()),
        pa.field("ood", pa.bool_()),
        pa.field("ood_score", pa.float32()),
        pa.field("model_version", pa.string(), nullable=False),
        # A stable error code (service/errors.py) when the item could not be answered; null otherwise.
        pa.field("error_code", pa.string()),
        pa.field("embedding_row", pa.int64()),
        # The run's 2-D map of the embeddings (for reports and the review app); null for errors.
        pa.field("map_x", pa.float32()),
        pa.field("map_y", pa.float32()),
    ]
)


class RunManifest(BaseModel):
    format_version: int = FORMAT_VERSION
    status: Literal["running", "complete"] = "running"
    model_version: str
    # SHA-256 of the model card file the run used: an index or a review is only valid for that model.
    card_sha256: str
    model_repository: str = ""
    source: str  # how the source was given (a folder, a list file, a DICOMweb URL), no credentials
    source_root: str = ""  # what relative ``source`` paths are relative to
    engine: str = "pool"
    created: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    finished: datetime | None = None
    counts: dict[str, int] = Field(default_factory=dict)  # items, answered, errors
    embedding_dim: int = 0
    map_method: str = ""
    extra: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class Run:
    root: Path
    manifest: RunManifest
    table: pa.Table
    embeddings: np.ndarray

    def embedding_of(self, row: int) -> np.ndarray | None:
        """The embedding of result row ``row`` (None for an item that ended in an error)."""
        idx = self.table.column("embedding_row")[row].as_py()
        return None if idx is None else self.embeddings[idx]


class RunFormatError(ValueError):
    """A folder that is not a finished run of a format this code reads."""


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_manifest(root: Path, manifest: RunManifest) -> None:
    _atomic_write_bytes(Path(root) / MANIFEST, manifest.model_dump_json(indent=2).encode())


def read_manifest(root: Path) -> RunManifest:
    path = Path(root) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RunFormatError(f"{path} is not a readable run manifest: {exc}") from exc
    if data.get("format_version") != FORMAT_VERSION:
        raise RunFormatError(
            f"{path} has run format {data.get('format_version')}, this version reads {FORMAT_VERSION}"
        )
    return RunManifest.model_validate(data)


def write_results_table(root: Path, table: pa.Table) -> None:
    """Write ``results.parquet`` alone, atomically (a writer that streams ``embeddings.npy`` itself)."""
    root = Path(root)
    table = table.select(RESULT_SCHEMA.names).cast(RESULT_SCHEMA).sort_by("key")
    tmp = root / (RESULTS + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, root / RESULTS)


def write_results(root: Path, table: pa.Table, embeddings: np.ndarray) -> None:
    """Write the final results and embeddings (each atomically). ``table`` must follow RESULT_SCHEMA."""
    root = Path(root)
    write_results_table(root, table)
    tmp = root / (EMBEDDINGS + ".tmp.npy")
    np.save(tmp, np.ascontiguousarray(embeddings, dtype=np.float32))
    os.replace(tmp, root / EMBEDDINGS)


def load_run(root: Path | str) -> Run:
    """A finished run: manifest, results table and embeddings, checked against each other."""
    root = Path(root)
    manifest = read_manifest(root)
    if manifest.status != "complete":
        raise RunFormatError(f"the run in {root} has not finished (status {manifest.status!r})")
    try:
        table = pq.read_table(root / RESULTS)
        embeddings = np.load(root / EMBEDDINGS, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, pa.ArrowInvalid) as exc:
        raise RunFormatError(f"the results in {root} could not be read: {exc}") from exc
    missing = set(RESULT_SCHEMA.names) - set(table.schema.names)
    if missing:
        raise RunFormatError(f"{root / RESULTS} lacks the columns {sorted(missing)}")
    rows = table.column("embedding_row").drop_null()
    if len(rows) and (int(pc.max(rows).as_py()) >= len(embeddings)):
        raise RunFormatError(f"{root / RESULTS} points past the {len(embeddings)} rows of {EMBEDDINGS}")
    return Run(root=root, manifest=manifest, table=table, embeddings=embeddings)
