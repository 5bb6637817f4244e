"""The view taxonomy (service/taxonomy.py) agrees with itself, with the phantoms, with the readers and with
the labels the real data sets write."""

from __future__ import annotations

import csv
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from service import taxonomy as tx

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
NO_DATA = "real labels live in ../shared/data (absent in a fresh clone)"


def test_fifteen_views_plus_other_with_unique_names() -> None:
    names = [v.name for v in tx.TAXONOMY]
    assert len(names) == 15 and len(set(names)) == 15
    assert tx.OTHER.name == "other" and "other" not in names
    assert list(tx.VIEWS) == [*names, "other"]
    assert all(name == name.lower() and " " not in name for name in tx.VIEWS)
    assert len(set(tx.COARSE_GROUPS)) == len(tx.COARSE_GROUPS)
    assert {v.coarse for v in tx.VIEWS.values()} == set(tx.COARSE_GROUPS)


def test_words_are_upper_case_and_a_generic_view_has_named_siblings() -> None:
    for view in tx.TAXONOMY:
        assert view.plane, f"{view.name} has no plane word"
        for word in view.plane + view.measure:
            assert word == word.upper().strip()
        assert len(set(view.plane)) == len(view.plane) and len(set(view.measure)) == len(view.measure)
    assert not tx.OTHER.plane and not tx.OTHER.measure
    generic = Counter(v.coarse for v in tx.TAXONOMY if v.generic)
    assert max(generic.values()) == 1
    for group in generic:
        assert any(v.coarse == group and not v.generic for v in tx.TAXONOMY)


def test_phantom_views_are_taxonomy_views_drawn_in_order() -> None:
    from training.data.phantoms import VIEW_ANNOTATION, VIEWS

    assert len(set(tx.PHANTOM_VIEWS)) == len(tx.PHANTOM_VIEWS)
    assert set(tx.PHANTOM_VIEWS) <= {v.name for v in tx.TAXONOMY}
    assert VIEWS == tx.PHANTOM_VIEWS
    for view, annotation in VIEW_ANNOTATION.items():
        assert annotation in tx.VIEWS[view].plane  # what the phantom types is a word that names its plane


def test_every_dataset_label_maps_to_a_known_view() -> None:
    assert set(tx.DATASET_LABELS) == {"fetal_planes_db", "hc18", "phantoms"}
    for labels in tx.DATASET_LABELS.values():
        assert set(labels.values()) <= set(tx.VIEWS)
    # A label means one view whatever the data set and whatever its case.
    seen: dict[str, str] = {}
    for labels in tx.DATASET_LABELS.values():
        for label, view in labels.items():
            assert seen.setdefault(label.lower(), view) == view, label
    assert tx.LABEL_VIEW == {label: view for ls in tx.DATASET_LABELS.values() for label, view in ls.items()}
    assert set(tx.FPDB_BRAIN_PLANES.values()) == {v.name for v in tx.TAXONOMY if v.coarse == "brain"} - {
        "brain"
    }
    assert tx.FPDB_PLANES[tx.FPDB_BRAIN] == "brain" and tx.FPDB_PLANES["Other"] == "other"


def test_view_of_label() -> None:
    assert tx.view_of_label("Fetal thorax") == "thorax_4ch"
    assert tx.view_of_label(" fetal BRAIN ") == "brain"
    assert tx.view_of_label("Trans-cerebellum") == "brain_tc"
    assert tx.view_of_label("lips") == "lips"  # a view name stands for itself
    assert tx.view_of_label("Other") == tx.view_of_label("other") == "other"
    assert tx.view_of_label("elbow") is None
    assert tx.view_of_label("") is None and tx.view_of_label(None) is None


def test_every_merged_target_exists() -> None:
    assert len(set(tx.MERGED_GROUPS)) == len(tx.MERGED_GROUPS)
    for fine, merged in tx.MERGED_VIEWS.items():
        assert fine in tx.VIEWS or fine in tx.LABEL_VIEW, fine
        # a merged group, or a data set's own label that is not merged further
        assert merged in tx.MERGED_GROUPS or (merged in tx.LABEL_VIEW and merged not in tx.MERGED_VIEWS)
    assert set(tx.MERGED_VIEWS) >= {v.name for v in tx.TAXONOMY}  # every view has its Table 2 group
    assert set(tx.MERGED_VIEWS.values()) >= set(tx.MERGED_GROUPS)  # and no group is empty
    # merging only joins groups: the views of one anatomy group never split across merged groups
    for group in tx.COARSE_GROUPS:
        merged = {tx.MERGED_VIEWS[v.name] for v in tx.TAXONOMY if v.coarse == group}
        assert len(merged) <= 1, f"{group} merges into {merged}"


def test_training_reads_its_lists_from_the_taxonomy() -> None:
    pytest.importorskip("sklearn")
    from training.data import ocr, readers
    from training.evaluate import gallery
    from training.evaluate.metrics import COARSE_VIEWS

    assert COARSE_VIEWS == tx.MERGED_VIEWS and COARSE_VIEWS is not tx.MERGED_VIEWS
    assert ocr.TAXONOMY is tx.TAXONOMY
    assert readers.fine_plane("Fetal brain", "Trans-thalamic") == "Trans-thalamic"
    assert readers.fine_plane("Fetal brain", "Other") == "Fetal brain"
    assert readers.fine_plane("Fetal femur", "Not A Brain") == "Fetal femur"
    assert {plane for plane, _ in gallery.FPDB_PICK} == set(tx.FPDB_PLANES)


def test_the_taxonomy_imports_nothing_heavy() -> None:
    code = "import sys, service.taxonomy; print(sorted({'numpy', 'torch', 'cv2'} & set(sys.modules)))"
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(not (DATA / "hc18" / "labels.csv").is_file(), reason=NO_DATA)
def test_hc18_labels_are_known() -> None:
    with open(DATA / "hc18" / "labels.csv", newline="") as f:
        labels = {row["label"] for row in csv.DictReader(f)}
    assert labels == set(tx.DATASET_LABELS["hc18"])


@pytest.mark.skipif(not (DATA / "fetal_planes_db" / "FETAL_PLANES_DB_data.csv").is_file(), reason=NO_DATA)
def test_fetal_planes_db_labels_are_known() -> None:
    with open(DATA / "fetal_planes_db" / "FETAL_PLANES_DB_data.csv", newline="") as f:
        rows = [{k.strip(): v.strip() for k, v in r.items() if k} for r in csv.DictReader(f, delimiter=";")]
    assert {r["Plane"] for r in rows} == set(tx.FPDB_PLANES)
    brain = {r["Brain_plane"] for r in rows if r["Plane"] == tx.FPDB_BRAIN}
    assert brain == set(tx.FPDB_BRAIN_PLANES) | {"Other"}
    assert {r["Brain_plane"] for r in rows if r["Plane"] != tx.FPDB_BRAIN} == {tx.FPDB_NOT_BRAIN}
