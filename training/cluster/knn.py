"""Nearest-neighbour mining in embedding space with faiss (exact inner product on unit vectors)."""

from __future__ import annotations

import numpy as np


def mine_neighbors(embeddings: np.ndarray, k: int = 20, use_gpu: bool | None = None) -> np.ndarray:
    """Top-``k`` neighbours of each row by cosine similarity, the row itself excluded: int64 [N, k]."""
    import faiss

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    faiss.normalize_L2(x)
    index = faiss.IndexFlatIP(x.shape[1])
    if use_gpu is None:
        use_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if use_gpu:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(x)
    k = min(k, len(x) - 1)
    _, idx = index.search(x, k + 1)
    # Drop self; duplicates of an image may outrank it, so remove by id rather than by column.
    out = np.empty((len(x), k), np.int64)
    for i, row in enumerate(idx):
        row = row[row != i]
        out[i] = row[:k]
    return out


def neighbor_accuracy(neighbors: np.ndarray, labels: np.ndarray) -> float:
    """Share of mined neighbours that carry the anchor's label (a diagnostic, where labels exist)."""
    labels = np.asarray(labels)
    return float((labels[neighbors] == labels[:, None]).mean())
