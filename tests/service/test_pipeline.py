"""Pipeline, backend, settings and model-repository checks on the tiny repository (no server)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from service.backends import OnnxRuntimeBackend
from service.card import CARD_FILENAME, load_card
from service.errors import BackendUnavailableError, FuscError, ModelFailedError, ModelRepositoryError
from service.pipeline import ClusterResult, Pipeline, load_pipeline
from service.settings import DEFAULT_MODEL_REPOSITORY, Settings, SettingsError
from tests.service.conftest import (
    TINY_K,
    TINY_NAMES,
    TINY_VERSION,
    BrokenBackend,
    expected_view,
    reference_probs,
)

TEXT = b"this is a plain text file, not an image\n" * 4


@pytest.fixture(scope="module")
def pipeline(tiny_repo: Path) -> Pipeline:
    return load_pipeline(Settings(model_repository=tiny_repo))


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def test_single_image_matches_onnx_reference(pipeline: Pipeline, tiny_repo: Path, good_png: bytes) -> None:
    (result,) = pipeline.cluster([good_png])
    assert isinstance(result, ClusterResult)
    ref = reference_probs(tiny_repo, good_png)
    assert result.cluster == int(np.argmax(ref))
    assert result.confidence == pytest.approx(float(ref.max()), abs=1e-6)
    assert result.model_version == TINY_VERSION
    assert [t.cluster for t in result.top] == list(np.argsort(-ref, kind="stable")[:3])
    for t in result.top:
        assert t.probability == pytest.approx(float(ref[t.cluster]), abs=1e-6)
        assert t.view == TINY_NAMES.get(t.cluster)
    assert (result.view, result.view_reason) == expected_view(pipeline.card, result.model_dump())
    assert set(result.timings_ms.model_dump()) == {"decode", "clean", "embed", "assign"}
    assert all(v >= 0 for v in result.timings_ms.model_dump().values())


def test_batch_keeps_order_and_isolates_bad_images(
    pipeline: Pipeline, good_png: bytes, other_pngs: list[bytes]
) -> None:
    truncated = good_png[: len(good_png) // 2]
    images = [good_png, truncated, TEXT, b"", other_pngs[0]]
    batches_before = sample("fusc_batch_size_count")
    results = pipeline.cluster(images)
    assert sample("fusc_batch_size_count") == batches_before + 1  # the two good images share one call
    assert isinstance(results[0], ClusterResult) and isinstance(results[4], ClusterResult)
    assert [(r.code, r.http_status) for r in results[1:4] if isinstance(r, FuscError)] == [
        ("truncated_image", 400),
        ("unsupported_format", 415),
        ("empty_input", 400),
    ]
    (single,) = pipeline.cluster([other_pngs[0]])
    assert isinstance(single, ClusterResult)
    assert single.top == results[4].top  # batching does not change an image's answer


def test_batch_probabilities_match_reference(
    pipeline: Pipeline, tiny_repo: Path, other_pngs: list[bytes]
) -> None:
    results = pipeline.cluster(other_pngs)
    for data, result in zip(other_pngs, results, strict=True):
        assert isinstance(result, ClusterResult)
        ref = reference_probs(tiny_repo, data)
        assert result.cluster == int(np.argmax(ref))
        assert result.confidence == pytest.approx(float(ref.max()), abs=1e-5)


def test_all_bad_batch_makes_no_model_call(pipeline: Pipeline) -> None:
    before = sample("fusc_batch_size_count")
    results = pipeline.cluster([TEXT, b""])
    assert [r.code for r in results if isinstance(r, FuscError)] == ["unsupported_format", "empty_input"]
    assert sample("fusc_batch_size_count") == before


def test_metrics_are_recorded(pipeline: Pipeline, good_png: bytes) -> None:
    decode_before = sample("fusc_stage_latency_seconds_count", {"stage": "decode"})
    errors_before = sample("fusc_errors_total", {"code": "unsupported_format"})
    (result,) = pipeline.cluster([good_png])
    assert isinstance(result, ClusterResult)
    assert sample("fusc_stage_latency_seconds_count", {"stage": "decode"}) == decode_before + 1
    for stage in ("clean", "embed", "assign"):
        assert sample("fusc_stage_latency_seconds_count", {"stage": stage}) > 0
    assert sample("fusc_cluster_assignments_total", {"cluster": str(result.cluster)}) >= 1
    assert sample("fusc_confidence_count") >= 1
    pipeline.cluster([TEXT])
    assert sample("fusc_errors_total", {"code": "unsupported_format"}) == errors_before + 1


def test_backend_failure_raises_for_the_whole_call(pipeline: Pipeline, good_png: bytes) -> None:
    broken = Pipeline(pipeline.card, BrokenBackend())
    with pytest.raises(BackendUnavailableError) as info:
        broken.cluster([good_png, TEXT])
    assert info.value.http_status == 503


def test_onnxruntime_failure_on_an_input_is_a_500_not_a_retry(tiny_repo: Path) -> None:
    backend = OnnxRuntimeBackend(tiny_repo, load_card(tiny_repo))
    assert backend.describe()["providers"] == ["CPUExecutionProvider"]
    with pytest.raises(ModelFailedError) as info:
        backend.embed(np.zeros((1, 1, 7, 7), np.float32))  # wrong spatial size for the MatMul
    assert (info.value.code, info.value.http_status) == ("model_failed", 500)


def copy_repo(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_hash_mismatch_is_refused(tiny_repo: Path, tmp_path: Path) -> None:
    repo = copy_repo(tiny_repo, tmp_path / "repo")
    card = load_card(repo)
    with open(card.head.path(repo), "ab") as f:
        f.write(b"\0")  # one byte appended after export
    with pytest.raises(ModelRepositoryError) as info:
        load_pipeline(Settings(model_repository=repo))
    assert info.value.code == "model_repository_invalid"
    assert "SHA-256" in info.value.message


def test_card_that_disagrees_with_the_models_is_refused(tiny_repo: Path, tmp_path: Path) -> None:
    repo = copy_repo(tiny_repo, tmp_path / "repo")
    raw = json.loads((repo / CARD_FILENAME).read_text())
    raw["num_clusters"] = TINY_K + 1
    (repo / CARD_FILENAME).write_text(json.dumps(raw))
    with pytest.raises(ModelRepositoryError, match="K=6"):
        load_pipeline(Settings(model_repository=repo))


def test_missing_repository_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelRepositoryError):
        load_pipeline(Settings(model_repository=tmp_path / "nowhere"))


def test_settings_from_env(tmp_path: Path) -> None:
    s = Settings.from_env(
        {"FUSC_MODEL_REPOSITORY": str(tmp_path), "FUSC_MAX_BATCH_FILES": "8", "FUSC_LOG_LEVEL": "debug"}
    )
    assert s.model_repository == tmp_path
    assert s.max_batch_files == 8
    assert s.log_level == "DEBUG"
    assert s.adaptive_batching == "on"
    assert Settings.from_env({"FUSC_ADAPTIVE_BATCHING": "OFF"}).adaptive_batching == "off"
    assert Settings.from_env({}).model_repository == DEFAULT_MODEL_REPOSITORY
    assert DEFAULT_MODEL_REPOSITORY.name == "model_repository"
    with pytest.raises(SettingsError, match="FUSC_MAX_UPLOAD_BYTES"):
        Settings.from_env({"FUSC_MAX_UPLOAD_BYTES": "lots"})
    with pytest.raises(SettingsError):
        Settings.from_env({"FUSC_MAX_BATCH_FILES": "64", "FUSC_BATCH_MAX_SIZE": "16"})


def test_ood_flag_follows_the_card_calibration(tiny_repo: Path, good_png: bytes) -> None:
    from service.card import OODCalibration

    card = load_card(tiny_repo)
    backend = OnnxRuntimeBackend(tiny_repo, card)
    plain = Pipeline(card, backend).cluster([good_png])[0]
    assert isinstance(plain, ClusterResult) and plain.ood is None and plain.ood_score is None

    # Calibrate on the image's own embedding: similarity 1 to its centroid, so it is in distribution
    # for a threshold below 1 and out of it for a threshold above 1.
    emb = backend.embed(Pipeline(card, backend).prepare(good_png).tensor[None])[0]
    unit = (emb / np.linalg.norm(emb)).tolist()
    before = sample("fusc_ood_total")
    for threshold, expected in ((0.5, False), (1.5, True)):
        ood = OODCalibration(centroids=[unit], threshold=threshold, quantile=0.01)
        result = Pipeline(card.model_copy(update={"ood": ood}), backend).cluster([good_png])[0]
        assert isinstance(result, ClusterResult)
        assert result.ood is expected
        assert result.ood_score == pytest.approx(float(np.dot(emb, unit)), abs=1e-5)
    assert sample("fusc_ood_total") == before + 1
