"""Pieces every training loop shares (SSL, the cluster step, self-labeling): the global random state,
CPU snapshots for epoch checkpoints, when a checkpoint is due, and the learning-rate schedule."""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch


def rng_state(device: torch.device | None = None) -> dict:
    """The global random state: torch (CPU, and ``device``'s when it is a CUDA device), numpy, Python."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def snapshot(obj: Any) -> Any:
    """A copy of nested dicts, lists and tuples with every tensor detached and copied to the CPU: what an
    epoch callback receives, so that later steps cannot change it and it loads on any device."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(snapshot(v) for v in obj)
    return obj


def checkpoint_due(epoch: int, every: int) -> bool:
    """Whether an epoch callback runs after ``epoch`` (counted from 1): every ``every``-th one, 0 = never."""
    return every > 0 and epoch % every == 0


def cosine_schedule(step: int, total: int, base: float, warmup: int, final: float = 0.0) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return final + (base - final) * 0.5 * (1 + math.cos(math.pi * t))
