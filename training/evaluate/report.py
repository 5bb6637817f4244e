"""A run's report, as Markdown and as HTML beside it (same content, images by relative path): metric tables
(fine labels, merged coarse views, over-clustering), FUSC against k-means on the same embeddings, the mined
neighbours' label agreement, cluster sizes, the confidence distribution after the cluster step and after
self-labeling (with a histogram), what self-labeling changed, per-cluster top-3 labels, loss curves, a t-SNE
map and a gallery of each cluster's most and least confident images; for a run over several seeds, mean +-
std of every metric and of the key figures. ``python -m training.evaluate.report RUN_DIR``.

Summaries of older runs lack some of these fields; their sections then say so instead of failing, and a run
folder without ``outputs.npz`` (or ``config.json``) gets the sections that need only ``summary.json``."""

from __future__ import annotations

import argparse
import html
import json
import re
from pathlib import Path

import numpy as np

METRIC_ROWS = (
    "fusc",
    "fusc_cluster_step",
    "kmeans_embeddings",
    "kmeans_ssl_embeddings",
    "kmeans_raw_pixels",
)


def _backbone_rate(cluster: dict) -> float:
    """ClusterConfig.backbone_rate from a saved config, without importing torch for a report."""
    rate = cluster.get("backbone_lr")
    return cluster["lr"] if rate is None else rate


def _fmt(x: float | int) -> str:
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def _metric_rows(res: dict, rows=METRIC_ROWS) -> list[str]:
    lines = ["| method | purity | NMI | ACC | ARI | filled clusters |", "|---|---|---|---|---|---|"]
    for row in rows:
        if row in res:
            m = res[row]
            lines.append(
                f"| {row} | {_fmt(m['purity'])} | {_fmt(m['nmi'])} | {_fmt(m['acc'])} | {_fmt(m['ari'])} "
                f"| {m['filled_clusters']} |"
            )
    return lines


def metric_table(per_source: dict) -> list[str]:
    lines = []
    for source, res in per_source.items():
        lines += [
            f"**{source}** — {res['n']} labelled images, {res['classes']} classes"
            + (" (synthetic phantoms)" if source == "phantoms" else ""),
            "",
            *_metric_rows(res),
            "",
        ]
        if "coarse" in res:
            lines += [
                f"Merged coarse views (paper Table 2): the same clusters scored against "
                f"{res['coarse']['classes']} coarse views.",
                "",
                *_metric_rows(res["coarse"]),
                "",
            ]
    return lines


def overcluster_table(per_source: dict, k_main: int, k_over: int) -> list[str]:
    """Paper Table 3: the over-clustering heads beside the main K (both before self-labeling)."""
    lines = []
    for source, res in per_source.items():
        if "fusc_overcluster" not in res:
            continue
        lines += [
            f"**{source}** — {res['n']} labelled images, {res['classes']} classes",
            "",
            "| heads | K | filled clusters | purity | NMI | ACC |",
            "|---|---|---|---|---|---|",
        ]
        for name, k in (("fusc_cluster_step", k_main), ("fusc", k_main), ("fusc_overcluster", k_over)):
            m = res[name]
            lines.append(
                f"| {name} | {k} | {m['filled_clusters']} | {_fmt(m['purity'])} | {_fmt(m['nmi'])} "
                f"| {_fmt(m['acc'])} |"
            )
        lines.append("")
    return lines


def top3_table(pred: np.ndarray, labels: np.ndarray, k: int) -> list[str]:
    """Paper Table 4: each cluster's size and its three most frequent labels with their shares."""
    lines = ["| cluster | size | top-1 | top-2 | top-3 |", "|---|---|---|---|---|"]
    for c in range(k):
        members = labels[(pred == c) & (labels != "")]
        size = int((pred == c).sum())
        if size == 0:
            continue
        cells = []
        if len(members):
            values, counts = np.unique(members, return_counts=True)
            for i in np.argsort(-counts)[:3]:
                cells.append(f"{values[i]} ({counts[i] / len(members):.0%})")
        cells += [""] * (3 - len(cells))
        lines.append(f"| {c} | {size} | " + " | ".join(cells) + " |")
    return lines


# ------------------------------------------------------------------------- the key figures of a run
METHOD_NAMES = {"simclr": "SimCLR", "barlowtwins": "BarlowTwins", "dino": "DINO"}
# |FUSC - k-means| below this (purity) reads as a tie.
TIE = 0.005


def _dig(tree, *keys):
    """``tree[k1][k2]...``, or None where a level is missing (older summaries lack some fields)."""
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _epochs(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def _backbone_name(backbone: str) -> str:
    return re.sub(r"efficientnet-lite(\d)", r"EfficientNet-Lite\1", backbone)


def pretrained_start(config: dict) -> str:
    """How the backbone started: ImageNet weights adapted by N epochs of SSL, ImageNet features only, or a
    random initialisation trained by SSL; "" when the configuration is unknown."""
    ssl = config.get("ssl") or {}
    if not ssl:
        return ""
    backbone = ssl.get("backbone", "?")
    method = METHOD_NAMES.get(ssl.get("method", ""), ssl.get("method", "?"))
    epochs = ssl.get("epochs", 0)
    if ssl.get("init") == "imagenet":
        start = f"ImageNet {_backbone_name(backbone)} weights"
        if not epochs:
            return start + ", pretrained features only (no SSL epochs)"
        frozen = ssl.get("freeze_blocks") or 0
        return f"{start}, adapted by {_epochs(epochs)} of {method}" + (
            f" (stem and first {frozen} blocks kept fixed)" if frozen else ""
        )
    return f"{backbone} from a random initialisation, trained by {_epochs(epochs)} of {method}"


def labelled_sources(quality: dict, split: str = "heldout_inductive") -> list[str]:
    return sorted(src for src, res in (quality.get(split) or {}).items() if "fusc" in res)


def threshold_of(quality: dict, config: dict | None = None) -> float | None:
    """The self-labeling threshold the confident shares were counted at."""
    thr = _dig(quality, "confidence_train", "final", "threshold")
    return thr if thr is not None else _dig(config or {}, "selflabel", "threshold")


# (key, label, digits): what ``key_figures`` returns, in the order the tables show it.
KEY_FIGURES = (
    ("fusc_purity", "FUSC purity (held out)", 3),
    ("fusc_nmi", "FUSC NMI (held out)", 3),
    ("fusc_acc", "FUSC ACC (held out)", 3),
    ("cluster_step_purity", "FUSC cluster step purity, before self-labeling (held out)", 3),
    ("kmeans_purity", "k-means on the served embeddings, purity (held out)", 3),
    ("fusc_minus_kmeans_purity", "FUSC − k-means on the same embeddings, purity (held out)", 3),
    ("selflabel_gain_purity", "self-labeling's change of purity (held out)", 3),
    ("raw_pixels_purity", "k-means on raw pixels, purity (held out)", 3),
    ("linear_probe", "linear probe on the served embeddings, accuracy (held out)", 3),
    ("neighbour_agreement", "mined-neighbour label agreement (train)", 3),
    ("confident_cluster_step", "share at p ≥ threshold after the cluster step (train)", 3),
    ("confident_final", "share at p ≥ threshold at the end (train)", 3),
    ("share_reassigned", "share of training images self-labeling moved to another cluster", 3),
    ("seconds", "wall time per seed, s", 0),
)


def key_figures(quality: dict, source: str | None, seconds: float | None = None) -> dict[str, float | None]:
    """The figures the issue asks every report and the recipe comparison to state, for one run; held-out
    figures are for ``source`` (a labelled source); None where the run did not record one."""
    res = ((quality.get("heldout_inductive") or {}).get(source) or {}) if source else {}

    def metric(row: str, name: str) -> float | None:
        return _dig(res, row, name)

    fusc, step = metric("fusc", "purity"), metric("fusc_cluster_step", "purity")
    km = metric("kmeans_embeddings", "purity")
    before = _dig(quality, "confidence_train", "cluster_step", "share_confident")
    if before is None:
        before = _dig(quality, "selflabel_changed", "confident_before")
    after = _dig(quality, "confidence_train", "final", "share_confident")
    if after is None:
        after = _dig(quality, "selflabel_changed", "confident_after")
    return {
        "fusc_purity": fusc,
        "fusc_nmi": metric("fusc", "nmi"),
        "fusc_acc": metric("fusc", "acc"),
        "cluster_step_purity": step,
        "kmeans_purity": km,
        "fusc_minus_kmeans_purity": fusc - km if fusc is not None and km is not None else None,
        "selflabel_gain_purity": fusc - step if fusc is not None and step is not None else None,
        "raw_pixels_purity": metric("kmeans_raw_pixels", "purity"),
        "linear_probe": _dig(quality, "linear_probe_heldout", source, "embeddings") if source else None,
        "neighbour_agreement": quality.get("neighbor_accuracy_train"),
        "confident_cluster_step": before,
        "confident_final": after,
        "share_reassigned": _dig(quality, "selflabel_changed", "share_reassigned"),
        "seconds": seconds,
    }


def mean_std_n(values) -> tuple[float, float, int] | None:
    """Mean, sample standard deviation (ddof=1; 0 for one value) and count of the values that are not None."""
    v = np.array([x for x in values if x is not None], float)
    if not len(v):
        return None
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def fmt_mean_std(stat: tuple[float, float, int] | None, digits: int = 3, of: int | None = None) -> str:
    """Mean ± std as "0.657 ± 0.037" (a single value alone); "—" when nothing was recorded; "(n of N)"
    when some runs lack the figure."""
    if stat is None:
        return "—"
    mean, std, n = stat
    text = f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else "")
    return text + (f" ({n} of {of})" if of is not None and n < of else "")


def versus_kmeans(diff: float, fusc: float | None = None, km: float | None = None, noise: float = 0.0) -> str:
    """The verdict "FUSC beats / ties with / loses to k-means on the same (served) embeddings by X"; with
    ``noise`` (the std of the difference over seeds) a difference smaller than it is called within seed
    noise."""
    values = f" ({fusc:.3f} vs {km:.3f})" if fusc is not None and km is not None else ""
    if abs(diff) < TIE:
        return (
            f"FUSC ties with k-means on the same (served) embeddings (purity difference {diff:+.3f}){values}"
        )
    verdict = "beats" if diff > 0 else "loses to"
    return f"FUSC {verdict} k-means on the same (served) embeddings by {abs(diff):.3f} purity{values}" + (
        f", within seed noise (std of the difference {noise:.3f})" if abs(diff) < noise else ""
    )


def versus_kmeans_lines(per_source: dict, where: str) -> list[str]:
    lines = []
    for source in sorted(per_source):
        res = per_source[source]
        f, km = res.get("fusc"), res.get("kmeans_embeddings")
        if not f or not km:
            continue
        text = (
            f"- {where}, {source}: "
            + versus_kmeans(f["purity"] - km["purity"], f["purity"], km["purity"])
            + f"; NMI {f['nmi']:.3f} vs {km['nmi']:.3f}, ACC {f['acc']:.3f} vs {km['acc']:.3f}."
        )
        if "kmeans_ssl_embeddings" in res:
            text += (
                f" k-means on the SSL embeddings, before the cluster step fine-tuned the backbone: purity "
                f"{res['kmeans_ssl_embeddings']['purity']:.3f}."
            )
        lines.append(text)
    return lines


def plot_confidence(
    top_before: np.ndarray | None, top_after: np.ndarray, threshold: float | None, k: int, path: Path
) -> None:
    """Histogram of the top probability of the training images after the cluster step and at the end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3))
    bins = np.linspace(min(1.0 / max(k, 1), float(top_after.min())), 1.0, 31)
    if top_before is not None:
        ax.hist(top_before, bins=bins, alpha=0.55, label="after the cluster step")
    ax.hist(top_after, bins=bins, alpha=0.55, label="after self-labeling (served)")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", lw=1, label=f"p = {threshold:g}")
    ax.set(xlabel="top cluster probability", ylabel="training images", title="Confidence (training subjects)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def neighbour_section(quality: dict, config: dict) -> list[str]:
    value = quality.get("neighbor_accuracy_train")
    k = _dig(config, "cluster", "neighbors")
    lines = ["## Mined neighbours", ""]
    if value is not None:
        lines.append(
            f"Label agreement of the {f'{k} ' if k else ''}mined neighbours (training subjects; share of an "
            f"image's neighbours that carry its label): {value:.3f}."
        )
    elif "neighbor_accuracy_train" in quality:
        lines.append("Not measured: some training images have no label.")
    else:
        lines.append("Not recorded in this run's summary.")
    return lines + [""]


def cluster_size_section(quality: dict) -> list[str]:
    sizes = quality.get("cluster_sizes_train")
    lines = ["## Cluster sizes (training subjects, served clusters)", ""]
    if not sizes:
        return lines + ["Not recorded in this run's summary.", ""]
    total = max(1, sum(sizes))
    filled = [s for s in sizes if s]
    lines += [
        "| cluster | " + " | ".join(str(c) for c in range(len(sizes))) + " |",
        "|---|" + "---|" * len(sizes),
        "| images | " + " | ".join(str(s) for s in sizes) + " |",
        "| share | " + " | ".join(f"{s / total:.1%}" for s in sizes) + " |",
        "",
        f"{len(filled)} of {len(sizes)} clusters hold training images"
        + (f"; largest / smallest of them {max(filled)} / {min(filled)}." if filled else "."),
        "",
    ]
    return lines


def confidence_section(quality: dict, config: dict, plot: str | None) -> list[str]:
    thr = threshold_of(quality, config)
    thr_text = f"p ≥ {thr:g}" if thr is not None else "p ≥ threshold"
    lines = ["## Confidence after the cluster step and after self-labeling", ""]
    conf = quality.get("confidence_train")
    if conf:
        qs = ("0.05", "0.25", "0.5", "0.75", "0.95")
        lines += [
            "Top cluster probability of the training images (quantiles) and the share at the self-labeling "
            "threshold:",
            "",
            f"| after | 5 % | 25 % | median | 75 % | 95 % | share at {thr_text} |",
            "|---|---|---|---|---|---|---|",
        ]
        for key, label in (("cluster_step", "cluster step"), ("final", "self-labeling (served)")):
            c = conf.get(key)
            if c:
                cells = [f"{c['quantiles'][q]:.3f}" if q in c.get("quantiles", {}) else "—" for q in qs]
                lines.append(f"| {label} | " + " | ".join(cells) + f" | {c['share_confident']:.3f} |")
        lines.append("")
    else:
        lines += ["The confidence distribution is not recorded in this run's summary.", ""]
    if plot:
        lines += [f"![confidence histogram]({plot})", ""]
    history = _dig(quality, "selflabel", "history") or []
    if history:
        step = max(1, -(-len(history) // 20))
        shown = sorted({*range(0, len(history), step), len(history) - 1})
        lines += [
            f"Self-labeling, per epoch: the share of training images at {thr_text} (the ones it trained on) "
            "and the loss" + (f" (every {step}th epoch and the last)" if step > 1 else "") + ":",
            "",
            f"| epoch | share at {thr_text} | loss |",
            "|---|---|---|",
            *[
                f"| {i + 1} | {history[i].get('confident_share', float('nan')):.3f} "
                f"| {history[i].get('loss', float('nan')):.4f} |"
                for i in shown
            ],
            "",
        ]
    return lines


def selflabel_change_section(quality: dict, config: dict) -> list[str]:
    lines = ["## What self-labeling changed", ""]
    epochs = _dig(config, "selflabel", "epochs")
    history = _dig(quality, "selflabel", "history")
    if epochs == 0 or (epochs is None and not history):
        return lines + ["No self-labeling in this run: the served clusters are the cluster step's.", ""]
    thr = threshold_of(quality, config)
    thr_text = f"p ≥ {thr:g}" if thr is not None else "p ≥ threshold"
    sentences = []
    changed = quality.get("selflabel_changed")
    if changed:
        sentences.append(
            f"Self-labeling moved {changed['share_reassigned']:.1%} of the training images to another "
            "cluster."
        )
    split, where = (
        ("heldout_inductive", "Held-out")
        if labelled_sources(quality, "heldout_inductive")
        else ("train_transductive", "Training (transductive)")
    )
    purity = []
    for source in labelled_sources(quality, split):
        res = quality[split][source]
        if "fusc_cluster_step" in res:
            a, b = res["fusc_cluster_step"]["purity"], res["fusc"]["purity"]
            nmi_a, nmi_b = res["fusc_cluster_step"]["nmi"], res["fusc"]["nmi"]
            purity.append(f"{source} {a:.3f} → {b:.3f} ({b - a:+.3f}; NMI {nmi_a:.3f} → {nmi_b:.3f})")
    if purity:
        sentences.append(f"{where} purity before → after self-labeling: " + "; ".join(purity) + ".")
    if changed:
        sentences.append(
            f"Share of the training images at {thr_text}: {changed['confident_before']:.3f} → "
            f"{changed['confident_after']:.3f}."
        )
    if not sentences:
        return lines + ["Not recorded in this run's summary.", ""]
    return lines + [" ".join(sentences), ""]


def plot_losses(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q = summary.get("quality") or {}
    ssl_loss = q.get("ssl_loss_per_epoch") or []
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].plot(range(1, len(ssl_loss) + 1), ssl_loss, marker="o", ms=3)
    axes[0].set(title="SSL loss", xlabel="epoch")
    hist = q.get("cluster_loss_history") or []
    if hist:
        axes[1].plot(np.array(hist))
        axes[1].set(title="FUSC loss per head", xlabel="epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tsne_xy(emb: np.ndarray, seed: int = 0, max_points: int = 3000) -> tuple[np.ndarray, np.ndarray]:
    """(indices of at most ``max_points`` embeddings, their 2-D t-SNE positions); computed once per report."""
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(emb))[:max_points]
    xy = TSNE(
        2,
        init="pca",
        perplexity=min(30, max(5, len(idx) // 5)),
        random_state=seed,
        method="exact" if len(idx) <= 300 else "barnes_hut",
    ).fit_transform(emb[idx])
    return idx, xy


def plot_tsne(xy: np.ndarray, colour: np.ndarray, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6))
    values = np.unique(colour)
    cmap = plt.get_cmap("tab20", max(len(values), 1))
    for i, v in enumerate(values):
        sel = colour == v
        ax.scatter(xy[sel, 0], xy[sel, 1], s=5, color=cmap(i), label=str(v) or "(unlabelled)")
    ax.set(title=title, xticks=[], yticks=[])
    ax.legend(markerscale=3, fontsize=7, loc="best", ncol=2 if len(values) > 10 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gallery(frames: np.ndarray, probs: np.ndarray, path: Path, most: int = 8, least: int = 4) -> None:
    """One row per cluster: its most confident images, a gap, then its least confident ones."""
    import cv2

    pred, conf = probs.argmax(1), probs.max(1)
    side = frames.shape[-1]
    cols = most + least + 1
    rows = [c for c in range(probs.shape[1]) if (pred == c).any()]
    sheet = np.full((max(1, len(rows)) * (side + 4), 40 + cols * (side + 4)), 255, np.uint8)
    for r, c in enumerate(rows):
        idx = np.flatnonzero(pred == c)
        order = idx[np.argsort(-conf[idx])]
        y = r * (side + 4) + 2
        cv2.putText(sheet, str(c), (4, y + side // 2 + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.5, 0, 1)
        picks = list(order[:most]) + [None] + list(order[-least:] if len(order) > most else [])
        for j, i in enumerate(picks):
            if i is not None:
                x = 40 + j * (side + 4)
                sheet[y : y + side, x : x + side] = frames[i]
    cv2.imwrite(str(path), sheet)


def _header(
    summary: dict, config: dict, src_counts: dict[str, int] | None, held: int | None, k: int | None
) -> list[str]:
    ssl, cluster, sl, clean = (config.get(key) or {} for key in ("ssl", "cluster", "selflabel", "clean"))
    lines = [f"# Training report — {config.get('name', 'fusc')} {config.get('version', '')}".rstrip(), ""]
    if src_counts is not None:
        lines.append(
            f"Data: {', '.join(f'{s} ({n} images)' for s, n in src_counts.items())}; "
            f"{held} images of held-out subjects."
            + (
                " Phantom images are synthetic, made by `training.data.phantoms`."
                if "phantoms" in src_counts
                else ""
            )
        )
    if not config:
        return lines + [
            f"Wall time {summary.get('seconds', '?')} s. (No `config.json` beside this summary: the run's "
            "settings are not shown.)",
            "",
        ]
    k = k or cluster.get("num_clusters")
    cluster_inputs = []
    if cluster.get("views"):
        cluster_inputs.append(f"{cluster['views']} augmented-view embeddings per image")
    if cluster.get("standardize"):
        cluster_inputs.append("standardised inputs")
    lines += [
        f"Backbone start: {pretrained_start(config)}; input {clean.get('size', '?')} px.",
        f"K = {k}; {cluster.get('neighbors', '?')} neighbours; "
        f"entropy weight {cluster.get('entropy_weight', '?')}; "
        + (f"cluster step on {' and '.join(cluster_inputs)}; " if cluster_inputs else "")
        + (
            f"backbone fine-tuned in the cluster step (rate {_backbone_rate(cluster)}); "
            if cluster.get("update_backbone")
            else ""
        )
        + f"self-labeling {_epochs(sl['epochs']) if 'epochs' in sl else '? epochs'} "
        f"at p ≥ {sl.get('threshold', '?')}. "
        f"Wall time {summary.get('seconds', '?')} s"
        + (
            f" (this invocation only: {', '.join(summary['resumed_stages'])} loaded from checkpoints)."
            if summary.get("resumed_stages")
            else "."
        ),
        "",
    ]
    return lines


def write_report(run_dir: Path) -> Path:
    """``report.md``/``report.html`` and plots for one run from its ``summary.json``, ``config.json`` and
    ``outputs.npz``; without the last two, the sections that need them are left out."""
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
    q = summary.get("quality") or {}
    out = np.load(run_dir / "outputs.npz") if (run_dir / "outputs.npz").exists() else None

    plot_losses(summary, run_dir / "losses.png")
    src_counts = held_count = k = pred = labels = None
    if out is not None:
        emb, probs, frames = out["embeddings"], out["probs"], out["frames"]
        labels, sources, held = out["labels"], out["sources"], out["held_out"]
        pred = probs.argmax(1)
        k = probs.shape[1]
        colour = np.where(labels != "", labels, sources)
        idx, xy = tsne_xy(emb)
        plot_tsne(
            xy, colour[idx], "t-SNE of embeddings, coloured by label (or source)", run_dir / "tsne_labels.png"
        )
        plot_tsne(
            xy,
            pred[idx].astype(str),
            "t-SNE of embeddings, coloured by cluster",
            run_dir / "tsne_clusters.png",
        )
        gallery(frames, probs, run_dir / "gallery.png")
        before = out["probs_cluster_step"][~held].max(1) if "probs_cluster_step" in out.files else None
        if (~held).any():
            plot_confidence(
                before, probs[~held].max(1), threshold_of(q, config), k, run_dir / "confidence.png"
            )
        src_counts = {s: int((sources == s).sum()) for s in np.unique(sources)}
        held_count = int(held.sum())

    lines = _header(summary, config, src_counts, held_count, k)
    health = q.get("ssl_health")
    if health and health.get("collapsed"):
        lines += [
            "**Warning: the SSL embedding looks collapsed** ("
            + "; ".join(health.get("reasons", []))
            + "). Clusters and metrics below are not meaningful; see docs/training.md, 'Collapse'.",
            "",
        ]
    if q.get("skipped_files"):
        lines += [
            "Files the decoder refused (left out), by error code: "
            + ", ".join(f"`{code}` {n}" for code, n in q["skipped_files"].items())
            + ".",
            "",
        ]
    if q.get("train_transductive"):
        lines += ["## Training subjects (transductive)", "", *metric_table(q["train_transductive"])]
    if q.get("heldout_inductive"):
        lines += ["## Held-out subjects (inductive)", "", *metric_table(q["heldout_inductive"])]
    versus = versus_kmeans_lines(q.get("heldout_inductive") or {}, "held-out subjects")
    if not versus:
        versus = versus_kmeans_lines(q.get("train_transductive") or {}, "training subjects (transductive)")
    if versus:
        lines += [
            "## FUSC against k-means on the same embeddings",
            "",
            "k-means with the same K on the embeddings the model serves (after any fine-tuning of the "
            f"backbone; tie: a purity difference under {TIE}):",
            "",
            *versus,
            "",
        ]
    if q.get("overcluster"):
        oc = q["overcluster"]
        lines += [
            f"## Over-clustering (K = {oc['k']})",
            "",
            f"A second set of heads with K = {oc['k']}, trained head-only on the SSL embeddings and the "
            f"neighbours the main K = {oc['k_main']} heads were trained with (cluster step only, no "
            "backbone fine-tuning, no self-labeling); "
            f"{oc['filled_clusters_train']} of its clusters hold training images.",
            "",
        ]
        for title, key in (
            ("Training subjects", "train_transductive"),
            ("Held-out subjects", "heldout_inductive"),
        ):
            if q.get(key):
                lines += [f"{title}:", "", *overcluster_table(q[key], oc["k_main"], oc["k"])]
    if q.get("linear_probe_heldout"):
        lines += [
            "Supervised bound (logistic regression fitted on the training subjects' labels, accuracy on the "
            "held-out subjects):",
            "",
            "| source | frozen embeddings | raw 32x32 pixels |",
            "|---|---|---|",
            *[
                f"| {src} | {v['embeddings']:.3f} | {v['raw_pixels']:.3f} |"
                for src, v in q["linear_probe_heldout"].items()
            ],
            "",
        ]
    if health:
        lines += [
            f"SSL embedding health (train): mean cosine between images {health['mean_pair_cosine']:.3f}, "
            f"effective rank {health['effective_rank']:.1f}"
            + (
                f", DINO loss at {health['dino_loss_share_of_uniform']:.1%} of log(prototypes)"
                if health.get("dino_loss_share_of_uniform") is not None
                else ""
            )
            + ".",
            "",
        ]
    lines += [
        *neighbour_section(q, config),
        *cluster_size_section(q),
        *confidence_section(q, config, "confidence.png" if (run_dir / "confidence.png").exists() else None),
        *selflabel_change_section(q, config),
    ]
    if pred is not None:
        lines += ["## Clusters: size and top-3 labels (all images)", "", *top3_table(pred, labels, k), ""]
    lines += ["## Plots", "", "![losses](losses.png)", ""]
    tsne = [
        f"![{alt}]({name})"
        for alt, name in (("t-SNE by label", "tsne_labels.png"), ("t-SNE by cluster", "tsne_clusters.png"))
        if (run_dir / name).exists()
    ]
    if tsne:
        lines += [" ".join(tsne), ""]
    if (run_dir / "gallery.png").exists():
        lines += [
            "Gallery: one row per cluster, its 8 most confident images, then its 4 least confident.",
            "",
            "![gallery](gallery.png)",
            "",
        ]
    return write_markdown_and_html(
        run_dir, lines, f"Training report — {config.get('name', 'fusc')} {config.get('version', '')}".rstrip()
    )


def write_markdown_and_html(run_dir: Path, lines: list[str], title: str) -> Path:
    """``report.md`` and ``report.html`` (the same content) in ``run_dir``; returns the Markdown path."""
    text = "\n".join(lines)
    (run_dir / "report.md").write_text(text)
    (run_dir / "report.html").write_text(markdown_to_html(text, title))
    return run_dir / "report.md"


_INLINE = [
    (re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)"), r'<img src="\2" alt="\1">'),
    (re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)"), r'<a href="\2">\1</a>'),
    (re.compile(r"\*\*([^*]+)\*\*"), r"<strong>\1</strong>"),
    (re.compile(r"`([^`]+)`"), r"<code>\1</code>"),
]


def _inline(text: str) -> str:
    out = html.escape(text, quote=False)
    for pattern, repl in _INLINE:
        out = pattern.sub(repl, out)
    return out


def markdown_to_html(text: str, title: str = "report") -> str:
    """The small Markdown subset the reports use (headings, pipe tables, images, links, bold, code,
    paragraphs) as a standalone HTML page; images stay files beside it, referenced by relative path."""
    body: list[str] = []
    para: list[str] = []
    lines = text.split("\n")

    def flush() -> None:
        if para:
            body.append("<p>" + " ".join(_inline(x) for x in para) + "</p>")
            para.clear()

    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        heading = re.match(r"(#{1,6}) (.*)", line)
        if heading:
            flush()
            level = len(heading.group(1))
            body.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif line.startswith("|"):
            flush()
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            i -= 1
            table = ["<table>"]
            for r, cells in enumerate(rows):
                if r == 1 and all(re.fullmatch(r":?-+:?", c) for c in cells):
                    continue
                tag = "th" if r == 0 else "td"
                table.append("<tr>" + "".join(f"<{tag}>{_inline(c)}</{tag}>" for c in cells) + "</tr>")
            body.append("\n".join(table + ["</table>"]))
        elif not line:
            flush()
        else:
            para.append(line)
        i += 1
    flush()
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #bbb;padding:2px 8px}"
        "th{background:#eee}img{max-width:100%}code{background:#f4f4f4}"
    )
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


SEED_METRICS = ("purity", "nmi", "acc", "ari")


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def run_summaries(run_dir: Path) -> list[tuple[str, dict, dict, Path]]:
    """``(seed, summary, config, folder)`` for each seed of a run over several seeds (``seeds.json`` and
    ``seed-N/``; a seed whose ``summary.json`` is missing gets its quality from ``seeds.json``) or for a
    single run's folder."""
    run_dir = Path(run_dir)
    top_config = _read_json(run_dir / "config.json") or {}
    agg = _read_json(run_dir / "seeds.json")
    if agg is None:
        summary = _read_json(run_dir / "summary.json")
        if summary is None:
            raise FileNotFoundError(f"{run_dir}: neither seeds.json nor summary.json")
        return [(str(top_config.get("seed", "")), summary, top_config, run_dir)]
    out = []
    for seed in agg["seeds"]:
        folder = run_dir / f"seed-{seed}"
        summary = _read_json(folder / "summary.json") or {
            "quality": (agg.get("per_seed") or {}).get(str(seed), {})
        }
        out.append((str(seed), summary, _read_json(folder / "config.json") or top_config, folder))
    return out


def common_source(qualities: list[dict], prefer: str = "phantoms") -> str | None:
    """The labelled held-out source every run has (``prefer`` when it is one of them), else None."""
    sets = [set(labelled_sources(q)) for q in qualities]
    common = sorted(set.intersection(*sets)) if sets else []
    if not common:
        return None
    return prefer if prefer in common else common[0]


def seed_key_figures(runs: list[tuple[str, dict, dict, Path]], source: str | None) -> list[dict]:
    return [key_figures(s.get("quality") or {}, source, s.get("seconds")) for _, s, _, _ in runs]


def key_figure_lines(figures: list[dict], source: str | None, threshold: float | None) -> list[str]:
    """The key-figure table of a run over seeds (mean ± std and each seed's value) and the two sentences:
    FUSC against k-means on the same embeddings, and what self-labeling changed."""
    n = len(figures)
    thr = f"{threshold:g}" if threshold is not None else "threshold"
    rows = []
    for key, label, digits in KEY_FIGURES:
        values = [f[key] for f in figures]
        stat = mean_std_n(values)
        if stat is None:
            continue
        each = ", ".join("—" if v is None else f"{v:.{digits}f}" for v in values)
        rows.append(f"| {label.replace('threshold', thr)} | {fmt_mean_std(stat, digits, of=n)} | {each} |")
    if not rows:
        return []
    lines = [
        f"## Key figures (mean ± std over {n} seeds)",
        "",
        (f"Held-out figures on {source}. " if source else "No labelled held-out source. ")
        + "Train: the training subjects' images.",
        "",
        "| figure | mean ± std | each seed |",
        "|---|---|---|",
        *rows,
        "",
    ]
    diff = mean_std_n([f["fusc_minus_kmeans_purity"] for f in figures])
    if diff is not None:
        fusc = mean_std_n([f["fusc_purity"] for f in figures])
        km = mean_std_n([f["kmeans_purity"] for f in figures])
        lines += [
            f"Held out, {source}, mean over {diff[2]} seeds: "
            + versus_kmeans(diff[0], fusc and fusc[0], km and km[0], noise=diff[1])
            + ".",
            "",
        ]
    gain = mean_std_n([f["selflabel_gain_purity"] for f in figures])
    moved = mean_std_n([f["share_reassigned"] for f in figures])
    before = mean_std_n([f["confident_cluster_step"] for f in figures])
    after = mean_std_n([f["confident_final"] for f in figures])
    sentences = []
    if moved is not None:
        sentences.append(f"moved {fmt_mean_std(moved)} of the training images to another cluster")
    if gain is not None:
        sentences.append(f"changed held-out purity by {fmt_mean_std(gain)}")
    if before is not None and after is not None:
        sentences.append(
            f"took the share of training images at p ≥ {thr} from {fmt_mean_std(before)} to "
            f"{fmt_mean_std(after)}"
        )
    if sentences:
        lines += ["Self-labeling " + "; ".join(sentences) + " (mean ± std over seeds).", ""]
    return lines


def write_seeds_report(run_dir: Path) -> Path:
    """The aggregate of a run over several seeds (``seeds.json``): the key figures (``key_figures``, mean ±
    std and each seed's value, with FUSC against k-means and what self-labeling changed in words), mean ±
    std of each metric per split, source and method, and links to each seed's own report."""
    run_dir = Path(run_dir)
    agg = json.loads((run_dir / "seeds.json").read_text())
    config = _read_json(run_dir / "config.json") or {}
    q = agg["quality"]
    seeds = agg["seeds"]
    runs = run_summaries(run_dir)
    source = common_source([s.get("quality") or {} for _, s, _, _ in runs])
    threshold = next((threshold_of(s.get("quality") or {}, c) for _, s, c, _ in runs), None)

    def cell(key: str) -> str:
        v = q.get(key)
        if not v:
            return ""
        digits = 1 if key.endswith("filled_clusters") else 3
        return f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}"

    lines = [
        f"# Training report over {len(seeds)} seeds — "
        f"{config.get('name', 'fusc')} {config.get('version', '')}".rstrip(),
        "",
        f"Seeds {', '.join(map(str, seeds))}; every seed trains the whole pipeline (SSL, cluster step, "
        "self-labeling) on the same images, with the same held-out subjects "
        f"(split seed {agg['split_seed']}). "
        "Mean ± sample standard deviation over the seeds. The exported model repository is the first seed's.",
        "",
    ]
    if config.get("ssl"):
        lines += [f"Backbone start: {pretrained_start(config)}.", ""]
    lines += key_figure_lines(seed_key_figures(runs, source), source, threshold)
    splits = (
        ("Training subjects (transductive)", "train_transductive"),
        ("Held-out subjects (inductive)", "heldout_inductive"),
    )
    for title, split in splits:
        sources = sorted({k.split("/")[1] for k in q if k.startswith(split + "/")})
        if not sources:
            continue
        lines += [f"## {title}", ""]
        for source in sources:
            for scope, label in (("", "fine labels"), ("coarse/", "merged coarse views")):
                prefix = f"{split}/{source}/{scope}"
                methods = [m for m in (*METRIC_ROWS, "fusc_overcluster") if f"{prefix}{m}/purity" in q]
                if not methods:
                    continue
                lines += [
                    f"**{source}**, {label}",
                    "",
                    "| method | purity | NMI | ACC | ARI | filled clusters |",
                    "|---|---|---|---|---|---|",
                ]
                for m in methods:
                    cells = [cell(f"{prefix}{m}/{metric}") for metric in SEED_METRICS]
                    lines.append(
                        f"| {m} | " + " | ".join(cells) + f" | {cell(f'{prefix}{m}/filled_clusters')} |"
                    )
                lines.append("")
    probes = sorted({k.split("/")[1] for k in q if k.startswith("linear_probe_heldout/")})
    if probes:
        lines += [
            "Supervised bound on the held-out subjects (logistic regression accuracy):",
            "",
            "| source | frozen embeddings | raw 32x32 pixels |",
            "|---|---|---|",
            *[
                f"| {s} | {cell(f'linear_probe_heldout/{s}/embeddings')} "
                f"| {cell(f'linear_probe_heldout/{s}/raw_pixels')} |"
                for s in probes
            ],
            "",
        ]
    lines += [
        "## Each seed",
        "",
        *[f"- seed {s}: [report](seed-{s}/report.html) ([Markdown](seed-{s}/report.md))" for s in seeds],
        "",
        "All values, per seed and aggregated: `seeds.json`.",
        "",
    ]
    return write_markdown_and_html(run_dir, lines, f"Training report over {len(seeds)} seeds")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.evaluate.report", description=__doc__)
    ap.add_argument("run_dir", type=Path)
    run_dir = ap.parse_args(argv).run_dir
    print(write_seeds_report(run_dir) if (run_dir / "seeds.json").exists() else write_report(run_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
