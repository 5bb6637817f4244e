"""A run's report: Markdown with metric tables, per-cluster top-3 labels, loss curves, a t-SNE map and a
gallery of each cluster's most and least confident images. ``python -m training.report RUN_DIR``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

METRIC_ROWS = ("fusc", "fusc_cluster_step", "kmeans_embeddings", "kmeans_raw_pixels")


def _fmt(x: float | int) -> str:
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def metric_table(per_source: dict) -> list[str]:
    lines = []
    for source, res in per_source.items():
        lines += [
            f"**{source}** — {res['n']} labelled images, {res['classes']} classes"
            + (" (synthetic phantoms)" if source == "phantoms" else ""),
            "",
            "| method | purity | NMI | ACC | ARI | filled clusters |",
            "|---|---|---|---|---|---|",
        ]
        for row in METRIC_ROWS:
            if row in res:
                m = res[row]
                lines.append(
                    f"| {row} | {_fmt(m['purity'])} | {_fmt(m['nmi'])} | {_fmt(m['acc'])} | {_fmt(m['ari'])} "
                    f"| {m['filled_clusters']} |"
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


def plot_losses(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q = summary["quality"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].plot(range(1, len(q["ssl_loss_per_epoch"]) + 1), q["ssl_loss_per_epoch"], marker="o", ms=3)
    axes[0].set(title="SSL loss", xlabel="epoch")
    hist = q.get("cluster_loss_history") or []
    if hist:
        axes[1].plot(np.array(hist))
        axes[1].set(title="FUSC loss per head", xlabel="epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tsne(
    emb: np.ndarray, colour: np.ndarray, title: str, path: Path, seed: int = 0, max_points: int = 3000
):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(emb))[:max_points]
    xy = TSNE(2, init="pca", perplexity=min(30, max(5, len(idx) // 5)), random_state=seed).fit_transform(
        emb[idx]
    )
    fig, ax = plt.subplots(figsize=(7, 6))
    values = np.unique(colour[idx])
    cmap = plt.get_cmap("tab20", max(len(values), 1))
    for i, v in enumerate(values):
        sel = colour[idx] == v
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


def write_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    out = np.load(run_dir / "outputs.npz")
    emb, probs, frames = out["embeddings"], out["probs"], out["frames"]
    labels, sources, held = out["labels"], out["sources"], out["held_out"]
    pred = probs.argmax(1)
    k = probs.shape[1]
    q = summary["quality"]

    plot_losses(summary, run_dir / "losses.png")
    colour = np.where(labels != "", labels, sources)
    plot_tsne(emb, colour, "t-SNE of embeddings, coloured by label (or source)", run_dir / "tsne_labels.png")
    plot_tsne(
        emb, pred.astype(str), "t-SNE of embeddings, coloured by cluster", run_dir / "tsne_clusters.png"
    )
    gallery(frames, probs, run_dir / "gallery.png")

    src_counts = {s: int((sources == s).sum()) for s in np.unique(sources)}
    lines = [
        f"# Training report — {config['name']} {config['version']}",
        "",
        f"Data: {', '.join(f'{s} ({n} images)' for s, n in src_counts.items())}; "
        f"{int(held.sum())} images of held-out subjects."
        + (" Phantom images are synthetic, made by `training.phantoms`." if "phantoms" in src_counts else ""),
        f"SSL: {config['ssl']['method']} on {config['ssl']['backbone']}, {config['ssl']['epochs']} epochs, "
        f"input {config['clean']['size']} px; K = {k}; {config['cluster']['neighbors']} neighbours; "
        f"entropy weight {config['cluster']['entropy_weight']}; "
        f"self-labeling {config['selflabel']['epochs']} epochs at p ≥ {config['selflabel']['threshold']}. "
        f"Wall time {summary['seconds']} s.",
        "",
        "## Training subjects (transductive)",
        "",
        *metric_table(q["train_transductive"]),
    ]
    if q.get("heldout_inductive"):
        lines += ["## Held-out subjects (inductive)", "", *metric_table(q["heldout_inductive"])]
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
    if q.get("neighbor_accuracy_train") is not None:
        lines += [f"Mined-neighbour label agreement (train): {q['neighbor_accuracy_train']:.3f}", ""]
    lines += [
        "## Clusters: size and top-3 labels (all images)",
        "",
        *top3_table(pred, labels, k),
        "",
        "## Plots",
        "",
        "![losses](losses.png)",
        "",
        "![t-SNE by label](tsne_labels.png) ![t-SNE by cluster](tsne_clusters.png)",
        "",
        "Gallery: one row per cluster, its 8 most confident images, then its 4 least confident.",
        "",
        "![gallery](gallery.png)",
        "",
    ]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.report", description=__doc__)
    ap.add_argument("run_dir", type=Path)
    print(write_report(ap.parse_args(argv).run_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
