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
    cfg = build_config(
        "gpu-paper",
        cluster={"update_backbone": True, "augment": {"field_p": 0.0, "max_rotation_deg": 8.0}},
    )
    assert cfg.cluster.update_backbone and cfg.cluster.augment.max_rotation_deg == 8.0
    assert cfg.cluster.augment != WEAK and cfg.cluster.augment.field_p == 0.0


def test_a_backbone_rate_of_zero_means_frozen_not_the_heads_rate():
    from training.evaluate.report import _backbone_rate

    assert ClusterConfig(lr=1e-2).backbone_rate == 1e-2
    assert ClusterConfig(lr=1e-2, backbone_lr=0.0).backbone_rate == 0.0
    assert _backbone_rate({"lr": 1e-2, "backbone_lr": 0.0}) == 0.0
    assert _backbone_rate({"lr": 1e-2}) == 1e-2


def test_standardisation_folds_into_the_exported_head():
    """The heads learn on standardised embeddings; the head they hand over reads the raw ones and gives the
    same logits."""
    import numpy as np

    from training.cluster.fusc import fold_standardization, standardizer

    rng = np.random.default_rng(0)
    emb = (rng.standard_normal((50, 6)) * [1, 2, 3, 0.1, 0.01, 5] + 3).astype(np.float32)
    mean, inv_std = standardizer(emb, True)
    head = torch.nn.Linear(6, 3)
    x = torch.from_numpy(emb)
    with torch.no_grad():
        assert torch.allclose(
            fold_standardization(head, mean, inv_std)(x), head((x - mean) * inv_std), atol=1e-4
        )
    zero, one = standardizer(emb, False)
    assert torch.equal(zero, torch.zeros(6)) and torch.equal(one, torch.ones(6))


def _blobs(n_per=40, k=3, dim=16, seed=0):
    """k well separated unit-norm blobs sharing a large common component (as pretrained features do), with
    a few noisy 'augmented views' of each point and its true neighbours."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, dim)) * 0.3
    common = np.ones(dim) * 3
    labels = np.repeat(np.arange(k), n_per)
    emb = common + centres[labels] + rng.standard_normal((k * n_per, dim)) * 0.05
    unit = lambda a: (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
    views = np.stack([unit(emb + rng.standard_normal(emb.shape) * 0.05) for _ in range(4)])
    nbrs = np.stack(
        [
            rng.choice(np.flatnonzero((labels == c) & (np.arange(len(labels)) != i)), 5)
            for i, c in enumerate(labels)
        ]
    )
    return unit(emb), views, nbrs, labels


def test_head_only_step_on_views_separates_blobs_with_confidence():
    from training.cluster.fusc import predict
    from training.cluster.selflabel import self_label
    from training.config import SelfLabelConfig
    from training.evaluate.metrics import cluster_metrics

    emb, views, nbrs, labels = _blobs()
    cfg = ClusterConfig(
        num_clusters=3, num_heads=2, epochs=60, batch_size=40, lr=1e-2, views=4, standardize=True
    )
    head, info = train_cluster_heads(emb, nbrs, cfg, torch.device("cpu"), 0, views=views)
    probs = predict(head, emb)
    assert cluster_metrics(probs.argmax(1), labels)["purity"] == 1.0
    assert (probs.max(1) >= 0.99).mean() > 0.5
    # Head-only self-labeling on the same views: confident share recorded per epoch, clusters kept.
    out = self_label(
        None, head, None, SelfLabelConfig(epochs=3, lr=1e-3, batch_size=40), None, torch.device("cpu"), 0,
        embeddings=emb, views=views,
    )  # fmt: skip
    shares = [h["confident_share"] for h in out["history"]]
    assert len(shares) == 3 and shares[0] > 0.5
    assert cluster_metrics(predict(head, emb).argmax(1), labels)["purity"] == 1.0
    # Without standardisation the same budget leaves the heads far less sure: the common component dominates.
    raw = cfg.model_copy(update={"standardize": False})
    head_raw, _ = train_cluster_heads(emb, nbrs, raw, torch.device("cpu"), 0, views=views)
    assert (predict(head_raw, emb).max(1) >= 0.99).mean() < (probs.max(1) >= 0.99).mean()


def test_augmented_embeddings_are_seeded_and_leave_the_global_state(tiny_cluster_inputs):
    from training.cluster.fusc import augmented_embeddings

    frames, _, _ = tiny_cluster_inputs
    backbone = build_backbone("resnet18-quarter", stem="stride1", img_size=32)
    clean = CleanConfig(size=32)
    torch.manual_seed(5)
    a = augmented_embeddings(backbone, frames, STRONG, clean, torch.device("cpu"), 2, seed=3)
    after = torch.rand(1)
    torch.manual_seed(5)
    b = augmented_embeddings(backbone, frames, STRONG, clean, torch.device("cpu"), 2, seed=3)
    assert a.shape == (2, 16, backbone.out_dim) and (a == b).all()
    assert torch.equal(torch.rand(1), after)  # the caller's random stream is as it was
    assert not (a[0] == a[1]).all()  # two different views
