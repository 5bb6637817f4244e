"""The FUSC cluster step: train heads so an image and its mined neighbours share a cluster (SCAN loss)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from service.clean import CleanConfig
from training.config import ClusterConfig
from training.data.augment import augment
from training.loop import checkpoint_due, rng_state, set_rng_state, snapshot
from training.methods.losses import fusc_loss
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
    *,
    on_epoch: Callable[[dict], None] | None = None,
    resume_state: dict | None = None,
    checkpoint_every: int = 1,
) -> tuple[nn.Linear, dict]:
    """Train ``cfg.num_heads`` heads with the FUSC loss and return the one with the lowest final loss.

    Head-only (default): the heads read the fixed embeddings, which makes the step take seconds on a CPU.
    With ``cfg.update_backbone`` the backbone is fine-tuned too (at ``cfg.backbone_lr``), on frames seen
    through ``cfg.augment``.

    ``on_epoch(state)``: called after every ``checkpoint_every``-th epoch (0: never) with a CPU snapshot of
    the heads, the fine-tuned backbone (else None), the optimiser, the data-order generator, the global
    random state, ``epoch`` (finished epochs), ``step`` and ``history``. ``resume_state``: such a snapshot;
    training goes on with the next epoch and ends exactly as a run that never stopped.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    n, dim = embeddings.shape
    heads = ClusterHeads(dim, cfg.num_clusters, cfg.num_heads).to(device)
    groups = [{"params": list(heads.parameters())}]
    finetune = cfg.update_backbone and backbone is not None and frames is not None and clean is not None
    if finetune:
        backbone.train()
        groups.append({"params": list(backbone.parameters()), "lr": cfg.backbone_rate})
    opt = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=1e-4)
    emb = torch.as_tensor(embeddings, device=device)
    nbrs = torch.as_tensor(neighbors)
    batch = min(cfg.batch_size, n)
    steps = max(1, n // batch)
    history: list[list[float]] = []
    start = 0
    if resume_state is not None:
        heads.load_state_dict(resume_state["heads"])
        if finetune:
            backbone.load_state_dict(resume_state["backbone"])
        opt.load_state_dict(resume_state["optimizer"])
        g.set_state(resume_state["generator"])
        set_rng_state(resume_state["rng"], device)
        start, history = resume_state["epoch"], [list(h) for h in resume_state["history"]]
    bar = tqdm(
        range(start, cfg.epochs), desc="fusc cluster step", unit="epoch", initial=start, total=cfg.epochs
    )
    for epoch in bar:
        perm = torch.randperm(n, generator=g)
        sums = torch.zeros(cfg.num_heads)
        for i in range(steps):
            idx = perm[i * batch : (i + 1) * batch]
            pick = nbrs[idx, torch.randint(nbrs.shape[1], (len(idx),), generator=g)]
            if finetune:
                xa = augment(frames[idx].to(device), cfg.augment, clean.mean, clean.std)
                xn = augment(frames[pick].to(device), cfg.augment, clean.mean, clean.std)
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
        if on_epoch is not None and checkpoint_due(epoch + 1, checkpoint_every):
            on_epoch(
                snapshot(
                    {
                        "epoch": epoch + 1,
                        "step": (epoch + 1) * steps,
                        "history": history,
                        "heads": heads.state_dict(),
                        "backbone": backbone.state_dict() if finetune else None,
                        "optimizer": opt.state_dict(),
                        "generator": g.get_state(),
                        "rng": rng_state(device),
                    }
                )
            )
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
