"""The bundled model, asked through the running service, against k-means on raw pixels (same K, same run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.card import CARD_FILENAME, load_card
from tests.integration.conftest import BUNDLED_REPOSITORY, REPO_ROOT, start_server

pytest.importorskip("sklearn")
FPDB = REPO_ROOT.parent / "shared" / "data" / "fetal_planes_db"

pytestmark = pytest.mark.integration


def test_bundled_repository_is_complete_and_small():
    card = load_card(BUNDLED_REPOSITORY, verify=True)
    total = sum(p.stat().st_size for p in BUNDLED_REPOSITORY.rglob("*") if p.is_file())
    assert total <= 32 * 2**20, f"bundled model repository is {total / 2**20:.1f} MiB"
    assert card.demonstration_only
    assert card.provenance.command.startswith("python -m training train")


@pytest.mark.skipif(not (FPDB / "labels.csv").exists(), reason="../shared/data/fetal_planes_db is absent")
def test_bundled_model_beats_raw_pixel_kmeans_on_real_planes(tmp_path: Path):
    from training.evaluate.service import evaluate_service

    assert (BUNDLED_REPOSITORY / CARD_FILENAME).is_file()
    for server in start_server(BUNDLED_REPOSITORY, tmp_path):
        result = evaluate_service(server.url, f"csv:{FPDB}")
    assert result["n_images"] == 97 and result["n_refused"] == 0
    model, raw = result["service"], result["kmeans_raw_pixels"]  # raw: mean over 10 seeds
    spread = result["kmeans_raw_pixels_std"]
    # Above raw-pixel k-means by more than its spread over seeds, on both figures; and at least what the
    # bundled model reaches (NMI 0.288, ACC 0.598: short of the 0.45 / 0.60 aimed at; README says so).
    assert model["nmi"] > raw["nmi"] + spread["nmi"] and model["acc"] > raw["acc"] + spread["acc"], result
    assert model["nmi"] >= 0.25 and model["acc"] >= 0.55, result
    assert result["transductive"]  # the bundled model saw these images (without labels): said so


def test_bundled_card_records_a_clean_commit():
    card = load_card(BUNDLED_REPOSITORY, verify=False)
    assert card.provenance.git_commit and not card.provenance.git_commit.endswith("-dirty")
    assert card.ood is not None and card.ood.method == "knn_cosine"
