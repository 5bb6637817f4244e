"""Clustering metrics of the paper: cluster purity, NMI, Hungarian accuracy, ARI (numpy/scipy only)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def raw_pixels(frames, side: int = 32) -> np.ndarray:
    """The naive baseline's features: gray frames (any sizes) downscaled to side x side, in [0, 1]."""
    import cv2

    small = [cv2.resize(f, (side, side), interpolation=cv2.INTER_AREA) for f in frames]
    return np.stack(small).reshape(len(small), -1).astype(np.float32) / 255.0


def contingency(pred: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts [clusters x classes] with the cluster ids and class values they index."""
    clusters, p = np.unique(pred, return_inverse=True)
    classes, y = np.unique(labels, return_inverse=True)
    table = np.zeros((len(clusters), len(classes)), np.int64)
    np.add.at(table, (p, y), 1)
    return table, clusters, classes


def cluster_purity(pred: np.ndarray, labels: np.ndarray) -> float:
    """Share of images whose cluster's majority class is their own class."""
    table, _, _ = contingency(pred, labels)
    return float(table.max(axis=1).sum() / table.sum())


def hungarian_accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy under the best one-to-one map of clusters to classes (unmatched clusters count wrong)."""
    table, _, _ = contingency(pred, labels)
    rows, cols = linear_sum_assignment(-table)
    return float(table[rows, cols].sum() / table.sum())


def cluster_metrics(pred: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    pred, labels = np.asarray(pred), np.asarray(labels)
    return {
        "purity": cluster_purity(pred, labels),
        "nmi": float(normalized_mutual_info_score(labels, pred)),
        "acc": hungarian_accuracy(pred, labels),
        "ari": float(adjusted_rand_score(labels, pred)),
        "filled_clusters": int(len(np.unique(pred))),
    }
