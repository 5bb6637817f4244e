"""One training run end to end: data -> SSL backbone -> kNN mining -> FUSC heads -> evaluation -> export."""

from __future__ import annotations

import json
import platform
import random
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import KMeans

from service.card import Provenance
from training.cluster import predict, train_cluster_heads
from training.config import TrainConfig
from training.data import ImageList, load_frames, read_csv_layout, read_spec, subject_split
from training.distributed import barrier, init_distributed, shutdown
from training.export import write_model_repository
from training.knn import mine_neighbors, neighbor_accuracy
from training.metrics import cluster_metrics, raw_pixels
from training.ood import calibrate_ood
from training.selflabel import self_label
from training.ssl import compute_embeddings, train_ssl


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def git_commit(exclude: Path | None = None) -> str:
    """The commit the code ran from, marked ``-dirty`` when tracked files had uncommitted changes.

    ``exclude`` (the output repository, which a rebuild of the bundled model rewrites) does not count.
    """
    try:

        def git(*args: str) -> str:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5).stdout.strip()

        commit = git("rev-parse", "--short", "HEAD")
        spec = ["--", ".", f":(exclude){Path(exclude).resolve()}"] if exclude else []
        dirty = git("status", "--porcelain", "--untracked-files=no", *spec)
        return f"{commit}-dirty" if commit and dirty else commit
    except (OSError, subprocess.SubprocessError):
        return ""


def gather(cfg: TrainConfig) -> ImageList:
    images = ImageList()
    for spec in cfg.data:
        images.extend(read_spec(spec))
    if cfg.phantoms:
        from training.phantoms import GENERATOR_VERSION, generate_dataset

        root = cfg.cache_dir / f"phantoms-v{GENERATOR_VERSION}-n{cfg.phantoms}-s{cfg.phantom_seed}"
        if not (root / "labels.csv").exists():
            generate_dataset(root, cfg.phantoms, seed=cfg.phantom_seed)
        images.extend(read_csv_layout(root, name="phantoms"))
    if not len(images):
        raise SystemExit("no images: give --data and/or --phantoms")
    return images


def evaluate(
    preds: dict[str, np.ndarray],
    embeddings: np.ndarray,
    frames: np.ndarray,
    labels: list,
    sources: list,
    k: int,
    seed: int,
) -> dict:
    """Per labelled source: metrics of each prediction, of k-means on the embeddings and on raw pixels."""
    out: dict = {}
    labels_arr = np.array([lab if lab is not None else "" for lab in labels])
    sources_arr = np.array(sources)
    for source in sorted(set(sources)):
        sel = (sources_arr == source) & (labels_arr != "")
        if sel.sum() < 2 or len(set(labels_arr[sel])) < 2:
            continue
        kk = min(k, int(sel.sum()))
        km_emb = KMeans(kk, n_init=10, random_state=seed).fit_predict(embeddings[sel])
        km_raw = KMeans(kk, n_init=10, random_state=seed).fit_predict(raw_pixels(frames[sel]))
        out[source] = {
            "n": int(sel.sum()),
            "classes": int(len(set(labels_arr[sel]))),
            **{name: cluster_metrics(pred[sel], labels_arr[sel]) for name, pred in preds.items()},
            "kmeans_embeddings": cluster_metrics(km_emb, labels_arr[sel]),
            "kmeans_raw_pixels": cluster_metrics(km_raw, labels_arr[sel]),
        }
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


def name_clusters(pred: np.ndarray, labels: list, k: int, min_share: float = 0.6) -> dict[int, str]:
    """Name a cluster after its majority label when that label holds ``min_share`` of its labelled members."""
    names: dict[int, str] = {}
    for c in range(k):
        members = [labels[i] for i in np.flatnonzero(pred == c) if labels[i]]
        if members:
            values, counts = np.unique(members, return_counts=True)
            if counts.max() / len(members) >= min_share:
                names[c] = str(values[counts.argmax()])
    return names


def run(cfg: TrainConfig, out: Path, run_dir: Path, command: str = "") -> dict:
    t0 = time.time()
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ranks, rank_device = init_distributed(cfg.device)
    device = rank_device or pick_device(cfg.device)
    if ranks.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))

    # Rank 0 generates phantoms and fills the frame cache; the other ranks then read the cache.
    if ranks.main:
        images = gather(cfg)
        frames_np, ok = load_frames(images, cfg.clean, cfg.cache_dir)
    barrier()
    if not ranks.main:
        images = gather(cfg)
        frames_np, ok = load_frames(images, cfg.clean, cfg.cache_dir)
    keep = np.flatnonzero(ok)
    frames_np = frames_np[keep]
    labels = [images.labels[i] for i in keep]
    subjects = [images.subjects[i] for i in keep]
    sources = [images.sources[i] for i in keep]
    held = (
        subject_split(subjects, cfg.test_fraction, cfg.seed)
        if cfg.test_fraction > 0
        else np.zeros(len(keep), bool)
    )
    train_idx = np.flatnonzero(~held)
    print(f"{len(keep)} images ({len(train_idx)} train, {int(held.sum())} held out) on {device}")

    frames = torch.from_numpy(frames_np)
    backbone, ssl_hist = train_ssl(frames[train_idx], cfg.ssl, cfg.clean, device, cfg.seed)
    if ranks.enabled:
        # The cluster step is head-only and takes seconds: rank 0 finishes the run alone.
        barrier()
        shutdown()
        if not ranks.main:
            return {}
    emb = compute_embeddings(backbone, frames, cfg.clean, device)
    nbrs = mine_neighbors(emb[train_idx], cfg.cluster.neighbors)
    head, info = train_cluster_heads(
        emb[train_idx], nbrs, cfg.cluster, device, cfg.seed, backbone, frames[train_idx], cfg.clean
    )
    if cfg.cluster.update_backbone:
        emb = compute_embeddings(backbone, frames, cfg.clean, device)
    head = head.cpu()
    preds = {"fusc_cluster_step": predict(head, emb).argmax(1)}
    if cfg.selflabel.epochs > 0:
        info["selflabel"] = self_label(
            backbone, head, frames[train_idx], cfg.selflabel, cfg.clean, device, cfg.seed
        )
        if cfg.selflabel.update_backbone:
            emb = compute_embeddings(backbone, frames, cfg.clean, device)
        preds["fusc"] = predict(head, emb).argmax(1)
    else:
        preds["fusc"] = preds["fusc_cluster_step"]
    pred = preds["fusc"]

    def split_eval(mask: np.ndarray) -> dict:
        idx = np.flatnonzero(mask)
        return evaluate(
            {name: p[idx] for name, p in preds.items()},
            emb[idx],
            frames_np[idx],
            [labels[i] for i in idx],
            [sources[i] for i in idx],
            cfg.cluster.num_clusters,
            cfg.seed,
        )

    labelled = np.array([lab is not None for lab in labels])
    quality = {
        "train_transductive": split_eval(~held),
        "heldout_inductive": split_eval(held) if held.any() else {},
        "linear_probe_heldout": linear_probe(emb, frames_np, labels, sources, held, cfg.seed)
        if held.any()
        else {},
        "neighbor_accuracy_train": (
            neighbor_accuracy(nbrs, np.array([labels[i] or "" for i in train_idx]))
            if labelled.all()
            else None
        ),
        "cluster_sizes_train": np.bincount(pred[train_idx], minlength=cfg.cluster.num_clusters).tolist(),
        "ssl_loss_per_epoch": ssl_hist,
        "cluster_final_losses": info["final_losses"],
        "cluster_loss_history": info["history"],
        "best_head": info["best_head"],
        "selflabel": info.get("selflabel"),
    }
    names = (
        name_clusters(pred[train_idx], [labels[i] for i in train_idx], cfg.cluster.num_clusters)
        if (cfg.name_clusters_from_labels)
        else {}
    )
    provenance = Provenance(
        command=command,
        datasets=sorted(set(sources)),
        num_images=len(keep),
        ssl_method=cfg.ssl.method,
        backbone_arch=cfg.ssl.backbone,
        epochs={"ssl": cfg.ssl.epochs, "cluster": cfg.cluster.epochs, "selflabel": cfg.selflabel.epochs},
        seed=cfg.seed,
        git_commit=git_commit(exclude=out),
        torch_version=torch.__version__,
        device=f"{device.type} ({platform.processor() or platform.machine()})",
        note="cluster names taken from majority labels of the training images" if names else "",
    )
    ood = calibrate_ood(emb[train_idx], pred[train_idx], cfg.cluster.num_clusters)
    card = write_model_repository(
        out,
        backbone,
        head,
        {
            "name": cfg.name,
            "version": cfg.version,
            "preprocess": cfg.clean,
            "cluster_names": names,
            "ood": ood,
            "provenance": provenance,
            "quality": quality,
        },
    )
    summary = {"seconds": round(time.time() - t0, 1), "card_version": card.version, "quality": quality}
    # Everything the report needs, so it can be re-made without re-training.
    np.savez_compressed(
        run_dir / "outputs.npz",
        embeddings=emb,
        probs=predict(head, emb),
        frames=frames_np,
        labels=np.array([lab or "" for lab in labels]),
        sources=np.array(sources),
        subjects=np.array(subjects),
        held_out=held,
    )
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    torch.save(
        {"backbone": backbone.state_dict(), "head": head.state_dict(), "config": cfg.model_dump(mode="json")},
        run_dir / "checkpoint.pt",
    )
    from training.report import write_report

    write_report(run_dir)
    print(f"model repository written to {out} in {summary['seconds']} s; report: {run_dir / 'report.md'}")
    return summary
