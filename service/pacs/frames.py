"""The frame policy: which frames of an instance go through the pipeline, and how one answer comes out.

* ``middle`` (default): the middle frame (frame ``n // 2``, 0-based) through ``Pipeline.cluster``, exactly
  as the HTTP service does for a multi-frame upload. A single-frame instance is its own middle.
* ``every_nth``: frames 0, N, 2N, ... (at most ``frame_max``), each decoded and cleaned like an upload, one
  model call for all; the answer is the cluster most frames vote for (a tie goes to the cluster with the
  larger summed probability, then to the lower id), reported through the frame of that cluster with the
  highest probability. The record lists the frames used and the votes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from service.errors import FuscError
from service.pipeline import ClusterResult, Pipeline


def frame_indices(n_frames: int, policy: str, step: int, limit: int) -> list[int]:
    """0-based frames the policy looks at, for an instance of ``n_frames`` frames."""
    n_frames = max(1, n_frames)
    if policy == "middle":
        return [n_frames // 2]
    if policy == "every_nth":
        return list(range(0, n_frames, step))[:limit]
    raise ValueError(f"unknown frame policy {policy!r}")


def majority(probs: np.ndarray) -> tuple[int, int, dict[int, int]]:
    """(winning cluster, representative row, votes) for per-frame probabilities [F, K]."""
    probs = np.asarray(probs, dtype=np.float64)
    winners = probs.argmax(axis=1)
    votes: dict[int, int] = {}
    for c in winners:
        votes[int(c)] = votes.get(int(c), 0) + 1
    # Most votes, then the larger summed probability, then the lower cluster id.
    cluster = min(votes, key=lambda c: (-votes[c], -float(probs[:, c].sum()), c))
    rows = np.flatnonzero(winners == cluster)
    row = int(rows[np.argmax(probs[rows, cluster])])
    return cluster, row, votes


def classify(
    pipeline: Pipeline, data: bytes, n_frames: int, *, policy: str, step: int, limit: int
) -> dict[str, Any]:
    """One instance's result record (what the queue stores and the write-back sends). Raises the
    FuscError of the instance (decode, clean) or of the backend."""
    frames = frame_indices(n_frames, policy, step, limit)
    votes: dict[int, int] | None = None
    if policy == "middle":
        (answer,) = pipeline.cluster([data])
        if isinstance(answer, FuscError):
            raise answer
        assert isinstance(answer, ClusterResult)
        result = answer
    else:
        prepared = [pipeline.prepare(data, frame_index=i) for i in frames]
        inference = pipeline.infer(np.stack([p.tensor for p in prepared]))
        cluster, row, votes = majority(inference.probs)
        result = pipeline.result(
            prepared[row],
            inference.probs[row],
            inference.embed_ms,
            inference.assign_ms,
            float(inference.ood_score[row]),
        )
        assert result.cluster == cluster
    return {
        "cluster": result.cluster,
        "view": result.view,
        "view_reason": result.view_reason,
        "confidence": round(result.confidence, 6),
        "ood": result.ood,
        "ood_score": None if result.ood_score is None else round(result.ood_score, 6),
        "model_version": result.model_version,
        "frame_policy": policy,
        "frames": frames,
        "n_frames": max(1, n_frames),
        "votes": None if votes is None else {str(k): v for k, v in sorted(votes.items())},
    }
