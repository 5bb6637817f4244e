"""Each SSL method builds, takes optimiser steps on tiny frames and returns a working backbone."""

import pytest

torch = pytest.importorskip("torch")

from service.clean import CleanConfig  # noqa: E402
from training.config import SSLConfig  # noqa: E402
from training.ssl import compute_embeddings, train_ssl  # noqa: E402


@pytest.mark.parametrize("method", ["simclr", "barlowtwins"])
def test_method_trains_and_embeds(method):
    clean = CleanConfig(size=32)
    cfg = SSLConfig(
        method=method,
        backbone="resnet18-quarter",
        small_stem=True,
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
