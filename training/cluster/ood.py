"""Out-of-distribution calibration written into the model card.

``knn_cosine`` (the default): a bank of training embeddings travels with the model (float16 .npy beside the
card); an image's score is the mean cosine similarity of its embedding to its ``k`` nearest bank rows, and
the threshold is a low quantile of that score over images the bank does not hold — held-out subjects when
the run has them, else the training images scored without themselves. Far from every training image means
out of distribution: a non-ultrasound frame, or a view the model never saw, falls well below it, where the
nearest *cluster centroid* (the older ``centroid_cosine``) can still be close to it.
"""

from __future__ import annotations

import numpy as np

from service.card import OODBank, OODCalibration

BANK_FILENAME = "ood_bank.npy"


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


def knn_scores(queries: np.ndarray, bank: np.ndarray, k: int, exclude_self: bool = False) -> np.ndarray:
    """Mean cosine similarity of each query to its ``k`` most similar bank rows (the same arithmetic as the
    service's; ``exclude_self``: queries are the bank's own rows, each left out of its own neighbours)."""
    q, b = _unit(queries), np.asarray(bank, dtype=np.float32)
    out = np.empty(len(q), np.float32)
    for i in range(0, len(q), 1024):
        sim = q[i : i + 1024] @ b.T
        if exclude_self:
            rows = np.arange(i, min(i + 1024, len(q)))
            sim[rows - i, rows] = -np.inf
        kk = min(k, sim.shape[1])
        top = np.partition(sim, sim.shape[1] - kk, axis=1)[:, -kk:]
        out[i : i + 1024] = top.mean(1)
    return out


def calibrate_knn(
    train_embeddings: np.ndarray,
    heldout_embeddings: np.ndarray | None = None,
    k: int = 5,
    quantile: float = 0.02,
    max_bank: int = 2048,
    seed: int = 0,
) -> tuple[OODCalibration, np.ndarray]:
    """The calibration for the card and the bank (float16 [M, D], unit rows) to write beside it.

    The bank is the training embeddings (a random ``max_bank`` of them when there are more); the threshold
    is the ``quantile`` of the held-out images' scores, or of the training images' leave-one-out scores
    when nothing was held out.
    """
    train = _unit(train_embeddings)
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(train), max_bank, replace=False)) if len(train) > max_bank else None
    bank = (train[keep] if keep is not None else train).astype(np.float16)
    bank32 = bank.astype(np.float32)
    if heldout_embeddings is not None and len(heldout_embeddings):
        scores = knn_scores(heldout_embeddings, bank32, k)
        source = f"held-out subjects ({len(scores)} images)"
    elif keep is None:
        scores = knn_scores(train, bank32, k, exclude_self=True)
        source = f"training images, each scored without itself ({len(scores)} images)"
    else:
        rest = np.setdiff1d(np.arange(len(train)), keep)
        scores = knn_scores(train[rest], bank32, k)
        source = f"training images outside the bank ({len(scores)} images)"
    cal = OODCalibration(
        method="knn_cosine",
        bank=OODBank(path=BANK_FILENAME, sha256="", count=len(bank)),
        k=k,
        threshold=float(np.quantile(scores, quantile)),
        quantile=quantile,
        calibrated_on=source,
    )
    return cal, bank


def calibrate_ood(embeddings: np.ndarray, pred: np.ndarray, k: int, quantile: float = 0.01) -> OODCalibration:
    """``centroid_cosine`` (older cards): centroids = normalised mean embedding per filled cluster; threshold
    = ``quantile`` of the training images' similarity to their nearest centroid."""
    emb = _unit(embeddings)
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
