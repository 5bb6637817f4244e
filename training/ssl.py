"""Self-supervised pre-training of the backbone (SimCLR) on cached, cleaned frames."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from service.clean import CleanConfig
from training.augment import STRONG, augment, plain
from training.config import SSLConfig
from training.losses import nt_xent
from training.models import ProjectionMLP, build_backbone, embed


def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_simclr(
    frames: torch.Tensor, cfg: SSLConfig, clean: CleanConfig, device: torch.device, seed: int = 0
) -> tuple[nn.Module, list[float]]:
    """Train a backbone with SimCLR on uint8 frames [N,S,S]; returns it (eval mode) and the loss per epoch."""
    g = torch.Generator().manual_seed(seed)
    backbone = build_backbone(cfg.backbone, small_stem=cfg.small_stem).to(device)
    projector = ProjectionMLP(backbone.out_dim, 512, cfg.proj_dim).to(device)
    params = list(backbone.parameters()) + list(projector.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(frames)
    batch = min(cfg.batch_size, n)
    steps_per_epoch = max(1, n // batch)
    total = cfg.epochs * steps_per_epoch
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    history: list[float] = []
    step = 0
    for epoch in range(cfg.epochs):
        backbone.train()
        projector.train()
        perm = torch.randperm(n, generator=g)
        running = 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"simclr {epoch + 1}/{cfg.epochs}", unit="step", leave=False)
        for i in bar:
            idx = perm[i * batch : (i + 1) * batch]
            x = frames[idx].to(device, non_blocking=True)
            v1 = augment(x, STRONG, clean.mean, clean.std)
            v2 = augment(x, STRONG, clean.mean, clean.std)
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, total, cfg.lr, warmup=min(100, total // 10 + 1))
            with torch.autocast(device.type, enabled=use_amp):
                z = projector(backbone(torch.cat([v1, v2])))
                loss = nt_xent(z[: len(idx)].float(), z[len(idx) :].float(), cfg.temperature)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            running += loss.item()
            step += 1
            bar.set_postfix(loss=f"{loss.item():.3f}")
        history.append(running / steps_per_epoch)
        print(f"simclr epoch {epoch + 1}/{cfg.epochs} loss {history[-1]:.4f}")
    backbone.eval()
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
