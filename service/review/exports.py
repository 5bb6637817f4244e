"""Where a review's results go: a labels table per image (CSV or Parquet) and a new model card version.

The labels table is for the tools that train on labels; the model card is for the service: its
``cluster_names`` make the service answer with view names. A new card version is written into the model
repository beside the ONNX files it describes; the card it replaces is kept under ``cards/``.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from service.card import CARD_FILENAME, load_card, sha256_file
from service.errors import ModelRepositoryError
from service.review.state import Review

LABEL_COLUMNS = (
    "key",
    "source",
    "subject_key",
    "image_id",
    "cluster",
    "review_cluster",
    "confidence",
    "ood",
    "view",
    "label_source",
    "status",
    "model_version",
)
HISTORY = "cards"


def label_rows(review: Review) -> list[dict]:
    labels = review.labels()
    out = []
    for i, lab in enumerate(labels):
        ok = bool(review.ok[i])
        out.append(
            {
                "key": review.keys[i],
                "source": review.sources[i],
                "subject_key": review.subjects[i],
                "image_id": review.ids[i],
                "cluster": int(review.head[i]) if ok else None,
                "review_cluster": int(review.rc[i]) if ok else None,
                "confidence": round(float(review.confidence[i]), 6) if ok else None,
                "ood": bool(review.ood[i]) if ok else None,
                "view": lab.view,
                "label_source": lab.source,
                "status": lab.status,
                "model_version": review.run.manifest.model_version,
            }
        )
    return out


def labels_csv(review: Review) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LABEL_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in label_rows(review):
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buf.getvalue().encode()


LABEL_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("subject_key", pa.string()),
        ("image_id", pa.string()),
        ("cluster", pa.int32()),
        ("review_cluster", pa.int32()),
        ("confidence", pa.float32()),
        ("ood", pa.bool_()),
        ("view", pa.string()),
        ("label_source", pa.string()),
        ("status", pa.string()),
        ("model_version", pa.string()),
    ]
)


def labels_parquet(review: Review) -> bytes:
    rows = label_rows(review)
    table = pa.table({f.name: [r[f.name] for r in rows] for f in LABEL_SCHEMA}, schema=LABEL_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _next_version(base: str, repository: Path) -> str:
    """``<base>+review.<n>``: the first n not yet used by this card or one kept under cards/."""
    root = re.sub(r"\+review\.\d+$", "", base)
    used = {base}
    history = repository / HISTORY
    if history.is_dir():
        used |= {p.stem.removeprefix("model_card.") for p in history.glob("model_card.*.json")}
    n = 1
    while f"{root}+review.{n}" in used:
        n += 1
    return f"{root}+review.{n}"


def publish_card(review: Review, repository: Path, who: str) -> dict:
    """Write a new model card version with the review's cluster names into ``repository`` (the card it
    replaces goes to ``repository/cards/model_card.<version>.json``). Returns what was written."""
    repository = Path(repository)
    card_path = repository / CARD_FILENAME
    card = load_card(repository, verify=True)
    manifest = review.run.manifest
    if card.backbone.sha256 != _run_backbone(review) and _run_backbone(review):
        raise ModelRepositoryError(
            "the model repository holds another backbone than the one this run was clustered with: "
            "its cluster ids would mean other clusters"
        )
    if review.ok.any() and int(review.head[review.ok].max()) >= card.num_clusters:
        raise ModelRepositoryError("the run has more clusters than this model card: another model's run")
    history = repository / HISTORY
    history.mkdir(exist_ok=True)
    kept = history / f"model_card.{card.version}.json"
    if not kept.exists():
        shutil.copy2(card_path, kept)
    version = _next_version(card.version, repository)
    names = review.card_names_now()
    now = datetime.now(timezone.utc)
    reviews = dict(card.quality.get("review", {})) if isinstance(card.quality.get("review"), dict) else {}
    new = card.model_copy(
        update={
            "version": version,
            "created": now,
            "cluster_names": names,
            "quality": {
                **card.quality,
                "review": {
                    **reviews,
                    "previous_version": card.version,
                    "published_by": who,
                    "published_at": now.isoformat(),
                    "run_model_version": manifest.model_version,
                    "run_card_sha256": manifest.card_sha256,
                    "decisions": len(review.decisions),
                    "accepted_clusters": sorted(review.accepted),
                    "named_clusters": len(names),
                },
            },
        }
    )
    tmp = card_path.with_suffix(".json.tmp")
    tmp.write_text(new.model_dump_json(indent=2) + "\n")
    tmp.replace(card_path)
    return {
        "version": version,
        "previous_version": card.version,
        "kept": str(kept),
        "cluster_names": {str(k): v for k, v in names.items()},
        "sha256": sha256_file(card_path),
    }


def _run_backbone(review: Review) -> str:
    """The backbone SHA-256 of the card the run was made with, when that card is still at hand."""
    repo = review.run.manifest.model_repository
    if not repo:
        return ""
    for path in [Path(repo) / CARD_FILENAME, *sorted((Path(repo) / HISTORY).glob("model_card.*.json"))]:
        try:
            if sha256_file(path) == review.run.manifest.card_sha256:
                return json.loads(path.read_text())["backbone"]["sha256"]
        except (OSError, ValueError, KeyError):
            continue
    return ""
