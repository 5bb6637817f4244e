"""The FUSC cluster step: train heads so an image and its mined neighbours share a cluster (SCAN loss)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from service.clean import CleanConfig
from training.augment import WEAK, augment
from training.config import ClusterConfig
from training.losses import fusc_loss
from training.models import ClusterHeads, embed


def train_cluster_heads(
    embeddings: np.ndarray,
    neighbors: np.ndarray,
    cfg: ClusterConfig,
    device: torch.device,
    seed: int = 0,
    backbone: nn.Module | None = None,
    frames: torch.Tensor | None = None,
    clean: CleanConfig | None = None,
) -> tuple[nn.Linear, dict]:
    """Train ``cfg.num_heads`` heads with the FUSC loss and return the one with the lowest final loss.

    Head-only (default): the heads read the fixed embeddings, which makes the step take seconds on a CPU.
    With ``cfg.update_backbone`` the backbone is fine-tuned too, on weakly augmented frames.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    n, dim = embeddings.shape
    heads = ClusterHeads(dim, cfg.num_clusters, cfg.num_heads).to(device)
    params = list(heads.parameters())
    finetune = cfg.update_backbone and backbone is not None and frames is not None and clean is not None
    if finetune:
        backbone.train()
        params += list(backbone.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=1e-4)
    emb = torch.as_tensor(embeddings, device=device)
    nbrs = torch.as_tensor(neighbors)
    batch = min(cfg.batch_size, n)
    steps = max(1, n // batch)
    history: list[list[float]] = []
    for _epoch in tqdm(range(cfg.epochs), desc="fusc cluster step", unit="epoch"):
        perm = torch.randperm(n, generator=g)
        sums = torch.zeros(cfg.num_heads)
        for i in range(steps):
            idx = perm[i * batch : (i + 1) * batch]
            pick = nbrs[idx, torch.randint(nbrs.shape[1], (len(idx),), generator=g)]
            if finetune:
                xa = augment(frames[idx].to(device), WEAK, clean.mean, clean.std)
                xn = augment(frames[pick].to(device), WEAK, clean.mean, clean.std)
                za, zn = embed(backbone, xa), embed(backbone, xn)
            else:
                za, zn = emb[idx.to(device)], emb[pick.to(device)]
            pairs = zip(heads(za), heads(zn), strict=True)
            losses = [fusc_loss(la, ln, cfg.entropy_weight)[0] for la, ln in pairs]
            total = torch.stack(losses).sum()
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            sums += torch.tensor([loss.item() for loss in losses])
        history.append((sums / steps).tolist())
    final = torch.tensor(history[-1])
    best = int(final.argmin())
    if finetune:
        backbone.eval()
    head = heads.heads[best].cpu().eval()
    return head, {"best_head": best, "final_losses": final.tolist(), "history": history}


@torch.inference_mode()
def predict(head: nn.Linear, embeddings: np.ndarray) -> np.ndarray:
    """Cluster probabilities [N, K] for fixed embeddings."""
    return torch.softmax(head(torch.as_tensor(embeddings)), dim=1).numpy()
