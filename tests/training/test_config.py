"""Presets, per-method preset settings, and the order in which a config file and flags override them."""

import json

import pytest

from training.config import METHOD_PRESETS, PRESETS, build_config


def test_method_settings_apply_wherever_the_method_is_chosen(tmp_path):
    flag = build_config("cpu-small", ssl={"method": "dino"})
    assert flag.ssl.backbone == "efficientnet-lite0" and flag.ssl.prototypes == 1024
    assert flag.ssl.teacher_temp == METHOD_PRESETS["cpu-small"]["dino"]["ssl"]["teacher_temp"]
    f = tmp_path / "dino.json"
    f.write_text(json.dumps({"ssl": {"method": "dino"}}))
    assert build_config("cpu-small", f).ssl.prototypes == 1024
    # Another method keeps the preset's own settings.
    simclr = build_config("cpu-small", ssl={"method": "simclr"})
    assert simclr.ssl.prototypes == 65536 and simclr.ssl.lr == PRESETS["cpu-small"]["ssl"]["lr"]


def test_gpu_paper_dino_is_the_papers_vit_s16():
    cfg = build_config("gpu-paper", ssl={"method": "dino"})
    assert cfg.ssl.backbone == "vit-small-16" and cfg.clean.size == 224 and cfg.ssl.init == "scratch"
    assert build_config("gpu-paper").ssl.backbone == "efficientnet-lite0"


def test_file_and_flags_override_method_settings(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"ssl": {"method": "dino", "prototypes": 256, "backbone": "vit-micro-8"}}))
    cfg = build_config("cpu-small", f, ssl={"backbone": "resnet18-half", "init": "scratch"})
    assert cfg.ssl.prototypes == 256  # the file over the method's preset
    assert cfg.ssl.backbone == "resnet18-half"  # the flag over the file
    assert cfg.ssl.lr == METHOD_PRESETS["cpu-small"]["dino"]["ssl"]["lr"]  # untouched: from the method


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="unknown preset"):
        build_config("laptop")


def test_smoke_dino_runs_a_tiny_head():
    cfg = build_config("smoke", ssl={"method": "dino"})
    assert cfg.ssl.prototypes <= 256 and cfg.ssl.head_hidden <= 128 and cfg.clean.size == 32


def test_a_pretrained_start_brings_its_input_scaling_into_the_card():
    from training.models.efficientnet import PRETRAINED_PREPROCESS

    cfg = build_config("cpu-small")
    assert (cfg.ssl.backbone, cfg.ssl.init) == ("efficientnet-lite0", "imagenet")
    assert (cfg.clean.mean, cfg.clean.std) == (PRETRAINED_PREPROCESS["mean"], PRETRAINED_PREPROCESS["std"])
    # A configuration that sets the scaling itself keeps it; a scratch start keeps the project's default.
    assert build_config("cpu-small", clean={"mean": 0.4, "std": 0.3}).clean.mean == 0.4
    scratch = build_config("cpu-small-scratch")
    assert scratch.ssl.init == "scratch" and (scratch.clean.mean, scratch.clean.std) == (0.5, 0.25)
    # The scaling survives a round trip through config.json (resumed runs compare configurations).
    from training.config import TrainConfig

    assert TrainConfig.model_validate_json(cfg.model_dump_json()) == cfg


def test_imagenet_init_needs_a_backbone_with_weights():
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_config("cpu-small", ssl={"backbone": "resnet18-half"})
    assert (
        build_config("cpu-small", ssl={"backbone": "resnet18-half", "init": "scratch"}).ssl.init == "scratch"
    )


def test_cli_passes_ssl_epochs_zero_and_init(monkeypatch, tmp_path):
    """--ssl-epochs 0 means "pretrained features only"; it used to be dropped as falsy."""
    import training.run
    from training.cli import main

    seen = {}

    def fake_run(cfg, *args, **kwargs):
        seen["cfg"] = cfg
        return {}

    monkeypatch.setattr(training.run, "run", fake_run)
    assert main(["train", "--ssl-epochs", "0", "--init", "imagenet", "--out", str(tmp_path)]) == 0
    assert seen["cfg"].ssl.epochs == 0 and seen["cfg"].ssl.init == "imagenet"
    main(["train", "--preset", "cpu-small", "--init", "scratch", "--backbone", "resnet18-quarter"])
    assert seen["cfg"].ssl.init == "scratch" and seen["cfg"].ssl.backbone == "resnet18-quarter"
