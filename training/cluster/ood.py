"""Out-of-distribution calibration written into the model card: training cluster centroids and a threshold
on the cosine similarity of an embedding to the nearest one."""

from __future__ import annotations

import numpy as np

from service.card import OODCalibration


def calibrate_ood(embeddings: np.ndarray, pred: np.ndarray, k: int, quantile: float = 0.01) -> OODCalibration:
    """Centroids = normalised mean embedding per filled cluster; threshold = ``quantile`` of the training
    images' similarity to their nearest centroid (so about that share of training images is flagged)."""
    emb = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True).clip(1e-12)
    centroids = []
    for c in range(k):
        members = emb[pred == c]
        if len(members):
            m = members.mean(0)
            centroids.append(m / max(float(np.linalg.norm(m)), 1e-12))
    cents = np.stack(centroids).astype(np.float32)
    scores = (emb @ cents.T).max(1)
    return OODCalibration(
        centroids=cents.round(6).tolist(), threshold=float(np.quantile(scores, quantile)), quantile=quantile
    )
