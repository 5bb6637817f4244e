"""What a run measures on its own images: each prediction against the labels where there are any, beside
k-means on the embeddings and on raw pixels (the baselines), a linear probe (the supervised bound), the
confidence distribution, what self-labeling changed, and cluster names from majority labels."""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans

from training.evaluate.metrics import cluster_metrics, raw_pixels, to_coarse


def evaluate(
    preds: dict[str, np.ndarray],
    embeddings: np.ndarray,
    frames: np.ndarray,
    labels: list,
    sources: list,
    k: int,
    seed: int,
    coarse: dict[str, str] | None = None,
    ssl_embeddings: np.ndarray | None = None,
) -> dict:
    """Per labelled source: metrics of each prediction, of k-means on the embeddings and on raw pixels.

    ``ssl_embeddings``: when the backbone was fine-tuned after SSL, its embeddings before that, scored with
    k-means too (``kmeans_ssl_embeddings``), so the cluster step is compared with both.

    With a ``coarse`` map that merges some of a source's labels, the same predictions are also scored
    against the coarse views (``res["coarse"]``, paper Table 2).
    """
    out: dict = {}
    labels_arr = np.array([lab if lab is not None else "" for lab in labels])
    sources_arr = np.array(sources)
    for source in sorted(set(sources)):
        sel = (sources_arr == source) & (labels_arr != "")
        if sel.sum() < 2 or len(set(labels_arr[sel])) < 2:
            continue
        kk = min(k, int(sel.sum()))
        scored = {name: pred[sel] for name, pred in preds.items()}
        scored["kmeans_embeddings"] = KMeans(kk, n_init=10, random_state=seed).fit_predict(embeddings[sel])
        if ssl_embeddings is not None:
            scored["kmeans_ssl_embeddings"] = KMeans(kk, n_init=10, random_state=seed).fit_predict(
                ssl_embeddings[sel]
            )
        scored["kmeans_raw_pixels"] = KMeans(kk, n_init=10, random_state=seed).fit_predict(
            raw_pixels(frames[sel])
        )
        res: dict = {"n": int(sel.sum()), "classes": int(len(set(labels_arr[sel])))}
        res.update({name: cluster_metrics(pred, labels_arr[sel]) for name, pred in scored.items()})
        if coarse:
            coarse_labels = to_coarse(labels_arr[sel], coarse)
            n_coarse = len(set(coarse_labels))
            if 2 <= n_coarse < res["classes"]:
                res["coarse"] = {
                    "classes": n_coarse,
                    **{name: cluster_metrics(pred, coarse_labels) for name, pred in scored.items()},
                }
        out[source] = res
    return out


def linear_probe(
    embeddings: np.ndarray, frames: np.ndarray, labels: list, sources: list, held: np.ndarray, seed: int
) -> dict[str, dict[str, float]]:
    """Supervised upper bound: logistic regression on the frozen embeddings (and on raw pixels), fitted on
    the training subjects' labels and scored on the held-out subjects, per labelled source."""
    from sklearn.linear_model import LogisticRegression

    out: dict[str, dict[str, float]] = {}
    labels_arr = np.array([lab or "" for lab in labels])
    sources_arr = np.array(sources)
    for source in sorted(set(sources)):
        sel = (sources_arr == source) & (labels_arr != "")
        fit, test = sel & ~held, sel & held
        if len(set(labels_arr[fit])) < 2 or test.sum() < 2:
            continue
        scores = {}
        for name, feats in (("embeddings", embeddings), ("raw_pixels", raw_pixels(frames))):
            x_fit, x_test = feats[fit], feats[test]
            clf = LogisticRegression(max_iter=2000, random_state=seed).fit(x_fit, labels_arr[fit])
            scores[name] = float(clf.score(x_test, labels_arr[test]))
        out[source] = scores
    return out


def confidence_summary(probs: np.ndarray, threshold: float) -> dict:
    """The distribution of the top probability: quantiles, and the share at or above ``threshold``."""
    top = probs.max(1)
    qs = (0.05, 0.25, 0.5, 0.75, 0.95)
    return {
        "quantiles": {str(q): float(np.quantile(top, q)) for q in qs},
        "share_confident": float((top >= threshold).mean()),
        "threshold": threshold,
    }


def selflabel_change(before: np.ndarray, after: np.ndarray, threshold: float) -> dict:
    """What self-labeling changed on the training images: clusters changed, confident share before/after."""
    return {
        "share_reassigned": float((before.argmax(1) != after.argmax(1)).mean()),
        "confident_before": float((before.max(1) >= threshold).mean()),
        "confident_after": float((after.max(1) >= threshold).mean()),
    }


def name_clusters(pred: np.ndarray, labels: list, k: int, min_share: float = 0.6) -> dict[int, str]:
    """Name a cluster after its majority view when that view holds ``min_share`` of its labelled members.

    Labels are read as views of the taxonomy (``service.taxonomy``: FETAL_PLANES_DB's "Fetal brain", HC18's
    and the phantoms' "brain" are all the view "brain"); a label the taxonomy does not know counts as itself.
    """
    from service.taxonomy import view_of_label

    names: dict[int, str] = {}
    for c in range(k):
        members = [view_of_label(labels[i]) or labels[i] for i in np.flatnonzero(pred == c) if labels[i]]
        if members:
            values, counts = np.unique(members, return_counts=True)
            if counts.max() / len(members) >= min_share:
                names[c] = str(values[counts.argmax()])
    return names
