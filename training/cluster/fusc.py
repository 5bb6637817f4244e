"""The FUSC cluster step: train heads so an image and its mined neighbours share a cluster (SCAN loss).

Two ways to run it:

- **head-only on augmented embeddings** (the CPU default): the backbone is fixed, so each training image's
  embedding is computed once for ``cfg.views`` augmented views (``augmented_embeddings``); every step pairs
  an augmented view of an image with an augmented view of one of its neighbours, which is what SCAN's step
  does with a trainable backbone, at the cost of a few forward passes. Hundreds of epochs take seconds.
- **fine-tuning the backbone** too (``cfg.update_backbone``, for GPU presets): both images of a pair are
  augmented on the fly and the backbone learns at its own rate.

The heads read the embedding standardised with the training images' mean and spread per dimension
(``cfg.standardize``): pretrained features of ultrasound frames share a large common component (random pairs
have cosine similarity 0.4-0.9), and a linear head on the raw unit vectors must first grow large weights to
see anything but it. The standardisation is folded into the exported head, which still reads the served
embedding.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from service.clean import CleanConfig
from training.config import ClusterConfig
from training.data.augment import AugmentConfig, augment
from training.loop import epoch_loop
from training.methods.losses import fusc_loss
from training.models import ClusterHeads, embed


@torch.inference_mode()
def augmented_embeddings(
    backbone: nn.Module,
    frames: torch.Tensor,
    views: AugmentConfig,
    clean: CleanConfig,
    device: torch.device,
    n_views: int,
    seed: int = 0,
    batch: int = 256,
) -> np.ndarray:
    """Served embeddings of ``n_views`` augmented views of every frame: float32 [n_views, N, D].

    Draws from its own seeded generator state and puts the global random state back afterwards.
    """
    backbone.eval()
    cpu_state = torch.get_rng_state()
    torch.manual_seed(seed)
    out = []
    try:
        for _ in tqdm(range(n_views), desc="augmented views", unit="view", leave=False):
            rows = []
            for i in range(0, len(frames), batch):
                x = augment(frames[i : i + batch].to(device), views, clean.mean, clean.std)
                rows.append(embed(backbone, x).float().cpu())
            out.append(torch.cat(rows))
    finally:
        torch.set_rng_state(cpu_state)
    return torch.stack(out).numpy()


def standardizer(embeddings: np.ndarray, enabled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1/std) per dimension of the training embeddings; (0, 1) when not ``enabled``."""
    dim = embeddings.shape[1]
    if not enabled:
        return torch.zeros(dim), torch.ones(dim)
    mean = torch.as_tensor(embeddings.mean(0), dtype=torch.float32)
    std = torch.as_tensor(embeddings.std(0), dtype=torch.float32)
    return mean, 1.0 / std.clamp_min(1e-6)


def fold_standardization(head: nn.Linear, mean: torch.Tensor, inv_std: torch.Tensor) -> nn.Linear:
    """A Linear on the raw embedding equal to ``head`` on the standardised one: W' = W/s, b' = b - W'm."""
    out = nn.Linear(head.in_features, head.out_features)
    with torch.no_grad():
        weight = head.weight * inv_std.to(head.weight)
        out.weight.copy_(weight)
        out.bias.copy_(head.bias - weight @ mean.to(weight))
    return out.eval()


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
    views: np.ndarray | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    resume_state: dict | None = None,
    checkpoint_every: int = 1,
) -> tuple[nn.Linear, dict]:
    """Train ``cfg.num_heads`` heads with the FUSC loss and return the one with the lowest final loss, as a
    Linear on the served (unit-norm) embedding.

    ``embeddings`` [N,D]: the training images' plain embeddings; ``views`` [V,N,D]: embeddings of augmented
    views of the same images (head-only training then pairs random views; None: the plain ones). With
    ``cfg.update_backbone`` (and ``backbone``, ``frames``, ``clean``) the backbone is fine-tuned too, at
    ``cfg.backbone_rate``, on frames seen through ``cfg.augment``.

    ``on_epoch(state)``: called after every ``checkpoint_every``-th epoch (0: never) with a CPU snapshot of
    the heads, the fine-tuned backbone (else None), the optimiser, the data-order generator, the global
    random state, ``epoch`` (finished epochs), ``step`` and ``history``. ``resume_state``: such a snapshot;
    training goes on with the next epoch and ends exactly as a run that never stopped.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    n, dim = embeddings.shape
    finetune = cfg.update_backbone and backbone is not None and frames is not None and clean is not None
    mean, inv_std = standardizer(embeddings, cfg.standardize and not finetune)
    heads = ClusterHeads(dim, cfg.num_clusters, cfg.num_heads).to(device)
    groups = [{"params": list(heads.parameters())}]
    if finetune:
        backbone.train()
        groups.append({"params": list(backbone.parameters()), "lr": cfg.backbone_rate})
    opt = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    table = torch.as_tensor(views if views is not None else embeddings[None], device=device)
    table = (table - mean.to(device)) * inv_std.to(device)
    nbrs = torch.as_tensor(neighbors)
    batch = min(cfg.batch_size, n)
    steps = max(1, n // batch)
    history: list[list[float]] = []

    def state() -> dict:
        return {
            "step": len(history) * steps,
            "history": history,
            "heads": heads.state_dict(),
            "backbone": backbone.state_dict() if finetune else None,
            "optimizer": opt.state_dict(),
            "generator": g.get_state(),
        }

    def restore(saved: dict) -> None:
        heads.load_state_dict(saved["heads"])
        if finetune:
            backbone.load_state_dict(saved["backbone"])
        opt.load_state_dict(saved["optimizer"])
        g.set_state(saved["generator"])
        history[:] = [list(h) for h in saved["history"]]

    for _ in epoch_loop(
        cfg.epochs,
        state=state,
        restore=restore,
        resume_state=resume_state,
        on_epoch=on_epoch,
        checkpoint_every=checkpoint_every,
        device=device,
        desc="fusc cluster step",
    ):
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
                va = torch.randint(len(table), (len(idx),), generator=g)
                vn = torch.randint(len(table), (len(idx),), generator=g)
                za, zn = table[va.to(device), idx.to(device)], table[vn.to(device), pick.to(device)]
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
    head = fold_standardization(heads.heads[best].cpu(), mean, inv_std)
    return head, {"best_head": best, "final_losses": final.tolist(), "history": history}


@torch.inference_mode()
def predict(head: nn.Linear, embeddings: np.ndarray) -> np.ndarray:
    """Cluster probabilities [N, K] for fixed embeddings."""
    return torch.softmax(head(torch.as_tensor(embeddings)), dim=1).numpy()
