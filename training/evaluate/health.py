"""Is the SSL embedding alive? Signs of collapse, computed on the embeddings a run already has.

A collapsed backbone maps every image to (almost) the same point; every later step then clusters noise and
the report looks plausible but means nothing. A run checks three signs and says so in its summary, its
report and its log:

- mean cosine similarity between the unit embeddings of random image pairs (1.0: one point);
- effective rank: exp of the entropy of the normalised singular values of the centred embeddings
  (1: a line; a healthy embedding of a few views uses tens of dimensions);
- DINO only: the last epoch's loss against log(prototypes), where it sits when the targets are uniform.
"""

from __future__ import annotations

import math

import numpy as np

MAX_MEAN_COSINE = 0.95
MIN_EFFECTIVE_RANK = 2.0
# DINO's loss within this share of log(prototypes): the teacher's targets are (almost) uniform.
DINO_UNIFORM_SHARE = 0.98


def effective_rank(emb: np.ndarray) -> float:
    x = emb - emb.mean(axis=0, keepdims=True)
    s = np.linalg.svd(x.astype(np.float64), compute_uv=False)
    if s.sum() <= 0:
        return 1.0
    p = s / s.sum()
    p = p[p > 0]
    return float(math.exp(-(p * np.log(p)).sum()))


def mean_pair_cosine(emb: np.ndarray, pairs: int = 4096, seed: int = 0) -> float:
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    i, j = rng.integers(0, len(unit), pairs), rng.integers(0, len(unit), pairs)
    keep = i != j
    return float((unit[i[keep]] * unit[j[keep]]).sum(axis=1).mean()) if keep.any() else 1.0


def embedding_health(
    emb: np.ndarray, method: str, loss_history: list[float], prototypes: int | None = None
) -> dict:
    """{mean_pair_cosine, effective_rank, dino_loss_share_of_uniform, collapsed, reasons}."""
    cos = mean_pair_cosine(emb)
    rank = effective_rank(emb[:5000])
    reasons = []
    if cos > MAX_MEAN_COSINE:
        reasons.append(f"mean cosine between images {cos:.3f} > {MAX_MEAN_COSINE}")
    if rank < MIN_EFFECTIVE_RANK:
        reasons.append(f"effective rank {rank:.2f} < {MIN_EFFECTIVE_RANK}")
    share = None
    if method == "dino" and prototypes and loss_history:
        share = float(loss_history[-1] / math.log(prototypes))
        if share > DINO_UNIFORM_SHARE:
            reasons.append(
                f"DINO loss {loss_history[-1]:.3f} is {share:.1%} of log({prototypes}) = "
                f"{math.log(prototypes):.3f}: the teacher's targets are uniform"
            )
    return {
        "mean_pair_cosine": round(cos, 4),
        "effective_rank": round(rank, 2),
        "dino_loss_share_of_uniform": None if share is None else round(share, 4),
        "collapsed": bool(reasons),
        "reasons": reasons,
    }
