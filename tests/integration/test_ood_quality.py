"""The OOD check measured by ``training.evaluate.ood``: on a tiny hand-made knn_cosine repository (every code
path, no quality expected of random weights) and on the bundled model (the quality bars)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import pytest

from service.card import CARD_FILENAME, Provenance, load_card
from tests.integration.conftest import BUNDLED_REPOSITORY, REPO_ROOT
from tests.service.conftest import add_knn_ood, build_tiny_repository, synthetic_frame
from training.data.phantoms import VIEWS, plan
from training.data.readers import read_spec, subject_split
from training.evaluate.ood import data_specs, evaluate_ood, main, markdown, phantom_pngs, resolve_spec

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
TRAINED_VIEWS = ["brain", "abdomen"]


def write_real_set(root: Path, n_subjects: int = 6, per_subject: int = 2) -> Path:
    """A csv-layout data set of synthetic frames, ``per_subject`` images for each subject."""
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(n_subjects * per_subject):
        name = f"frame_{i:03d}.png"
        cv2.imwrite(str(root / "images" / name), synthetic_frame(100 + i, 240, 320))
        rows.append((name, "Fetal brain", f"S{i // per_subject:02d}"))
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("filename", "label", "subject"), *rows])
    return root


@pytest.fixture(scope="module")
def knn_eval_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny knn_cosine repository whose card records a run on a csv set plus phantoms of two views."""
    tmp = tmp_path_factory.mktemp("ood-eval")
    real = write_real_set(tmp / "real")
    provenance = Provenance(
        data=[f"csv:{real}"],
        test_fraction=0.5,
        split_seed=3,
        phantoms=12,
        phantom_seed=5,
        phantom_views=TRAINED_VIEWS,
        note="tiny knn_cosine test repository",
    )
    repo = build_tiny_repository(tmp / "model_repository")
    bank = [p.read_bytes() for p in sorted((real / "images").glob("*.png"))]
    bank += list(phantom_pngs(8, 5, TRAINED_VIEWS))
    calibration = list(phantom_pngs(6, 9, TRAINED_VIEWS))
    return add_knn_ood(repo, bank, calibration, k=3, provenance=provenance)


def with_threshold(repo: Path, dst: Path, threshold: float) -> Path:
    """A copy of ``repo`` whose card flags below ``threshold``; the ONNX files and bank are shared."""
    dst.mkdir()
    for item in repo.iterdir():
        if item.name != CARD_FILENAME:
            (dst / item.name).symlink_to(item)
    card = load_card(repo)
    assert card.ood is not None
    card.model_copy(update={"ood": card.ood.model_copy(update={"threshold": threshold})}).write(dst)
    return dst


SMALL = {"n_ood": 21, "n_phantoms": 6, "n_left_out": 2}


def test_evaluation_covers_every_set_on_a_tiny_knn_repository(knn_eval_repo: Path) -> None:
    card = load_card(knn_eval_repo)
    report = evaluate_ood(knn_eval_repo, **SMALL)
    assert report["ood"]["method"] == "knn_cosine" and report["ood"]["k"] == 3

    non_us = report["non_ultrasound"]
    assert non_us["overall"]["n"] == 21
    assert sum(s["n"] for s in non_us["by_kind"].values()) == 21
    assert len(non_us["by_kind"]) == 7  # a small set still takes every kind in turn

    # The held-out subjects are the ones subject_split draws from the card's provenance.
    ind = report["in_distribution"]
    images = read_spec(card.provenance.data[0])
    subjects = images.subjects + [s for _, s in plan(12, 5, TRAINED_VIEWS)]
    held = {s for s, h in zip(subjects, subject_split(subjects, 0.5, 3), strict=True) if h}
    n_held = sum(s in held for s in images.subjects)
    assert 0 < n_held < len(images)
    assert ind["held_out"]["real"]["n"] == n_held
    assert ind["seen_in_training"]["real"]["n"] == len(images) - n_held
    assert ind["split"]["held_out_subjects"] == len(held)
    assert ind["fresh_phantoms"]["n"] == 6 and ind["fresh_phantoms"]["views"] == TRAINED_VIEWS
    assert ind["overall"]["n"] == n_held + 6

    left = report["left_out_views"]["by_view"]
    assert list(left) == [v for v in VIEWS if v not in TRAINED_VIEWS]
    assert all(s["n"] == 2 for s in left.values())
    assert report["flagged_with_view"] == 0
    for s in [non_us["overall"], ind["overall"], *left.values()]:
        assert s["answered"] + sum(s["refused"].values()) == s["n"]
        if s["answered"]:
            assert s["flagged_share"] == pytest.approx(s["flagged"] / s["answered"])
            assert sum(s["view_reasons"].values()) == s["answered"]

    text = markdown(report)
    assert "| **non-ultrasound, all** | 21 |" in text
    assert "left-out view: femur" in text and "held out: real" in text


def test_the_threshold_moves_every_share(knn_eval_repo: Path, tmp_path: Path) -> None:
    everything = evaluate_ood(with_threshold(knn_eval_repo, tmp_path / "strict", 1.01), **SMALL)
    nothing = evaluate_ood(with_threshold(knn_eval_repo, tmp_path / "lax", -1.01), **SMALL)
    for report, share in ((everything, 1.0), (nothing, 0.0)):
        ind = report["in_distribution"]
        sets = [
            report["non_ultrasound"]["overall"],
            ind["overall"],
            *report["left_out_views"]["by_view"].values(),
        ]
        for s in sets:
            assert s["flagged_share"] == share
        assert report["flagged_with_view"] == 0
    assert everything["in_distribution"]["overall"]["named"] == 0
    assert everything["in_distribution"]["overall"]["view_reasons"] == {
        "out_of_distribution": everything["in_distribution"]["overall"]["answered"]
    }


def test_cli_writes_json_and_markdown(knn_eval_repo: Path, tmp_path: Path) -> None:
    out, md = tmp_path / "r" / "ood.json", tmp_path / "r" / "ood.md"
    argv = ["--repository", str(knn_eval_repo), "--out", str(out), "--md", str(md)]
    assert main([*argv, "--n-ood", "8", "--phantoms", "2", "--left-out", "1"]) == 0
    assert json.loads(out.read_text())["non_ultrasound"]["overall"]["n"] == 8
    assert md.read_text().startswith("# OOD check of model")


def test_specs_come_from_the_card_or_its_command(knn_eval_repo: Path, tmp_path: Path) -> None:
    card = load_card(knn_eval_repo)
    assert data_specs(card) == card.provenance.data
    command = "python -m training train --data csv:a --data=fpdb:b --phantoms 3"
    older = card.model_copy(update={"provenance": Provenance(command=command)})
    assert data_specs(older) == ["csv:a", "fpdb:b"]
    (tmp_path / "d").mkdir()
    assert resolve_spec("csv:d", [tmp_path / "nowhere", tmp_path]) == f"csv:{(tmp_path / 'd').resolve()}"
    assert resolve_spec("d", [tmp_path]) == str((tmp_path / "d").resolve())
    assert resolve_spec("csv:missing", [tmp_path]) is None


# --------------------------------------------------------------------------------------- the bundled model
@pytest.mark.integration
def test_bundled_ood_check_flags_non_ultrasound_and_keeps_in_distribution() -> None:
    if not (BUNDLED_REPOSITORY / CARD_FILENAME).is_file():
        pytest.skip("model_repository/ holds no model card")
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent: no held-out real images to measure")
    card = load_card(BUNDLED_REPOSITORY)
    if card.ood is None or card.ood.method != "knn_cosine":
        method = card.ood.method if card.ood else "none"
        pytest.skip(f"the bundled model's OOD check is {method}; these bars are for knn_cosine models")
    report = evaluate_ood(BUNDLED_REPOSITORY)

    # What the bundled model reaches (docs/results/ood.md), held so that it cannot slip back. The aims are
    # higher (>= 95 % of non-ultrasound images, <= 5 % of every held-out source, >= 50 % of an unseen view);
    # README and docs/results/ood.md say where the model stands against them.
    non_us = report["non_ultrasound"]["overall"]
    assert non_us["n"] >= 200
    assert non_us["flagged_or_refused_share"] >= 0.85, report["non_ultrasound"]
    for kind in ("blank", "checkerboard", "noise", "text"):
        assert report["non_ultrasound"]["by_kind"][kind]["flagged_or_refused_share"] == 1.0, kind

    ind = report["in_distribution"]
    assert not ind["split"]["missing"], ind["split"]
    if card.provenance.test_fraction > 0:
        assert ind["held_out"], ind["split"]
    for source, s in ind["held_out"].items():
        # FETAL_PLANES_DB holds out 19 images from other machines than most real training images
        bar = 0.20 if source == "fetal_planes_db" else 0.05
        assert s["flagged_share"] is not None and s["flagged_share"] <= bar, (source, s)
    assert ind["fresh_phantoms"]["flagged_share"] <= 0.05, ind["fresh_phantoms"]

    # A view the model never saw is flagged more often than the views it saw.
    for view, s in report["left_out_views"]["by_view"].items():
        assert s["flagged_share"] > 2 * ind["fresh_phantoms"]["flagged_share"], (view, s)
    assert report["flagged_with_view"] == 0
