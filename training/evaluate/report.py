"""A run's report, as Markdown and as HTML beside it (same content, images by relative path): metric tables
(fine labels, merged coarse views, over-clustering), per-cluster top-3 labels, loss curves, a t-SNE map and a
gallery of each cluster's most and least confident images; for a run over several seeds, mean +- std of every
metric. ``python -m training.evaluate.report RUN_DIR``."""

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
    idx, xy = tsne_xy(emb)
    plot_tsne(
        xy, colour[idx], "t-SNE of embeddings, coloured by label (or source)", run_dir / "tsne_labels.png"
    )
    plot_tsne(
        xy, pred[idx].astype(str), "t-SNE of embeddings, coloured by cluster", run_dir / "tsne_clusters.png"
    )
    gallery(frames, probs, run_dir / "gallery.png")

    src_counts = {s: int((sources == s).sum()) for s in np.unique(sources)}
    lines = [
        f"# Training report — {config['name']} {config['version']}",
        "",
        f"Data: {', '.join(f'{s} ({n} images)' for s, n in src_counts.items())}; "
        f"{int(held.sum())} images of held-out subjects."
        + (
            " Phantom images are synthetic, made by `training.data.phantoms`."
            if "phantoms" in src_counts
            else ""
        ),
        f"SSL: {config['ssl']['method']} on {config['ssl']['backbone']}, {config['ssl']['epochs']} epochs, "
        f"input {config['clean']['size']} px; K = {k}; {config['cluster']['neighbors']} neighbours; "
        f"entropy weight {config['cluster']['entropy_weight']}; "
        + (
            f"backbone fine-tuned in the cluster step (rate {_backbone_rate(config['cluster'])}); "
            if config["cluster"].get("update_backbone")
            else ""
        )
        + f"self-labeling {config['selflabel']['epochs']} epochs at p ≥ {config['selflabel']['threshold']}. "
        f"Wall time {summary['seconds']} s"
        + (
            f" (this invocation only: {', '.join(summary['resumed_stages'])} loaded from checkpoints)."
            if summary.get("resumed_stages")
            else "."
        ),
        "",
    ]
    health = q.get("ssl_health")
    if health and health.get("collapsed"):
        lines += [
            "**Warning: the SSL embedding looks collapsed** ("
            + "; ".join(health["reasons"])
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
    lines += [
        "## Training subjects (transductive)",
        "",
        *metric_table(q["train_transductive"]),
    ]
    if q.get("heldout_inductive"):
        lines += ["## Held-out subjects (inductive)", "", *metric_table(q["heldout_inductive"])]
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
    return write_markdown_and_html(run_dir, lines, f"Training report — {config['name']} {config['version']}")


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


def write_seeds_report(run_dir: Path) -> Path:
    """The aggregate of a run over several seeds (``seeds.json``): mean ± std of each metric per split,
    source and method, with links to each seed's own report."""
    run_dir = Path(run_dir)
    agg = json.loads((run_dir / "seeds.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    q = agg["quality"]
    seeds = agg["seeds"]

    def cell(key: str) -> str:
        v = q.get(key)
        if not v:
            return ""
        digits = 1 if key.endswith("filled_clusters") else 3
        return f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}"

    lines = [
        f"# Training report over {len(seeds)} seeds — {config['name']} {config['version']}",
        "",
        f"Seeds {', '.join(map(str, seeds))}; every seed trains the whole pipeline (SSL, cluster step, "
        "self-labeling) on the same images, with the same held-out subjects "
        f"(split seed {agg['split_seed']}). "
        "Mean ± sample standard deviation over the seeds. The exported model repository is the first seed's.",
        "",
    ]
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
