"""python -m service.triton repo: one generator, two variants (NGC onnxruntime backend, CPU Python backend).

Every config.pbtxt is parsed with Triton's own ModelConfig protobuf (from tritonclient), so the NGC
variant, which no test here can serve, is at least a well-formed repository of the right shape.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from service.card import load_card
from service.triton.__main__ import main
from service.triton.repository import (
    PIPELINE_NAME,
    PREPROCESS_NAME,
    RepositoryExistsError,
    TritonRepositoryOptions,
    service_modules,
    write_triton_repository,
)

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
text_format = pytest.importorskip("google.protobuf.text_format")

MODELS = ["fusc_backbone", "fusc_ensemble", "fusc_head", PIPELINE_NAME, PREPROCESS_NAME]


def configs(root: Path) -> dict[str, object]:
    out = {}
    for path in sorted(root.glob("*/config.pbtxt")):
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        assert config.name == path.parent.name
        out[config.name] = config
    return out


@pytest.mark.parametrize("variant", ["ngc", "cpu"])
def test_both_variants_serve_the_same_models(tiny_repo: Path, tmp_path: Path, variant: str) -> None:
    out = tmp_path / variant
    assert (
        main(
            [
                "repo",
                "--from",
                str(tiny_repo),
                "--out",
                str(out),
                "--variant",
                variant,
                "--max-batch-size",
                "8",
            ]
        )
        == 0
    )
    card = load_card(out)  # the copy is a fusc repository too: card, ONNX files and hashes
    assert card == load_card(tiny_repo)
    cfg = configs(out)
    assert sorted(cfg) == MODELS
    assert {c.max_batch_size for c in cfg.values()} == {8}
    size, d, k = card.preprocess.size, card.embedding_dim, card.num_clusters
    for model, dims_in, dims_out in ((card.backbone, [1, size, size], [d]), (card.head, [d], [k])):
        c = cfg[model.name]
        assert c.backend == ("onnxruntime" if variant == "ngc" else "python")
        assert [(i.name, list(i.dims)) for i in c.input] == [(model.input_name, dims_in)]
        assert [(o.name, list(o.dims)) for o in c.output] == [(model.output_name, dims_out)]
        assert c.HasField("dynamic_batching")
        assert c.parameters["fusc_sha256"].string_value == model.sha256
        version = out / model.name / str(model.version)
        assert (version / "model.onnx").read_bytes() == model.path(tiny_repo).read_bytes()
        assert (version / "model.py").is_file() == (variant == "cpu")
    # Decode + clean run in the Python backend in both variants, from a copy of the service's modules.
    pre = cfg[PREPROCESS_NAME]
    assert pre.backend == "python" and pre.input[0].data_type == model_config_pb2.TYPE_STRING
    copied = {p.stem for p in (out / PREPROCESS_NAME / "1" / "service").glob("*.py")}
    assert copied == {"__init__", *service_modules()} and {"decode", "clean", "errors"} <= copied
    pipeline = cfg[PIPELINE_NAME]
    assert pipeline.platform == "ensemble" and pipeline.input[0].data_type == model_config_pb2.TYPE_STRING
    steps = [s.model_name for s in pipeline.ensemble_scheduling.step]
    assert steps == [PREPROCESS_NAME, card.backbone.name, card.head.name]
    assert [o.name for o in pipeline.output] == [card.backbone.output_name, card.head.output_name]


def test_the_variants_differ_only_in_the_backend_of_the_onnx_models(tiny_repo: Path, tmp_path: Path) -> None:
    written = {}
    for variant in ("ngc", "cpu"):
        write_triton_repository(tiny_repo, tmp_path / variant, TritonRepositoryOptions(variant=variant))
        written[variant] = configs(tmp_path / variant)
    for name in MODELS:
        ngc, cpu = written["ngc"][name], written["cpu"][name]
        for c in (ngc, cpu):
            c.ClearField("backend")
            c.ClearField("instance_group")
        assert ngc == cpu, name


def test_an_existing_output_is_kept_unless_forced(tiny_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    options = TritonRepositoryOptions(variant="cpu", max_batch_size=4)
    write_triton_repository(tiny_repo, out, options)
    (out / "notes.txt").write_text("someone else's file")
    with pytest.raises(RepositoryExistsError):
        write_triton_repository(tiny_repo, out, options)
    write_triton_repository(
        tiny_repo, out, TritonRepositoryOptions(variant="ngc", max_batch_size=2), force=True
    )
    assert configs(out)["fusc_backbone"].backend == "onnxruntime"
    assert not (out / "fusc_backbone" / "1" / "model.py").exists()
    assert (out / "notes.txt").read_text() == "someone else's file"
    assert main(["repo", "--from", str(tiny_repo), "--out", str(tiny_repo), "--variant", "cpu"]) == 2
