"""The run's 2-D map of its embeddings, for the report and the review app (``map_x``, ``map_y``).

t-SNE (scikit-learn, when installed) on a sample of at most ``sample`` embeddings reduced to 50 principal
components; every other image is placed at the similarity-weighted mean of its 5 nearest sampled neighbours
(faiss, in the same 50-d space), so that a million-image archive costs one t-SNE of a sample plus a kNN
pass. Without scikit-learn the map is the first two principal components, and the manifest says so.
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger("fusc.archive")

PCA_DIMS = 50
BLOCK = 65536


def _sample(n: int, size: int, seed: int) -> np.ndarray:
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def _project(emb: np.ndarray, mean: np.ndarray, basis: np.ndarray) -> np.ndarray:
    out = np.empty((len(emb), basis.shape[1]), np.float32)
    for start in range(0, len(emb), BLOCK):
        block = np.asarray(emb[start : start + BLOCK], np.float32)
        out[start : start + BLOCK] = (block - mean) @ basis
    return out


def tsne_available() -> bool:
    try:
        import sklearn.manifold  # noqa: F401
    except ImportError:
        return False
    return True


def map_2d(
    emb: np.ndarray, method: str = "auto", *, sample: int = 10_000, seed: int = 0
) -> tuple[np.ndarray, str]:
    """float32 [N, 2] and the method used ("tsne", "pca" or "none")."""
    n = len(emb)
    if method == "none" or n == 0:
        return np.full((n, 2), np.nan, np.float32), "none"
    if method == "auto":
        method = "tsne" if tsne_available() and n >= 10 else "pca"
    idx = _sample(n, sample, seed)
    ref = np.asarray(emb[idx], np.float32)
    mean = ref.mean(axis=0)
    _, _, vt = np.linalg.svd(ref - mean, full_matrices=False)
    basis = vt[: min(PCA_DIMS, vt.shape[0])].T.astype(np.float32)
    reduced = _project(emb, mean, basis)
    if reduced.shape[1] < 2:  # one or two images: as many components as they span
        reduced = np.pad(reduced, ((0, 0), (0, 2 - reduced.shape[1])))
    if method == "pca" or n < 10:
        return np.ascontiguousarray(reduced[:, :2]), "pca"
    if method != "tsne":
        raise ValueError(f"unknown map method {method!r}: auto, tsne, pca or none")
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, max(2.0, (len(idx) - 1) / 3.0)))
    xy_ref = TSNE(
        n_components=2, perplexity=perplexity, init="pca", random_state=seed, learning_rate="auto"
    ).fit_transform(reduced[idx])
    xy = np.empty((n, 2), np.float32)
    xy[idx] = xy_ref
    rest = np.setdiff1d(np.arange(n), idx, assume_unique=True)
    if len(rest):
        import faiss

        index = faiss.IndexFlatL2(reduced.shape[1])
        index.add(np.ascontiguousarray(reduced[idx]))
        k = min(5, len(idx))
        for start in range(0, len(rest), BLOCK):
            rows = rest[start : start + BLOCK]
            dist, nn = index.search(np.ascontiguousarray(reduced[rows]), k)
            weight = 1.0 / (np.sqrt(np.maximum(dist, 0)) + 1e-6)
            weight /= weight.sum(axis=1, keepdims=True)
            xy[rows] = (xy_ref[nn] * weight[..., None]).sum(axis=1)
    return xy, "tsne"
