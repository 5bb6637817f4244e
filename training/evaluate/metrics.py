"""Clustering metrics of the paper: cluster purity, NMI, Hungarian accuracy, ARI (numpy/scipy only)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from service.taxonomy import MERGED_VIEWS


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


# Paper Table 2 merges views that are sub-planes of one anatomy: the default fine label -> coarse view map is
# service.taxonomy.MERGED_VIEWS (labels not listed stay as they are). A JSON file given as ``coarse_map`` adds
# or overrides.
COARSE_VIEWS: dict[str, str] = dict(MERGED_VIEWS)


def coarse_map(path=None) -> dict[str, str]:
    """The default fine -> coarse mapping, updated by a JSON object read from ``path`` when given."""
    import json
    from pathlib import Path

    mapping = dict(COARSE_VIEWS)
    if path:
        extra = json.loads(Path(path).read_text())
        if not isinstance(extra, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in extra.items()
        ):
            raise ValueError(f"{path}: the coarse map must be a JSON object of fine label -> coarse view")
        mapping.update(extra)
    return mapping


def to_coarse(labels, mapping: dict[str, str]) -> np.ndarray:
    """Each label's coarse view (itself when unmapped; empty labels stay empty)."""
    return np.array([mapping.get(lab, lab) if lab else lab for lab in labels], dtype=object).astype(str)


def flatten_numbers(tree, prefix: str = "") -> dict[str, float]:
    """``{"a/b/c": value}`` for every int/float leaf of nested dicts (lists and strings are left out)."""
    out: dict[str, float] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten_numbers(value, f"{prefix}/{key}" if prefix else str(key)))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        out[prefix] = float(tree)
    return out


def mean_std(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation (ddof=1; 0 for one run) of every numeric leaf across runs, for
    the leaves that every run has: ``{path: {"mean", "std", "n"}}``."""
    flat = [flatten_numbers(r) for r in runs]
    if not flat:
        return {}
    common = [k for k in flat[0] if all(k in f for f in flat[1:])]
    out = {}
    for key in common:
        values = np.array([f[key] for f in flat])
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        out[key] = {"mean": float(values.mean()), "std": std, "n": len(values)}
    return out
