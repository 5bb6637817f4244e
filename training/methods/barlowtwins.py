"""BarlowTwins (Zbontar et al. 2021): the cross-correlation of two views' projections towards identity."""

from __future__ import annotations

import torch
from torch import nn

from service.clean import CleanConfig
from training.config import SSLConfig
from training.methods.base import SSLMethod
from training.methods.losses import barlow_twins_loss


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
