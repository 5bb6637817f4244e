"""How much of the view an SSL embedding holds, on phantoms, without the cluster step.

Trains one SSL backbone (or, with ``--mode sup``, the same network supervised) on the first ``--limit``
phantoms of a generated set and prints one JSON line: k-means purity on the embeddings and on raw pixels,
a linear probe (logistic regression fitted on the training subjects, scored on held-out subjects) and the
share of mined neighbours with the same label. The ablations in docs/results/phantoms/README.md come from it:

    python -m benchmarks.ssl_probe --n 3000 --limit 1500 --epochs 20 --rot 40
    python -m benchmarks.ssl_probe --n 3000 --limit 1500 --epochs 20 --rot 40 --mode sup
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression

import training.data.augment as augment_module
import training.methods.base as ssl_module
from service.clean import CleanConfig
from training.cluster.knn import mine_neighbors, neighbor_accuracy
from training.config import SSLConfig
from training.data.phantoms import GENERATOR_VERSION, generate_dataset
from training.data.readers import ImageList, load_frames, read_csv_layout, subject_split
from training.evaluate.metrics import cluster_metrics, raw_pixels
from training.models import STEMS, build_backbone


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=3000, help="phantoms generated (seed 0)")
    p.add_argument("--limit", type=int, default=1500, help="use the first N of them")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--mode", choices=["ssl", "sup"], default="ssl")
    p.add_argument("--method", default="simclr")
    p.add_argument("--backbone", default="resnet18-quarter")
    p.add_argument("--stem", default="imagenet", choices=STEMS)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--rot", type=float, default=40.0, help="max rotation of the augmented views (degrees)")
    p.add_argument("--min-crop", type=float, default=0.35, help="smallest crop area of the augmented views")
    p.add_argument(
        "--field-p", type=float, default=0.0, help="share of views masked by a random imaged field"
    )
    p.add_argument(
        "--field-fill", action="store_true", help="refill the frame's own field before the random one"
    )
    p.add_argument("--gain", type=float, nargs=2, help="gain range of the augmented views (default STRONG's)")
    p.add_argument("--gamma", type=float, nargs=2, help="gamma range of the augmented views")
    p.add_argument("--shading-p", type=float, default=0.0, help="share of views with a smooth gain field")
    p.add_argument("--views", nargs="+", help="keep only these views (default: all)")
    p.add_argument(
        "--ssl-json", type=Path, help="SSLConfig fields from a JSON file (e.g. DINO's), under the flags"
    )
    p.add_argument("--cache-dir", type=Path, default=Path("runs/cache"))
    a = p.parse_args()

    root = a.cache_dir / f"phantoms-v{GENERATOR_VERSION}-n{a.n}-s0"
    if not (root / "labels.csv").exists():
        generate_dataset(root, a.n, seed=0)
    images = read_csv_layout(root, name="phantoms")
    k = a.limit
    images = ImageList(images.paths[:k], images.labels[:k], images.subjects[:k], images.sources[:k])
    if a.views:
        keep = [i for i, lab in enumerate(images.labels) if lab in set(a.views)]
        images = ImageList(
            *(
                [seq[i] for i in keep]
                for seq in (images.paths, images.labels, images.subjects, images.sources)
            )
        )
    clean = CleanConfig(size=a.size)
    frames, _ = load_frames(images, clean, cache_dir=a.cache_dir)
    labels = np.array(images.labels)
    held = subject_split(list(images.subjects), 0.2, 0)
    x = torch.from_numpy(frames)
    strong = dataclasses.replace(
        augment_module.STRONG,
        max_rotation_deg=a.rot,
        scale=(a.min_crop, 1.0),
        field_p=a.field_p,
        field_fill=a.field_fill,
        shading_p=a.shading_p,
        gain=tuple(a.gain or augment_module.STRONG.gain),
        gamma=tuple(a.gamma or augment_module.STRONG.gamma),
    )
    t0 = time.time()
    result: dict = {"args": vars(a) | {"cache_dir": str(a.cache_dir)}, "generator_version": GENERATOR_VERSION}

    if a.mode == "sup":
        torch.manual_seed(0)
        backbone = build_backbone(a.backbone, stem=a.stem, img_size=a.size)
        classes = sorted(set(labels))
        y = torch.tensor([classes.index(lab) for lab in labels])
        head = torch.nn.Linear(backbone.out_dim, len(classes))
        opt = torch.optim.AdamW([*backbone.parameters(), *head.parameters()], lr=a.lr)
        train = np.where(~held)[0]
        rng = np.random.default_rng(0)
        for epoch in range(a.epochs):
            for group in opt.param_groups:
                group["lr"] = a.lr * 0.5 * (1 + np.cos(np.pi * epoch / a.epochs))
            backbone.train()
            perm = rng.permutation(train)
            for i in range(0, len(perm) - a.batch_size + 1, a.batch_size):
                idx = perm[i : i + a.batch_size]
                views = augment_module.augment(x[idx], strong, clean.mean, clean.std)
                loss = F.cross_entropy(head(backbone(views)), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        backbone.eval()
        with torch.no_grad():
            plain = [
                augment_module.plain(x[i : i + 256], clean.mean, clean.std) for i in range(0, len(x), 256)
            ]
            pred = torch.cat([head(backbone(v)).argmax(1) for v in plain])
        result["supervised_accuracy_heldout"] = round(float((pred[held] == y[held]).float().mean()), 3)
    else:
        extra = json.loads(a.ssl_json.read_text()).get("ssl", {}) if a.ssl_json else {}
        cfg = SSLConfig(
            **extra
            | dict(
                method=a.method,
                backbone=a.backbone,
                stem=a.stem,
                epochs=a.epochs,
                batch_size=a.batch_size,
                lr=a.lr,
                temperature=a.temperature,
                augment=strong,
            )
        )
        backbone, history = ssl_module.train_ssl(x, cfg, clean, torch.device("cpu"))
        emb = ssl_module.compute_embeddings(backbone, x, clean, torch.device("cpu"))
        result["final_loss"] = round(history[-1], 3)
        for name, feats in (("embeddings", emb), ("raw_pixels", raw_pixels(frames))):
            km = KMeans(len(set(labels)), n_init=10, random_state=0).fit_predict(feats)
            result[f"kmeans_purity_{name}"] = round(cluster_metrics(km, labels)["purity"], 3)
            clf = LogisticRegression(max_iter=2000).fit(feats[~held], labels[~held])
            result[f"linear_probe_{name}"] = round(float(clf.score(feats[held], labels[held])), 3)
        result["neighbour_agreement"] = round(neighbor_accuracy(mine_neighbors(emb, 20), labels), 3)
    result["seconds"] = round(time.time() - t0)
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
