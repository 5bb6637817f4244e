"""Exports: the labels table, and a new model card version that the service then answers with."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pyarrow.parquet as pq

from service.archive.store import load_run
from service.card import CARD_FILENAME, load_card
from service.pipeline import ClusterResult, load_pipeline
from service.review import exports
from service.review.decisions import DecisionLog
from service.review.state import Review
from service.settings import Settings
from tests.review.conftest import copy_repository


def test_labels_csv_and_parquet_agree(synthetic_run, tmp_path):
    r = Review(load_run(synthetic_run), DecisionLog(tmp_path / "d.sqlite"))
    r.name(0, "brain", "ana")
    r.mark([1], "outlier", "ana")
    rows = list(csv.DictReader(io.StringIO(exports.labels_csv(r).decode())))
    assert tuple(rows[0]) == exports.LABEL_COLUMNS
    assert len(rows) == 31
    assert (rows[0]["view"], rows[0]["status"], rows[0]["label_source"]) == ("brain", "named", "cluster")
    assert (rows[1]["view"], rows[1]["status"]) == ("", "outlier")
    assert (rows[30]["status"], rows[30]["cluster"]) == ("error", "")
    table = pq.read_table(io.BytesIO(exports.labels_parquet(r)))
    assert table.column("view").to_pylist()[:2] == ["brain", None]
    assert table.column("key").to_pylist() == [row["key"] for row in rows]


def test_a_published_card_is_a_new_version_the_service_serves(phantom_run, tmp_path):
    run = load_run(phantom_run.run)
    repo = copy_repository(tmp_path / "repo")
    old = load_card(repo)
    r = Review(run, DecisionLog(tmp_path / "d.sqlite"), old.cluster_names)
    # The most confident in-distribution image and its cluster, named something the old card does not say.
    ok = r.ok & ~r.ood
    row = int(np.flatnonzero(ok)[np.argmax(r.confidence[ok])])
    c = int(r.head[row])
    new_view = "lips" if old.cluster_names.get(c) != "lips" else "cervix"
    r.accept(c, "ana", view=new_view)
    out = exports.publish_card(r, repo, "ana")
    card = load_card(repo, verify=True)
    assert card.version == out["version"] == f"{old.version}+review.1"
    assert card.cluster_names[c] == new_view
    assert card.quality["review"]["previous_version"] == old.version
    assert card.quality["review"]["accepted_clusters"] == [c]
    kept = repo / exports.HISTORY / f"model_card.{old.version}.json"
    assert json.loads(kept.read_text())["version"] == old.version
    # The service's own pipeline on that repository now names the image's cluster so.
    pipeline = load_pipeline(Settings(model_repository=repo))
    source = run.manifest.source_root + "/" + r.sources[row]
    (answer,) = pipeline.cluster([open(source, "rb").read()])
    assert isinstance(answer, ClusterResult)
    assert answer.cluster == c and answer.view == new_view and answer.model_version == card.version
    # A second publication is the next version; the first is kept too.
    r.name(c, "femur", "ana")
    again = exports.publish_card(r, repo, "ana")
    assert again["version"] == f"{old.version}+review.2"
    assert (repo / exports.HISTORY / f"model_card.{old.version}+review.1.json").is_file()
    assert (repo / CARD_FILENAME).is_file()
