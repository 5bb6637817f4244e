"""Self-labeling, the last FUSC step: confident predictions (p >= 0.99) become targets for strongly
augmented views, with classes re-weighted so that large clusters do not swallow small ones."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from service.clean import CleanConfig
from training.augment import STRONG, augment, plain
from training.config import SelfLabelConfig
from training.models import embed


def balanced_weights(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Cross-entropy class weights inversely proportional to each class's count among the targets."""
    counts = torch.bincount(targets, minlength=num_classes).float()
    weights = torch.zeros(num_classes, device=targets.device)
    present = counts > 0
    weights[present] = 1.0 / counts[present]
    return weights / weights[present].sum() * present.sum()


def self_label(
    backbone: nn.Module,
    head: nn.Linear,
    frames: torch.Tensor,
    cfg: SelfLabelConfig,
    clean: CleanConfig,
    device: torch.device,
    seed: int = 0,
) -> dict:
    """Fine-tune ``head`` (and the backbone with ``cfg.update_backbone``) in place; returns a history."""
    g = torch.Generator().manual_seed(seed)
    head = head.to(device)
    params = list(head.parameters()) + (list(backbone.parameters()) if cfg.update_backbone else [])
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=1e-4)
    n = len(frames)
    batch = min(cfg.batch_size, n)
    history: list[dict] = []
    for _epoch in tqdm(range(cfg.epochs), desc="self-label", unit="epoch"):
        perm = torch.randperm(n, generator=g)
        used, loss_sum, steps = 0, 0.0, 0
        for i in range(max(1, n // batch)):
            x = frames[perm[i * batch : (i + 1) * batch]].to(device)
            backbone.eval()
            with torch.no_grad():
                p = F.softmax(head(embed(backbone, plain(x, clean.mean, clean.std))), dim=1)
            conf, target = p.max(dim=1)
            keep = conf >= cfg.threshold
            if keep.sum() < 2:
                continue
            strong = augment(x[keep], STRONG, clean.mean, clean.std)
            if cfg.update_backbone:
                backbone.train()
                z = embed(backbone, strong)
            else:
                with torch.no_grad():
                    z = embed(backbone, strong)
            weight = balanced_weights(target[keep], head.out_features) if cfg.balance else None
            loss = F.cross_entropy(head(z), target[keep], weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            used += int(keep.sum())
            loss_sum += loss.item()
            steps += 1
        history.append({"confident_share": used / n, "loss": loss_sum / max(1, steps)})
    backbone.eval()
    head.cpu().eval()
    return {"history": history}
