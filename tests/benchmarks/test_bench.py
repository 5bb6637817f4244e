"""The benchmark's own arithmetic: multiply-adds of a graph, GEMM rate, ratios and targets, the report page
and the Triton GPU config. The benchmark itself is not a test (`make bench`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import core
from benchmarks.eager import available
from benchmarks.report import write_report
from benchmarks.run import TARGETS, summarize
from service.card import load_card
from tests.service.conftest import TINY_DIM, TINY_SIZE, build_tiny_repository

pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_repository(tmp_path_factory.mktemp("bench") / "repo")


def test_macs_counts_the_matmul_of_the_tiny_backbone(tiny: Path) -> None:
    card = core.card_json(tiny)
    m = core.macs(core.model_path(tiny, card["backbone"]), "image", (1, TINY_SIZE, TINY_SIZE))
    assert m["macs_per_image"] == TINY_SIZE * TINY_SIZE * TINY_DIM
    assert m["by_op"] == {"MatMul": TINY_SIZE * TINY_SIZE * TINY_DIM}


def test_gemm_rate_is_a_positive_rate() -> None:
    g = core.gemm_rate(n=128, seconds=0.05)
    assert g["gflop_per_s"] > 0 and g["runs"] >= 3


def test_bench_models_without_int8_says_so(tiny: Path) -> None:
    x = core.synthetic_inputs(core.card_json(tiny), n=4)
    out = core.bench_models(tiny, x, providers=["CPUExecutionProvider"], seconds=0.05, batches=(1, 4))
    assert out["fp32"]["batch_4"]["images_per_s"] > 0
    assert "skipped" in out["int8"] and "int8_vs_fp32" not in out


def test_triton_gpu_config_names_the_model_and_tensorrt(tiny: Path) -> None:
    card = core.card_json(tiny)
    text = core.triton_gpu_config(card, card["backbone"], max_batch_size=64, tensorrt=True)
    assert 'name: "fusc_backbone"' in text and 'backend: "onnxruntime"' in text
    assert "KIND_GPU" in text and 'name: "tensorrt"' in text and card["backbone"]["sha256"] in text
    assert f"dims: [1, {TINY_SIZE}, {TINY_SIZE}]" in text and f"dims: [{TINY_DIM}]" in text


def test_eager_pipeline_is_skipped_with_a_reason_without_a_checkpoint(tmp_path: Path) -> None:
    reason = available(tmp_path / "none.pt")
    assert reason is not None and ("checkpoint" in reason or "torch" in reason)


def _result(load: float) -> dict:
    batch = {"batch": 32, "images_per_s": 500.0, "p50_ms": 60.0, "p99_ms": 70.0}
    return {
        "created": "2026-12-01T00:00:00+00:00",
        "seconds": 100.0,
        "model": {"arch": "efficientnet-lite0", "input_size": 96, "version": "x"},
        "machine": {"cpu": "cpu", "cores": 2, "onnxruntime": "1", "nice": 15, "load_average": [load, 1, 1]},
        "shared_machine": load > 1.5,
        "skipped": [],
        "preprocess": {"images": 10, "single_core_decode_plus_clean_images_per_s": 50.0},
        "eager": {
            "images_per_s": 20.0,
            "preprocess_share": 0.6,
            "mean_ms": {"decode": 10.0, "clean": 20.0, "model": 20.0},
            "torch_threads": 1,
            "same_model_as_onnx": {"max_abs_embedding_diff": 1e-6, "cluster_agreement": 1.0},
        },
        "gemm_fp32": {"n": 2048, "gflop_per_s": 100.0},
        "backbone_macs": {"macs_per_image": 69_000_000, "gflop_per_image": 0.138},
        "onnxruntime": {
            "fp32": {"batch_32": batch},
            "int8": {"batch_32": {**batch, "images_per_s": 1000.0}},
            "int8_vs_fp32": {"images": 10, "cluster_agreement": 0.98, "cluster_agreement_confident": 1.0},
            "int8_speedup_batched": 2.0,
            "int8_speedup_batch_1": 3.0,
        },
        "http": {"concurrency_16": {"images_per_s": 90.0, "p50_ms": 1, "p99_ms": 2, "ok": 1, "answers": 1}},
        "triton": {"skipped": "no venv"},
    }


def test_summary_ratios_and_targets() -> None:
    s = summarize(_result(0.5))
    assert s["service_over_eager"] == 4.5 and s["http_over_single_core_decode_clean"] == 1.8
    assert s["service_over_eager_bound"] == 5.0  # 2 cores x 50 images/s of decode + clean / 20 eager
    assert s["fraction_of_fp32_gemm"]["fp32"] == pytest.approx(0.69, abs=1e-3)
    assert s["preprocess_share_service"] == pytest.approx(20 / 22, abs=1e-3)
    assert set(s["targets"]) == set(TARGETS)
    assert s["targets"]["service_over_eager"]["met"] is False
    assert s["targets"]["http_over_single_core_decode_clean"]["met"] is True
    assert s["targets"]["int8_cluster_agreement"]["met"] is False


@pytest.mark.parametrize("load", [0.4, 3.2])
def test_report_says_when_the_machine_was_shared(tiny: Path, tmp_path: Path, load: float) -> None:
    r = _result(load)
    r["summary"] = summarize(r)
    page = write_report(r, tmp_path / "b.md", load_card(tiny)).read_text()
    assert f"Load average at the start: {load:.2f}" in page
    assert ("from a shared machine" in page) == (load > 1.5)
    assert "| service over HTTP ÷ per-image PyTorch eager pipeline | ≥ 5.0× | 4.500× | no |" in page
    assert "prepared and has not been run on a GPU" in page
    json.dumps(r)  # the record stays plain JSON
    assert np.isfinite(r["summary"]["service_over_eager"])
