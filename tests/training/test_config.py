"""Presets, per-method preset settings, and the order in which a config file and flags override them."""

import json

import pytest

from training.config import METHOD_PRESETS, PRESETS, build_config


def test_method_settings_apply_wherever_the_method_is_chosen(tmp_path):
    flag = build_config("cpu-small", ssl={"method": "dino"})
    assert flag.ssl.backbone == "resnet18-quarter" and flag.ssl.prototypes == 1024
    assert flag.ssl.teacher_temp == METHOD_PRESETS["cpu-small"]["dino"]["ssl"]["teacher_temp"]
    f = tmp_path / "dino.json"
    f.write_text(json.dumps({"ssl": {"method": "dino"}}))
    assert build_config("cpu-small", f).ssl.prototypes == 1024
    # Another method keeps the preset's own settings.
    simclr = build_config("cpu-small", ssl={"method": "simclr"})
    assert simclr.ssl.prototypes == 65536 and simclr.ssl.lr == PRESETS["cpu-small"]["ssl"]["lr"]


def test_gpu_paper_dino_is_the_papers_vit_s16():
    cfg = build_config("gpu-paper", ssl={"method": "dino"})
    assert cfg.ssl.backbone == "vit-small-16" and cfg.clean.size == 224
    assert build_config("gpu-paper").ssl.backbone == "resnet18"


def test_file_and_flags_override_method_settings(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"ssl": {"method": "dino", "prototypes": 256, "backbone": "vit-micro-8"}}))
    cfg = build_config("cpu-small", f, ssl={"backbone": "resnet18-half"})
    assert cfg.ssl.prototypes == 256  # the file over the method's preset
    assert cfg.ssl.backbone == "resnet18-half"  # the flag over the file
    assert cfg.ssl.lr == METHOD_PRESETS["cpu-small"]["dino"]["ssl"]["lr"]  # untouched: from the method


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="unknown preset"):
        build_config("laptop")


def test_smoke_dino_runs_a_tiny_head():
    cfg = build_config("smoke", ssl={"method": "dino"})
    assert cfg.ssl.prototypes <= 256 and cfg.ssl.head_hidden <= 128 and cfg.clean.size == 32
