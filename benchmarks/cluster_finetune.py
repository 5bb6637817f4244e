"""The cluster step with the backbone fine-tuned, from a finished phantom run's SSL backbone.

Reads RUN_DIR/outputs.npz (frames, labels, held-out mask, embeddings) and RUN_DIR/checkpoints/ssl.pt, mines
20 neighbours among the training subjects, runs ``training.cluster.train_cluster_heads`` with
``update_backbone`` (new heads and the backbone together, as a run does), and prints one JSON line: purity on
training and held-out subjects before (head-only heads on the frozen embeddings) and after, and the mined
neighbours' label agreement on the fine-tuned embeddings.

    python -m benchmarks.cluster_finetune --run-dir runs/phantoms-simclr --backbone-lr 1e-4 --views strong
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from service.clean import CleanConfig
from training.cluster.fusc import predict, train_cluster_heads
from training.cluster.knn import mine_neighbors, neighbor_accuracy
from training.config import ClusterConfig, TrainConfig
from training.data.augment import STRONG, WEAK
from training.evaluate.metrics import cluster_metrics
from training.methods.base import compute_embeddings
from training.models import build_backbone


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-2, help="the heads' rate")
    p.add_argument("--backbone-lr", type=float, default=1e-4)
    p.add_argument("--views", choices=["strong", "weak"], default="strong")
    p.add_argument("--batch-size", type=int, default=128)
    a = p.parse_args()

    cfg = TrainConfig.model_validate_json((a.run_dir / "config.json").read_text())
    data = np.load(a.run_dir / "outputs.npz", allow_pickle=True)
    frames, labels, held = torch.from_numpy(data["frames"]), data["labels"], data["held_out"]
    train = np.where(~held)[0]
    clean: CleanConfig = cfg.clean
    cpu = torch.device("cpu")
    backbone = build_backbone(cfg.ssl.backbone, stem=cfg.ssl.stem, img_size=clean.size)
    state = torch.load(a.run_dir / "checkpoints" / "ssl.pt", map_location="cpu", weights_only=False)
    backbone.load_state_dict(state["backbone"]["state"])

    def score(head: torch.nn.Module, emb: np.ndarray) -> dict:
        pred = predict(head, emb).argmax(1)
        return {
            "train": round(cluster_metrics(pred[train], labels[train])["purity"], 3),
            "held_out": round(cluster_metrics(pred[held], labels[held])["purity"], 3),
            "neighbours": round(neighbor_accuracy(mine_neighbors(emb[train], 20), labels[train]), 3),
        }

    emb = compute_embeddings(backbone, frames, clean, cpu)
    nbrs = mine_neighbors(emb[train], 20)
    k = int(cfg.cluster.num_clusters)
    frozen, _ = train_cluster_heads(emb[train], nbrs, ClusterConfig(num_clusters=k), cpu, cfg.seed)
    result: dict = {"args": vars(a) | {"run_dir": str(a.run_dir)}, "head_only": score(frozen, emb)}
    tuned_cfg = ClusterConfig(
        num_clusters=k,
        epochs=a.epochs,
        batch_size=a.batch_size,
        lr=a.lr,
        update_backbone=True,
        backbone_lr=a.backbone_lr,
        augment=STRONG if a.views == "strong" else WEAK,
    )
    t0 = time.time()
    head, _ = train_cluster_heads(
        emb[train], nbrs, tuned_cfg, cpu, cfg.seed, backbone, frames[torch.as_tensor(train)], clean
    )
    result["seconds"] = round(time.time() - t0)
    result["fine_tuned"] = score(head, compute_embeddings(backbone, frames, clean, cpu))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
