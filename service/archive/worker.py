"""One archive chunk through the service's own data path: read bytes -> ``Pipeline.prepare`` (decode +
clean) -> ``Pipeline.infer`` (embed + assign, one model call per chunk) -> ``Pipeline.answers``.

A :class:`ChunkWorker` lives in each pool process or Ray actor and loads the pipeline once. A chunk's result
is one Arrow table (the result columns plus the embedding), handed back whole: the driver commits it in one
atomic file, which is what makes a run exactly-once (service.archive.ledger).
"""

from __future__ import annotations

import io
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from service.archive.errors import SourceReadError
from service.archive.sources import Reader, SourceSpec
from service.archive.store import RESULT_SCHEMA
from service.archive.subjects import SubjectHasher
from service.decode import sniff_format
from service.errors import BackendUnavailableError, FuscError, ModelFailedError
from service.pipeline import ClusterResult, Inference, Pipeline, Prepared, load_pipeline
from service.settings import Settings

logger = logging.getLogger("fusc.archive")

# A backend that cannot answer (a remote Triton restarting) is retried this often before the chunk fails;
# a failed chunk stops the run, and the rerun takes it up again.
BACKEND_RETRIES = 3
# Images per model call, as the service batches them (Settings.batch_max_size).
MODEL_BATCH = Settings().batch_max_size


# Result columns written when a run is finished, not by a worker.
FILLED_AT_FINISH = {"embedding_row", "map_x", "map_y"}


def part_schema(dim: int) -> pa.Schema:
    """A chunk's rows: the result columns the worker knows (the run's schema less what is added when the run
    is finished: the embedding's row and the 2-D map), and the embedding (null for an error)."""
    known = [f for f in RESULT_SCHEMA if f.name not in FILLED_AT_FINISH]
    return pa.schema([*known, pa.field("embedding", pa.list_(pa.float32(), dim))])


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs, picklable (it travels to pool processes and Ray actors)."""

    model_repository: str
    precision: str
    ort_threads: int
    source: SourceSpec
    secret: bytes
    max_upload_bytes: int
    max_pixels: int

    def settings(self) -> Settings:
        return Settings(
            model_repository=Path(self.model_repository),
            precision=self.precision,  # type: ignore[arg-type]
            ort_intra_op_threads=self.ort_threads,
            max_upload_bytes=self.max_upload_bytes,
            max_request_bytes=max(self.max_upload_bytes, Settings().max_request_bytes),
            max_inflight_bytes=max(self.max_upload_bytes, Settings().max_inflight_bytes),
            max_pixels=self.max_pixels,
        )


def limit_threads(ort_threads: int) -> None:
    """One worker per core: OpenCV and any OpenMP/BLAS pool get one thread each, ONNX Runtime its own
    explicit count (a Ray worker's OMP_NUM_THREADS=1 does not reach ONNX Runtime's pool, which is why the
    count is always set explicitly on the session rather than left to the environment)."""
    import cv2

    cv2.setNumThreads(1)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"


def dicom_identity(data: bytes) -> tuple[str | None, str | None]:
    """(identity to hash, SOP Instance UID) from a DICOM header: PatientID, else StudyInstanceUID."""
    if sniff_format(data[:4096]) != "dicom":
        return None, None
    import pydicom

    try:
        ds = pydicom.dcmread(
            io.BytesIO(data),
            stop_before_pixels=True,
            force=True,
            specific_tags=["PatientID", "StudyInstanceUID", "SOPInstanceUID"],
        )
    except Exception:  # an unreadable header: the decoder says what is wrong with the file
        return None, None
    sop = str(ds.get("SOPInstanceUID", "") or "").strip() or None
    for tag in ("PatientID", "StudyInstanceUID"):
        value = str(ds.get(tag, "") or "").strip()
        if value:
            return f"{tag}={value}", sop
    return None, sop


WORKER_CRASHED = "worker_crashed"  # the image killed the process reading it, twice (service.archive.engines)


def crashed_table(cfg: WorkerConfig, rows: list[dict]) -> pa.Table:
    """Rows recorded as ``worker_crashed``, made without a pipeline (the process that had one is gone)."""
    from service.card import load_card

    card = load_card(Path(cfg.model_repository), verify=False)
    schema = part_schema(card.embedding_dim)
    n = len(rows)
    columns = {name: pa.nulls(n, schema.field(name).type) for name in schema.names}
    columns.update(
        key=pa.array([r["key"] for r in rows], pa.string()),
        source=pa.array([r["source"] for r in rows], pa.string()),
        sop_instance_uid=pa.array([r.get("sop_instance_uid") for r in rows], pa.string()),
        subject_key=pa.array([r.get("subject_key") for r in rows], pa.string()),
        model_version=pa.array([card.version] * n, pa.string()),
        error_code=pa.array([WORKER_CRASHED] * n, pa.string()),
    )
    return pa.Table.from_arrays([columns[name] for name in schema.names], schema=schema)


class ChunkWorker:
    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self.pipeline: Pipeline = load_pipeline(cfg.settings())
        self.reader = Reader(cfg.source, cfg.max_upload_bytes)
        self.hasher = SubjectHasher(cfg.secret, "")
        self.version = self.pipeline.card.version
        self.dim = self.pipeline.card.embedding_dim
        self.schema = part_schema(self.dim)

    def _infer_once(self, batch: np.ndarray) -> Inference:
        for attempt in range(BACKEND_RETRIES):
            try:
                return self.pipeline.infer(batch)
            except BackendUnavailableError:
                if attempt == BACKEND_RETRIES - 1:
                    raise
                time.sleep(2.0**attempt)  # 1 s, 2 s: a restarting server gets a moment
        raise AssertionError("not reached")

    def _infer(self, batch: np.ndarray) -> Inference:
        """Model calls of at most MODEL_BATCH images (the service's own batch size): a whole chunk in one
        call would hold a chunk's activations in ONNX Runtime's arena, per worker, for no more speed."""
        if len(batch) <= MODEL_BATCH:
            return self._infer_once(batch)
        parts = [self._infer_once(batch[i : i + MODEL_BATCH]) for i in range(0, len(batch), MODEL_BATCH)]
        return Inference(
            embeddings=np.concatenate([p.embeddings for p in parts]),
            probs=np.concatenate([p.probs for p in parts]),
            ood_score=np.concatenate([p.ood_score for p in parts]),
            embed_ms=sum(p.embed_ms for p in parts),
            assign_ms=sum(p.assign_ms for p in parts),
        )

    def _answers(self, prepared: list[Prepared | FuscError]) -> tuple[list, np.ndarray | None]:
        """Each item's ClusterResult or error, and the embeddings of the answered ones, in order."""
        good = [p.tensor for p in prepared if isinstance(p, Prepared)]
        if not good:
            return self.pipeline.answers(prepared, None), None
        try:
            inference = self._infer(np.stack(good))
            return self.pipeline.answers(prepared, inference), inference.embeddings
        except ModelFailedError:
            # The model raised on something in this batch: one call per image finds the one(s) it fails on,
            # and only those get model_failed.
            answers: list = []
            embeddings = []
            for p in prepared:
                if isinstance(p, FuscError):
                    answers.append(p)
                    continue
                try:
                    inference = self._infer(p.tensor[None])
                except ModelFailedError as exc:
                    answers.append(exc)
                    continue
                answers.extend(self.pipeline.answers([p], inference))
                embeddings.append(inference.embeddings[0])
            return answers, (np.stack(embeddings) if embeddings else None)

    def run(self, rows: list[dict]) -> pa.Table:
        """One chunk: ``rows`` are plan rows (key, source, sop_instance_uid, subject_key)."""
        prepared: list[Prepared | FuscError] = []
        unreadable: dict[int, SourceReadError | FuscError] = {}  # row -> why its bytes could not be read
        subjects: list[str | None] = []
        sops: list[str | None] = []
        for i, row in enumerate(rows):
            subject, sop = row.get("subject_key"), row.get("sop_instance_uid")
            try:
                data = self.reader.read(row["source"])
            except (FuscError, SourceReadError) as exc:
                unreadable[i] = exc
                subjects.append(subject)
                sops.append(sop)
                continue
            if subject is None or sop is None:
                identity, header_sop = dicom_identity(data)
                if subject is None and identity is not None:
                    subject = self.hasher.hash(identity)
                sop = sop or header_sop
            subjects.append(subject)
            sops.append(sop)
            try:
                prepared.append(self.pipeline.prepare(data))
            except FuscError as exc:
                prepared.append(exc)
        answers, embeddings = self._answers(prepared)
        read = iter(answers)
        merged = [unreadable[i] if i in unreadable else next(read) for i in range(len(rows))]
        return self._table(rows, merged, embeddings, subjects, sops)

    def _table(self, rows, answers, embeddings, subjects, sops) -> pa.Table:
        cols: dict[str, list] = {name: [] for name in self.schema.names}
        emb_rows: list[np.ndarray | None] = []
        e = 0
        for row, answer, subject, sop in zip(rows, answers, subjects, sops, strict=True):
            cols["key"].append(row["key"])
            cols["source"].append(row["source"])
            cols["sop_instance_uid"].append(sop)
            cols["subject_key"].append(subject)
            cols["model_version"].append(self.version)
            if isinstance(answer, ClusterResult):
                cols["cluster"].append(answer.cluster)
                cols["confidence"].append(answer.confidence)
                cols["top_clusters"].append([t.cluster for t in answer.top])
                cols["top_probs"].append([t.probability for t in answer.top])
                cols["view"].append(answer.view)
                cols["ood"].append(answer.ood)
                cols["ood_score"].append(answer.ood_score)
                cols["error_code"].append(None)
                assert embeddings is not None
                emb_rows.append(embeddings[e])
                e += 1
            else:
                code = answer.code if isinstance(answer, (FuscError, SourceReadError)) else "internal_error"
                for name in (
                    "cluster",
                    "confidence",
                    "top_clusters",
                    "top_probs",
                    "view",
                    "ood",
                    "ood_score",
                ):
                    cols[name].append(None)
                cols["error_code"].append(code)
                emb_rows.append(None)
        flat = (
            np.concatenate([r for r in emb_rows if r is not None]).astype(np.float32)
            if e
            else np.zeros(0, np.float32)
        )
        mask = np.array([r is None for r in emb_rows], dtype=bool)
        values = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), self.dim)
        # Nulls where there is no embedding: spread the answered rows over the chunk's positions.
        take = np.cumsum(~mask) - 1
        indices = pa.array(np.where(mask, 0, take), pa.int64(), mask=mask)
        embedding = values.take(indices) if e else pa.nulls(len(rows), self.schema.field("embedding").type)
        arrays = [pa.array(cols[n], self.schema.field(n).type) for n in self.schema.names[:-1]]
        return pa.Table.from_arrays([*arrays, embedding], schema=self.schema)

    def close(self) -> None:
        self.reader.close()
