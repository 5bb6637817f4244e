"""Self-supervised pre-training of the backbone on cached, cleaned frames.

The methods share one loop and differ in a small class each: how many views, which projector, which loss,
and an optional hook after each optimiser step (DINO's teacher update). ``METHODS`` maps names to classes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from service.clean import CleanConfig
from training.augment import STRONG, augment, plain
from training.config import SSLConfig
from training.distributed import current
from training.losses import barlow_twins_loss, nt_xent
from training.models import ProjectionMLP, build_backbone, embed


def cosine_schedule(step: int, total: int, base: float, warmup: int, final: float = 0.0) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return final + (base - final) * 0.5 * (1 + math.cos(math.pi * t))


class SSLMethod(nn.Module):
    """A backbone plus whatever the method trains beside it; ``loss`` takes a uint8 batch [N,S,S]."""

    def __init__(self, backbone: nn.Module, cfg: SSLConfig, clean: CleanConfig):
        super().__init__()
        self.backbone, self.cfg, self.clean = backbone, cfg, clean

    def views(self, x: torch.Tensor, n: int = 2) -> list[torch.Tensor]:
        return [augment(x, STRONG, self.clean.mean, self.clean.std) for _ in range(n)]

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # DistributedDataParallel hooks forward(); the loss is the method's forward pass.
        return self.loss(x)

    def after_step(self, step: int, total: int) -> None:
        """Called after each optimiser step (e.g. a momentum teacher); nothing by default."""


class SimCLR(SSLMethod):
    def __init__(self, backbone: nn.Module, cfg: SSLConfig, clean: CleanConfig):
        super().__init__(backbone, cfg, clean)
        self.projector = ProjectionMLP(backbone.out_dim, cfg.proj_hidden, cfg.proj_dim)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        v1, v2 = self.views(x)
        z = self.projector(self.backbone(torch.cat([v1, v2]))).float()
        return nt_xent(z[: len(x)], z[len(x) :], self.cfg.temperature)


class BarlowTwins(SSLMethod):
    def __init__(self, backbone: nn.Module, cfg: SSLConfig, clean: CleanConfig):
        super().__init__(backbone, cfg, clean)
        h = cfg.proj_hidden
        self.projector = nn.Sequential(
            nn.Linear(backbone.out_dim, h),
            nn.BatchNorm1d(h),
            nn.ReLU(inplace=True),
            nn.Linear(h, h),
            nn.BatchNorm1d(h),
            nn.ReLU(inplace=True),
            nn.Linear(h, h),
        )

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        v1, v2 = self.views(x)
        z = self.projector(self.backbone(torch.cat([v1, v2]))).float()
        return barlow_twins_loss(z[: len(x)], z[len(x) :], self.cfg.redundancy_weight)


METHODS: dict[str, Callable[..., SSLMethod]] = {"simclr": SimCLR, "barlowtwins": BarlowTwins}


def build_method(cfg: SSLConfig, clean: CleanConfig) -> SSLMethod:
    if cfg.method == "dino" and "dino" not in METHODS:
        from training.dino import DINO

        METHODS["dino"] = DINO
    if cfg.method not in METHODS:
        raise ValueError(f"unknown SSL method {cfg.method!r}; choose from {sorted(METHODS) + ['dino']}")
    backbone = build_backbone(cfg.backbone, small_stem=cfg.small_stem, img_size=clean.size)
    return METHODS[cfg.method](backbone, cfg, clean)


def train_ssl(
    frames: torch.Tensor, cfg: SSLConfig, clean: CleanConfig, device: torch.device, seed: int = 0
) -> tuple[nn.Module, list[float]]:
    """Train a backbone on uint8 frames [N,S,S]; returns it (eval mode) and the mean loss per epoch."""
    g = torch.Generator().manual_seed(seed)  # the same permutation on every rank; each takes its share
    torch.manual_seed(seed)
    ranks = current()
    method = build_method(cfg, clean).to(device)
    params = [p for p in method.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Under torchrun, gradients are averaged across ranks; contrastive negatives stay within each rank.
    # DINO's prototypes sit out their first epoch, so DDP must allow parameters without gradients.
    model = (
        DistributedDataParallel(method, find_unused_parameters=cfg.method == "dino")
        if ranks.enabled
        else method
    )
    n = len(frames)
    batch = min(cfg.batch_size, n)
    steps_per_epoch = max(1, n // batch)
    total = cfg.epochs * steps_per_epoch
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    history: list[float] = []
    step = 0
    for epoch in range(cfg.epochs):
        method.train()
        perm = torch.randperm(n, generator=g)
        running = 0.0
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"{cfg.method} {epoch + 1}/{cfg.epochs}",
            unit="step",
            leave=False,
            disable=not ranks.main,
        )
        for i in bar:
            idx = perm[i * batch : (i + 1) * batch][ranks.rank :: ranks.world]
            x = frames[idx].to(device, non_blocking=True)
            for group in opt.param_groups:
                group["lr"] = cosine_schedule(step, total, cfg.lr, warmup=min(100, total // 10 + 1))
            with torch.autocast(device.type, enabled=use_amp):
                loss = model(x)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.clip_grad:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            scaler.step(opt)
            scaler.update()
            method.after_step(step, total)
            running += loss.item()
            step += 1
            bar.set_postfix(loss=f"{loss.item():.3f}")
        history.append(running / steps_per_epoch)
        if ranks.main:
            print(
                f"{cfg.method} epoch {epoch + 1}/{cfg.epochs} loss {history[-1]:.4f} "
                f"({ranks.world} process(es))"
            )
    backbone = method.backbone.eval()
    return backbone, history


@torch.inference_mode()
def compute_embeddings(
    backbone: nn.Module, frames: torch.Tensor, clean: CleanConfig, device: torch.device, batch: int = 256
) -> np.ndarray:
    """The served embedding of each frame (no augmentation): float32 [N, D], unit norm."""
    backbone.eval()
    out = []
    for i in tqdm(range(0, len(frames), batch), desc="embed", unit="batch", leave=False):
        x = plain(frames[i : i + batch].to(device), clean.mean, clean.std)
        out.append(embed(backbone, x).float().cpu())
    return torch.cat(out).numpy()
