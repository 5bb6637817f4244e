"""Self-supervised pre-training of the backbone on cached, cleaned frames.

The methods share one loop and differ in a small class each (one file per method in this package): how many
views, which projector, which loss, and an optional hook after each optimiser step (DINO's teacher update).

``train_ssl`` (like the cluster step and self-labeling) can hand a snapshot of everything it needs to go on
to ``on_epoch`` every few epochs, and continue from such a snapshot (``resume_state``) exactly as if it had
never stopped; ``training.loop`` holds the pieces the three loops share.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from service.clean import CleanConfig
from training.config import SSLConfig
from training.data.augment import augment, plain
from training.distributed import current
from training.loop import cosine_schedule, epoch_loop, rng_state, set_rng_state
from training.models import embed


class SSLMethod(nn.Module):
    """A backbone plus whatever the method trains beside it; ``loss`` takes a uint8 batch [N,S,S]."""

    def __init__(self, backbone: nn.Module, cfg: SSLConfig, clean: CleanConfig):
        super().__init__()
        self.backbone, self.cfg, self.clean = backbone, cfg, clean

    def views(self, x: torch.Tensor, n: int = 2) -> list[torch.Tensor]:
        return [augment(x, self.cfg.augment, self.clean.mean, self.clean.std) for _ in range(n)]

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # DistributedDataParallel hooks forward(); the loss is the method's forward pass.
        return self.loss(x)

    def after_step(self, step: int, total: int) -> None:
        """Called after each optimiser step (e.g. a momentum teacher); nothing by default."""


def train_ssl(
    frames: torch.Tensor,
    cfg: SSLConfig,
    clean: CleanConfig,
    device: torch.device,
    seed: int = 0,
    *,
    on_epoch: Callable[[dict], None] | None = None,
    resume_state: dict | None = None,
    checkpoint_every: int = 1,
) -> tuple[nn.Module, list[float]]:
    """Train a backbone on uint8 frames [N,S,S]; returns it (eval mode) and the mean loss per epoch.

    ``on_epoch(state)``: called after every ``checkpoint_every``-th epoch (0: never), on every rank, with a
    CPU snapshot of the method (backbone, projector or DINO head, teacher and centre), the optimiser, the
    AMP scaler, the data-order generator, the global random state of each rank, ``epoch`` (finished epochs),
    ``step`` and ``history``. ``resume_state``: such a snapshot; training goes on with the next epoch and
    ends exactly as a run that never stopped (under torchrun: with the same number of processes).
    """
    g = torch.Generator().manual_seed(seed)  # the same permutation on every rank; each takes its share
    torch.manual_seed(seed)
    ranks = current()
    from training.methods import build_method

    method = build_method(cfg, clean).to(device)
    params = [p for p in method.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(frames)
    batch = min(cfg.batch_size, n)
    steps_per_epoch = max(1, n // batch)
    total = cfg.epochs * steps_per_epoch
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    history: list[float] = []
    step = [0]  # optimiser steps so far (the schedules follow it)
    # Under torchrun, gradients are averaged across ranks; contrastive negatives stay within each rank.
    # DINO's prototypes sit out their first epoch, so DDP must allow parameters without gradients.
    model = (
        DistributedDataParallel(method, find_unused_parameters=cfg.method == "dino")
        if ranks.enabled
        else method
    )

    def state() -> dict:
        return {
            "step": step[0],
            "history": history,
            "model": method.state_dict(),
            "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict(),
            "generator": g.get_state(),
        }

    def restore(saved: dict) -> None:
        method.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        if saved["scaler"]:  # empty when saved without AMP
            scaler.load_state_dict(saved["scaler"])
        g.set_state(saved["generator"])
        step[0] = saved["step"]
        history[:] = list(saved["history"])

    for epoch in epoch_loop(
        cfg.epochs,
        state=state,
        restore=restore,
        resume_state=resume_state,
        on_epoch=on_epoch,
        checkpoint_every=checkpoint_every,
        device=device,
        # Each rank draws its own augmentations: every rank's random state is saved, each gets its own back.
        rng=lambda: _gather_rng(device),
        restore_rng=lambda states: set_rng_state(_rank_entry(states, ranks.rank), device),
        desc=cfg.method,
        progress=ranks.main,
    ):
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
                group["lr"] = cosine_schedule(step[0], total, cfg.lr, warmup=min(100, total // 10 + 1))
            with torch.autocast(device.type, enabled=use_amp):
                loss = model(x)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.clip_grad:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            scaler.step(opt)
            scaler.update()
            method.after_step(step[0], total)
            running += loss.item()
            step[0] += 1
            bar.set_postfix(loss=f"{loss.item():.3f}")
        history.append(running / steps_per_epoch)
        if ranks.main:
            print(
                f"{cfg.method} epoch {epoch + 1}/{cfg.epochs} loss {history[-1]:.4f} "
                f"({ranks.world} process(es))"
            )
    backbone = method.backbone.eval()
    return backbone, history


def _gather_rng(device: torch.device) -> list[dict]:
    """The global random state of every rank (ranks draw different augmentations), rank 0 first."""
    state = rng_state(device)
    ranks = current()
    if not ranks.enabled:
        return [state]
    states: list = [None] * ranks.world
    torch.distributed.all_gather_object(states, state)
    return states


def _rank_entry(states: list[dict], rank: int) -> dict:
    """This rank's saved random state; rank 0's when the snapshot came from fewer processes."""
    return states[rank] if rank < len(states) else states[0]


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
