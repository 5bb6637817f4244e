"""Each SSL method builds, takes optimiser steps on tiny frames and returns a working backbone."""

import pytest

torch = pytest.importorskip("torch")

from service.clean import CleanConfig  # noqa: E402
from training.config import SSLConfig  # noqa: E402
from training.methods.base import compute_embeddings, train_ssl  # noqa: E402


@pytest.mark.parametrize("method", ["simclr", "barlowtwins"])
def test_method_trains_and_embeds(method):
    clean = CleanConfig(size=32)
    cfg = SSLConfig(
        method=method,
        backbone="resnet18-quarter",
        stem="stride1",
        epochs=2,
        batch_size=16,
        proj_hidden=64,
        proj_dim=32,
    )
    frames = torch.randint(0, 255, (32, 32, 32), dtype=torch.uint8)
    backbone, hist = train_ssl(frames, cfg, clean, torch.device("cpu"))
    assert len(hist) == 2 and all(h == h for h in hist)  # finite, not NaN
    emb = compute_embeddings(backbone, frames, clean, torch.device("cpu"))
    assert emb.shape == (32, backbone.out_dim)
    assert abs(float((emb**2).sum(1).mean()) - 1.0) < 1e-4


def test_balanced_weights_are_inverse_counts():
    from training.cluster.selflabel import balanced_weights

    w = balanced_weights(torch.tensor([0, 0, 0, 1]), 3)
    # counts 3, 1, 0 -> 1/3, 1, 0, rescaled so present classes average to 1
    assert w.tolist() == pytest.approx([0.5, 1.5, 0.0])


def test_self_label_trains_on_confident_samples_only():
    from training.cluster.selflabel import self_label
    from training.config import SelfLabelConfig
    from training.models import build_backbone

    clean = CleanConfig(size=32)
    backbone = build_backbone("resnet18-quarter", stem="stride1").eval()
    head = torch.nn.Linear(backbone.out_dim, 3)
    frames = torch.randint(0, 255, (16, 32, 32), dtype=torch.uint8)
    before = head.weight.detach().clone()
    # Nothing reaches p >= 1.01: no step may be taken.
    out = self_label(
        backbone,
        head,
        frames,
        SelfLabelConfig(epochs=1, threshold=1.01, batch_size=8),
        clean,
        torch.device("cpu"),
    )
    assert out["history"][0]["confident_share"] == 0.0
    assert torch.equal(head.weight, before)
    # With a threshold every sample passes, the head moves.
    out = self_label(
        backbone,
        head,
        frames,
        SelfLabelConfig(epochs=1, threshold=0.0, batch_size=8),
        clean,
        torch.device("cpu"),
    )
    assert out["history"][0]["confident_share"] == 1.0
    assert not torch.equal(head.weight, before)
