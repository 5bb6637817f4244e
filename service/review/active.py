"""What to label next: an active-learning pick of images whose labels would teach the most.

Three criteria, each over the images without a label of their own and not marked:

- ``least``: the least confident answers (lowest top-1 probability);
- ``boundary``: the images closest to a cluster boundary (smallest gap between top-1 and top-2);
- ``coreset``: k-center greedy over the embeddings, started from the images already labelled (or, with
  none, from each cluster's most confident image): every pick is the image farthest from all picked and
  labelled ones, so the pick covers the parts of the archive that no label speaks for yet.

``mixed`` takes from the three in turn, without repeats.
"""

from __future__ import annotations

import numpy as np

from service.review.state import Review

STRATEGIES = ("mixed", "least", "boundary", "coreset")


def _candidates(review: Review) -> np.ndarray:
    rows = np.flatnonzero(review.ok)
    taken = set(review.image_labels) | set(review.marks)
    return np.asarray([r for r in rows.tolist() if r not in taken], dtype=np.int64)


def least_confident(review: Review, n: int) -> list[int]:
    rows = _candidates(review)
    return rows[np.argsort(review.confidence[rows], kind="stable")][:n].tolist()


def boundary(review: Review, n: int) -> list[int]:
    rows = _candidates(review)
    return rows[np.argsort(review.margin[rows], kind="stable")][:n].tolist()


def coreset(review: Review, n: int) -> list[int]:
    rows = _candidates(review)
    if len(rows) == 0 or n <= 0:
        return []
    seeds = [r for r in review.image_labels if review.ok[r]]
    if not seeds:
        seeds = [int(review.members(s.id)[0]) for s in review.clusters()]
    x = review.unit_embeddings(rows)
    centres = review.unit_embeddings(np.asarray(seeds, dtype=np.int64))
    # Cosine distance to the nearest centre, updated as each pick becomes a centre.
    dist = 1.0 - (x @ centres.T).max(axis=1)
    picks: list[int] = []
    for _ in range(min(n, len(rows))):
        i = int(np.argmax(dist))
        picks.append(int(rows[i]))
        dist = np.minimum(dist, 1.0 - x @ x[i])
        dist[i] = -np.inf
    return picks


def pick(review: Review, n: int, strategy: str = "mixed") -> list[tuple[int, str]]:
    """``n`` rows to label next, each with the criterion that chose it."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: one of {', '.join(STRATEGIES)}")
    lists = {
        "least": least_confident,
        "boundary": boundary,
        "coreset": coreset,
    }
    if strategy != "mixed":
        return [(r, strategy) for r in lists[strategy](review, n)]
    ranked = {name: fn(review, n) for name, fn in lists.items()}
    out: list[tuple[int, str]] = []
    seen: set[int] = set()
    position = dict.fromkeys(ranked, 0)
    while len(out) < n and any(position[k] < len(v) for k, v in ranked.items()):
        for name, rows in ranked.items():
            while position[name] < len(rows) and rows[position[name]] in seen:
                position[name] += 1
            if position[name] < len(rows) and len(out) < n:
                row = rows[position[name]]
                out.append((row, name))
                seen.add(row)
                position[name] += 1
    return out
