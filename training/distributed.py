"""Multi-process training with torchrun: process-group set-up, and the few places where ranks differ.

Launched by ``torchrun --nproc_per_node N -m training train ...``: every rank runs the SSL step on its share
of each batch (gradients averaged by DistributedDataParallel); rank 0 alone mines neighbours, trains the
cluster heads (seconds, head-only) and writes the model repository. Without torchrun nothing changes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str = "auto") -> tuple[Dist, torch.device | None]:
    """Join the process group when torchrun set WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU).

    Returns the rank info and, under torchrun on CUDA, this rank's device (else None: the caller picks).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    device = None
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    return Dist(rank=rank, world=world, local_rank=local_rank), device


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def current() -> Dist:
    if dist.is_available() and dist.is_initialized():
        return Dist(
            rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", 0))
        )
    return Dist()
