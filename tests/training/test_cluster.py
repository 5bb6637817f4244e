"""The cluster step's backbone fine-tuning: its own learning rate and its own views."""

import pytest

torch = pytest.importorskip("torch")

from service.clean import CleanConfig  # noqa: E402
from training.cluster.fusc import train_cluster_heads  # noqa: E402
from training.config import ClusterConfig, build_config  # noqa: E402
from training.data.augment import STRONG, WEAK  # noqa: E402
from training.models import build_backbone  # noqa: E402


def _finetune(inputs, backbone_lr):
    frames, emb, nbrs = inputs
    clean, cpu = CleanConfig(size=32), torch.device("cpu")
    cfg = ClusterConfig(
        num_clusters=3,
        num_heads=2,
        epochs=2,
        batch_size=8,
        lr=1e-2,
        update_backbone=True,
        backbone_lr=backbone_lr,
    )
    torch.manual_seed(0)
    backbone = build_backbone("resnet18-quarter", stem="stride1", img_size=32)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    head, _ = train_cluster_heads(emb, nbrs, cfg, cpu, 0, backbone, frames, clean)
    weights = [k for k in before if k.endswith("weight")]
    moved = max(float((backbone.state_dict()[k] - before[k]).abs().max()) for k in weights)
    return moved, head


def test_backbone_learns_at_its_own_rate(tiny_cluster_inputs):
    frozen, head = _finetune(tiny_cluster_inputs, backbone_lr=1e-12)
    assert frozen < 1e-6  # the backbone's weights stay put ...
    assert float(head.weight.detach().abs().sum()) > 0  # ... while the heads train at lr
    moving, _ = _finetune(tiny_cluster_inputs, backbone_lr=1e-3)
    assert moving > 1e-4


def test_finetuning_views_are_strong_by_default_and_configurable():
    assert ClusterConfig().augment == STRONG
    assert ClusterConfig().backbone_lr is None
    cfg = build_config("gpu-paper", cluster={"augment": {"field_p": 0.0, "max_rotation_deg": 8.0}})
    assert cfg.cluster.update_backbone and cfg.cluster.augment.max_rotation_deg == 8.0
    assert cfg.cluster.augment != WEAK and cfg.cluster.augment.field_p == 0.0


def test_a_backbone_rate_of_zero_means_frozen_not_the_heads_rate():
    from training.evaluate.report import _backbone_rate

    assert ClusterConfig(lr=1e-2).backbone_rate == 1e-2
    assert ClusterConfig(lr=1e-2, backbone_lr=0.0).backbone_rate == 0.0
    assert _backbone_rate({"lr": 1e-2, "backbone_lr": 0.0}) == 0.0
    assert _backbone_rate({"lr": 1e-2}) == 1e-2
