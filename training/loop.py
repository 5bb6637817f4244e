"""Pieces every training loop shares (SSL, the cluster step, self-labeling): one epoch loop with checkpoints
and resumption, the global random state, CPU snapshots, and the learning-rate schedule."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from tqdm import tqdm


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


def epoch_loop(
    total: int,
    *,
    state: Callable[[], dict],
    restore: Callable[[dict], None] | None = None,
    resume_state: dict | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    checkpoint_every: int = 1,
    device: torch.device | None = None,
    rng: Callable[[], Any] | None = None,
    restore_rng: Callable[[Any], None] | None = None,
    desc: str = "",
    progress: bool = True,
) -> Iterator[int]:
    """The epochs of one training stage, with checkpoints and resumption; the three stages share it.

    Yields the 0-based epoch numbers still to run. After each epoch whose number (from 1) is due under
    ``checkpoint_every`` (0: never), ``on_epoch`` gets a CPU snapshot of ``state()`` (the stage's modules,
    optimiser, data-order generator, history …) plus ``epoch`` (finished epochs) and ``rng`` (the global
    random state, or what ``rng()`` returns). With ``resume_state`` (such a snapshot), ``restore`` puts the
    stage's objects back, the random state is restored, and the loop goes on with the next epoch, so the stage
    ends exactly as one that never stopped. An exception from ``on_epoch`` (a requested stop) ends the loop.
    """
    start = 0
    if resume_state is not None:
        if restore is not None:
            restore(resume_state)
        (restore_rng or (lambda s: set_rng_state(s, device)))(resume_state["rng"])
        start = resume_state["epoch"]
    bar = tqdm(range(start, total), desc=desc, unit="epoch", initial=start, total=total, disable=not progress)
    for epoch in bar:
        yield epoch
        if on_epoch is not None and checkpoint_due(epoch + 1, checkpoint_every):
            saved = {**state(), "epoch": epoch + 1, "rng": rng() if rng else rng_state(device)}
            on_epoch(snapshot(saved))
