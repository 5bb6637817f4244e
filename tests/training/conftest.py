"""Fixtures shared by the training tests."""

import pytest


@pytest.fixture
def one_thread():
    """One torch thread: on tiny tensors two threads waiting on each other cost more than they save."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_cluster_inputs():
    """16 random 32-px frames, their (random, unit-norm) embeddings and two neighbours each."""
    torch = pytest.importorskip("torch")
    import numpy as np
    import torch.nn.functional as F

    frames = torch.randint(
        0, 255, (16, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    emb = F.normalize(torch.randn(16, 128, generator=torch.Generator().manual_seed(2)), dim=1).numpy()
    nbrs = np.stack([np.roll(np.arange(16), k) for k in (1, 2)], 1)
    return frames, emb, nbrs
