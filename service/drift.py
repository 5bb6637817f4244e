"""Drift: the cluster mix of the service's last N answers against the mix the model was trained on.

A new scanner, preset or referral pattern shows first as a change in how images spread over the clusters.
The training mix comes from the model card (``quality["cluster_sizes_train"]``, images per cluster in the
training split); a card without it is compared with the uniform mix, and the log says so once. The
divergence is Jensen-Shannon in bits: 0 for the same mix, 1 for mixes with nothing in common; it is
exported as ``fusc_cluster_mix_divergence`` beside ``fusc_cluster_mix_answers`` (how many answers it rests
on: a window that is still filling is noisy).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from service import metrics
from service.card import ModelCard

logger = logging.getLogger("fusc.service")


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence of two distributions over the same clusters, in bits (0..1)."""
    p = np.asarray(p, np.float64) / np.sum(p)
    q = np.asarray(q, np.float64) / np.sum(q)
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        nz = a > 0  # 0 * log 0 = 0; where a > 0, m > 0 too
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return max(0.0, 0.5 * kl(p) + 0.5 * kl(q))


def training_mix(card: ModelCard) -> tuple[np.ndarray, str]:
    """(the training mix over the card's K clusters, where it came from: "model_card" or "uniform")."""
    k = card.num_clusters
    sizes = card.quality.get("cluster_sizes_train")
    try:
        mix = np.asarray(sizes, dtype=np.float64)
        valid = mix.shape == (k,) and bool(np.all(np.isfinite(mix))) and mix.min() >= 0 and mix.sum() > 0
    except (TypeError, ValueError):
        valid = False
    if valid:
        return mix / mix.sum(), "model_card"
    logger.info(
        "the model card has no usable quality.cluster_sizes_train; cluster-mix drift is measured against a "
        "uniform mix over the %d clusters",
        k,
    )
    return np.full(k, 1.0 / k), "uniform"


class ClusterMix:
    """The last ``window`` answers' clusters; each new answer updates the divergence gauge.

    Answers come from the event loop and from worker threads (``Pipeline.cluster``): a lock keeps the
    window and its counts consistent. O(K) per answer.
    """

    def __init__(self, reference: Sequence[float] | np.ndarray, window: int, source: str = "model_card"):
        self.reference = np.asarray(reference, np.float64)
        self.window = window
        self.source = source
        self._recent: deque[int] = deque()
        self._counts = np.zeros(len(self.reference), np.int64)
        self._lock = threading.Lock()
        self._divergence = 0.0

    @classmethod
    def from_card(cls, card: ModelCard, window: int) -> ClusterMix:
        mix, source = training_mix(card)
        return cls(mix, window, source)

    def record(self, cluster: int) -> float:
        with self._lock:
            self._recent.append(cluster)
            self._counts[cluster] += 1
            if len(self._recent) > self.window:
                self._counts[self._recent.popleft()] -= 1
            self._divergence = js_divergence(self._counts, self.reference)
            answers = len(self._recent)
        metrics.CLUSTER_MIX_DIVERGENCE.set(self._divergence)
        metrics.CLUSTER_MIX_ANSWERS.set(answers)
        return self._divergence

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            answers = len(self._recent)
            recent = (self._counts / answers).round(4).tolist() if answers else None
            return {
                "window": self.window,
                "answers": answers,
                "divergence": round(self._divergence, 6),
                "training_mix_source": self.source,
                "training_mix": self.reference.round(4).tolist(),
                "recent_mix": recent,
            }
