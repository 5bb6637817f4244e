"""The int8 backbone: made by service.quantize, listed and verified by the card, chosen by FUSC_PRECISION, and
in agreement with fp32 on held-out real and phantom images."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from service.backends import BackendNotSupportedError, OnnxRuntimeBackend, make_backend
from service.card import load_card
from service.errors import ModelRepositoryError
from service.settings import Settings, SettingsError
from tests.service.conftest import TINY_SIZE, build_tiny_repository

pytest.importorskip("onnx")
pytest.importorskip("training.data.phantoms")
from service.quantize import agreement, image_set, quantize_backbone  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "model_repository"
DATA = ROOT.parent / "shared" / "data"
HAVE_REAL = (DATA / "hc18" / "images").is_dir() and (DATA / "fetal_planes_db" / "images").is_dir()


@pytest.fixture(scope="module")
def tiny_int8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = build_tiny_repository(tmp_path_factory.mktemp("int8") / "repo")
    quantize_backbone(repo, None, phantoms=8, fp32_until=None, command="test")
    return repo


def _copy(repo: Path, dst: Path) -> Path:
    shutil.copytree(repo, dst)
    return dst


def test_quantize_lists_the_int8_backbone_in_the_card(tiny_int8: Path) -> None:
    card = load_card(tiny_int8, verify=True)
    q = card.backbone_int8
    assert q is not None and q.path(tiny_int8).is_file()
    assert q.name == "fusc_backbone_int8" and q.source_sha256 == card.backbone.sha256
    assert (tiny_int8 / q.name / "config.pbtxt").read_text().startswith('name: "fusc_backbone_int8"')
    # No real images were given: phantoms only, and the card says so.
    assert q.calibration.images == {"phantoms": 8} and "phantoms only" in q.calibration.note
    assert q.agreement["images"] == 8 and "no real images" in q.agreement["held_out"]
    assert card.backbone_for("fp32") is card.backbone and card.backbone_for("int8") is q


def test_precision_setting_chooses_the_backbone(tiny_int8: Path) -> None:
    assert Settings.from_env({}).precision == "fp32"
    assert Settings.from_env({"FUSC_PRECISION": "INT8"}).precision == "int8"
    with pytest.raises(SettingsError, match="FUSC_PRECISION"):
        Settings.from_env({"FUSC_PRECISION": "fp16"})
    card = load_card(tiny_int8)
    x = np.random.default_rng(0).uniform(-1, 1, (3, 1, TINY_SIZE, TINY_SIZE)).astype(np.float32)
    fp32 = make_backend(Settings(model_repository=tiny_int8), card)
    int8 = make_backend(Settings(model_repository=tiny_int8, precision="int8"), card)
    assert fp32.describe()["precision"] == "fp32" and int8.describe()["precision"] == "int8"
    e32, e8 = fp32.embed(x), int8.embed(x)
    assert e8.shape == e32.shape and not np.array_equal(e8, e32)
    assert float((e8 * e32).sum(1).min()) > 0.99
    with pytest.raises(BackendNotSupportedError, match="in-process"):
        make_backend(Settings(model_repository=tiny_int8, backend="triton", precision="int8"), card)


def test_int8_without_a_quantized_backbone_is_refused(tmp_path: Path) -> None:
    repo = build_tiny_repository(tmp_path / "plain")
    card = load_card(repo)
    assert card.backbone_int8 is None
    with pytest.raises(ModelRepositoryError, match="make quantize"):
        OnnxRuntimeBackend(repo, card, precision="int8")


def test_a_changed_int8_file_is_refused(tiny_int8: Path, tmp_path: Path) -> None:
    repo = _copy(tiny_int8, tmp_path / "changed")
    card = load_card(repo)
    assert card.backbone_int8 is not None
    path = card.backbone_int8.path(repo)
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ModelRepositoryError, match="SHA-256"):
        load_card(repo)


def test_a_missing_int8_file_only_matters_when_int8_is_chosen(tiny_int8: Path, tmp_path: Path) -> None:
    repo = _copy(tiny_int8, tmp_path / "missing")
    card = load_card(repo)
    assert card.backbone_int8 is not None
    shutil.rmtree(repo / card.backbone_int8.name)
    card = load_card(repo)  # a Triton copy of the repository carries the fp32 models only
    OnnxRuntimeBackend(repo, card)
    with pytest.raises(ModelRepositoryError, match="missing"):
        OnnxRuntimeBackend(repo, card, precision="int8")


def test_int8_of_another_fp32_backbone_is_refused(tiny_int8: Path, tmp_path: Path) -> None:
    repo = _copy(tiny_int8, tmp_path / "stale")
    card = load_card(repo)
    assert card.backbone_int8 is not None
    stale = card.backbone_int8.model_copy(update={"source_sha256": "0" * 64})
    card.model_copy(update={"backbone_int8": stale}).write(repo)
    with pytest.raises(ModelRepositoryError, match="quantized from an fp32 backbone"):
        load_card(repo)


# ------------------------------------------------------------------------------- the bundled int8 model
@pytest.fixture(scope="module")
def bundled_agreement() -> dict:
    card = load_card(BUNDLED)
    if card.backbone_int8 is None:
        pytest.skip("the bundled card lists no int8 backbone (make quantize)")
    n_phantoms = card.backbone_int8.calibration.images.get("phantoms", 100)
    # The held-out images of `make quantize` (none calibrated); real ones only where ../shared/data is.
    held_out = image_set(card, DATA if HAVE_REAL else None, n_phantoms, held_out=True)
    return agreement(BUNDLED, card, card.backbone_int8.path(BUNDLED), held_out)


def test_bundled_int8_agrees_with_fp32(bundled_agreement: dict) -> None:
    a = bundled_agreement
    if HAVE_REAL:
        assert {"hc18", "fetal_planes_db", "phantoms"} <= set(a["cluster_agreement_by_source"])
    # Every answer that carries a view name (fp32 confidence >= the naming threshold) keeps its cluster;
    # the ones that move are answers near a decision boundary.
    assert a["cluster_agreement_confident"] >= 0.99, a
    assert a["cluster_agreement"] >= 0.97, a
    assert a["cosine_mean"] >= 0.98 and a["cosine_min"] >= 0.9, a


def test_bundled_card_records_what_is_measured(bundled_agreement: dict) -> None:
    card = load_card(BUNDLED)
    assert card.backbone_int8 is not None
    recorded = card.backbone_int8.agreement
    if HAVE_REAL and not card.backbone_int8.calibration.note:
        assert bundled_agreement["images"] == recorded["images"]
        assert (
            abs(bundled_agreement["cluster_agreement"] - recorded["cluster_agreement"])
            <= 2 / recorded["images"]
        )
        assert abs(bundled_agreement["cosine_mean"] - recorded["cosine_mean"]) <= 1e-3


@pytest.mark.xfail(
    reason="the target of 99 % on all images is not met by the bundled model (98.4 %): its fp32 cluster ids "
    "move on ~9 % of images under half a gray level of input noise; see docs/benchmarks.md",
    strict=False,
)
def test_bundled_int8_meets_the_99_percent_target(bundled_agreement: dict) -> None:
    assert bundled_agreement["cluster_agreement"] >= 0.99
