"""Self-labeling, the last FUSC step: confident predictions (p >= 0.99) become targets for strongly
augmented views, with classes re-weighted so that large clusters do not swallow small ones."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from service.clean import CleanConfig
from training.config import SelfLabelConfig
from training.data.augment import augment, plain
from training.loop import checkpoint_due, rng_state, set_rng_state, snapshot
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
    *,
    on_epoch: Callable[[dict], None] | None = None,
    resume_state: dict | None = None,
    checkpoint_every: int = 1,
) -> dict:
    """Fine-tune ``head`` (and the backbone with ``cfg.update_backbone``) in place; returns a history.

    ``on_epoch(state)``: called after every ``checkpoint_every``-th epoch (0: never) with a CPU snapshot of
    the head, the backbone when it is fine-tuned (else None), the optimiser, the data-order generator, the
    global random state, ``epoch`` (finished epochs), ``step`` and ``history``. ``resume_state``: such a
    snapshot, loaded into ``head`` (and the backbone); training goes on with the next epoch and ends
    exactly as a run that never stopped.
    """
    g = torch.Generator().manual_seed(seed)
    head = head.to(device)
    params = list(head.parameters()) + (list(backbone.parameters()) if cfg.update_backbone else [])
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=1e-4)
    n = len(frames)
    batch = min(cfg.batch_size, n)
    history: list[dict] = []
    start = done = 0  # done: optimiser steps so far
    if resume_state is not None:
        head.load_state_dict(resume_state["head"])
        if cfg.update_backbone:
            backbone.load_state_dict(resume_state["backbone"])
        opt.load_state_dict(resume_state["optimizer"])
        g.set_state(resume_state["generator"])
        set_rng_state(resume_state["rng"], device)
        start, done, history = resume_state["epoch"], resume_state["step"], list(resume_state["history"])
    for epoch in tqdm(
        range(start, cfg.epochs), desc="self-label", unit="epoch", initial=start, total=cfg.epochs
    ):
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
            strong = augment(x[keep], cfg.augment, clean.mean, clean.std)
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
        done += steps
        if on_epoch is not None and checkpoint_due(epoch + 1, checkpoint_every):
            on_epoch(
                snapshot(
                    {
                        "epoch": epoch + 1,
                        "step": done,
                        "history": history,
                        "head": head.state_dict(),
                        "backbone": backbone.state_dict() if cfg.update_backbone else None,
                        "optimizer": opt.state_dict(),
                        "generator": g.get_state(),
                        "rng": rng_state(device),
                    }
                )
            )
    backbone.eval()
    head.cpu().eval()
    return {"history": history}
