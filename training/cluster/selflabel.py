"""Self-labeling, the last FUSC step: confident predictions (p >= 0.99) become targets for strongly
augmented views, with classes re-weighted so that large clusters do not swallow small ones.

Head-only (the CPU default) it reads embeddings computed once: the target comes from an image's plain
embedding, the prediction that learns from it from one of its augmented views' embeddings. With
``cfg.update_backbone`` the backbone learns too, on views augmented on the fly.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from service.clean import CleanConfig
from training.cluster.fusc import fold_standardization, standardizer
from training.config import SelfLabelConfig
from training.data.augment import augment, plain
from training.loop import epoch_loop
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
    embeddings: np.ndarray | None = None,
    views: np.ndarray | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    resume_state: dict | None = None,
    checkpoint_every: int = 1,
) -> dict:
    """Fine-tune ``head`` in place (and the backbone with ``cfg.update_backbone``); returns a history with,
    per epoch, the share of images whose prediction passed ``cfg.threshold`` (``confident_share``) and the
    loss.

    Head-only when ``embeddings`` [N,D] (the plain ones) are given and the backbone is not updated;
    ``views`` [V,N,D] are the augmented views' embeddings the head learns from (None: the plain ones).

    ``on_epoch(state)``: called after every ``checkpoint_every``-th epoch (0: never) with a CPU snapshot of
    the head, the backbone when it is fine-tuned (else None), the optimiser, the data-order generator, the
    global random state, ``epoch`` (finished epochs), ``step`` and ``history``. ``resume_state``: such a
    snapshot, loaded into ``head`` (and the backbone); training goes on with the next epoch and ends
    exactly as a run that never stopped.
    """
    g = torch.Generator().manual_seed(seed)
    head_only = embeddings is not None and not cfg.update_backbone
    if head_only:
        # Train in the standardised space (the cluster step's own, when it standardised): a step of the rate
        # means the same for every embedding dimension whatever its spread. Folded back at the end.
        mean, inv_std = standardizer(embeddings, True)
        work = nn.Linear(head.in_features, head.out_features)
        with torch.no_grad():
            work.weight.copy_(head.weight / inv_std)
            work.bias.copy_(head.bias + head.weight @ mean)
        plain_emb = (torch.as_tensor(embeddings) - mean) * inv_std
        table = (torch.as_tensor(views if views is not None else embeddings[None]) - mean) * inv_std
        model, n = work.to(device), len(embeddings)
        plain_emb, table = plain_emb.to(device), table.to(device)
    else:
        model, n = head.to(device), len(frames)
    params = list(model.parameters()) + (list(backbone.parameters()) if cfg.update_backbone else [])
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=1e-4)
    batch = min(cfg.batch_size, n)
    history: list[dict] = []
    done = [0]  # optimiser steps so far

    def state() -> dict:
        return {
            "step": done[0],
            "history": history,
            "head": model.state_dict(),
            "backbone": backbone.state_dict() if cfg.update_backbone else None,
            "optimizer": opt.state_dict(),
            "generator": g.get_state(),
        }

    def restore(saved: dict) -> None:
        model.load_state_dict(saved["head"])
        if cfg.update_backbone:
            backbone.load_state_dict(saved["backbone"])
        opt.load_state_dict(saved["optimizer"])
        g.set_state(saved["generator"])
        done[0] = saved["step"]
        history[:] = list(saved["history"])

    for _ in epoch_loop(
        cfg.epochs,
        state=state,
        restore=restore,
        resume_state=resume_state,
        on_epoch=on_epoch,
        checkpoint_every=checkpoint_every,
        device=device,
        desc="self-label",
    ):
        perm = torch.randperm(n, generator=g)
        used, loss_sum, steps = 0, 0.0, 0
        for i in range(max(1, n // batch)):
            idx = perm[i * batch : (i + 1) * batch]
            if head_only:
                with torch.no_grad():
                    p = F.softmax(model(plain_emb[idx.to(device)]), dim=1)
            else:
                x = frames[idx].to(device)
                backbone.eval()
                with torch.no_grad():
                    p = F.softmax(model(embed(backbone, plain(x, clean.mean, clean.std))), dim=1)
            conf, target = p.max(dim=1)
            keep = conf >= cfg.threshold
            if keep.sum() < 2:
                continue
            if head_only:
                chosen = idx[keep.cpu()]
                v = torch.randint(len(table), (len(chosen),), generator=g)
                z = table[v.to(device), chosen.to(device)]
            else:
                strong = augment(x[keep], cfg.augment, clean.mean, clean.std)
                if cfg.update_backbone:
                    backbone.train()
                    z = embed(backbone, strong)
                else:
                    with torch.no_grad():
                        z = embed(backbone, strong)
            weight = balanced_weights(target[keep], model.out_features) if cfg.balance else None
            loss = F.cross_entropy(model(z), target[keep], weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            used += int(keep.sum())
            loss_sum += loss.item()
            steps += 1
        history.append({"confident_share": used / n, "loss": loss_sum / max(1, steps)})
        done[0] += steps
    if backbone is not None:
        backbone.eval()
    if head_only:
        folded = fold_standardization(model.cpu(), mean, inv_std)
        with torch.no_grad():
            head.weight.copy_(folded.weight)
            head.bias.copy_(folded.bias)
    head.cpu().eval()
    return {"history": history}
