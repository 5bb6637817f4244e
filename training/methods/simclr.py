"""SimCLR (Chen et al. 2020): two views of each image, NT-Xent over the batch."""

from __future__ import annotations

import torch
from torch import nn

from service.clean import CleanConfig
from training.config import SSLConfig
from training.methods.base import SSLMethod
from training.methods.losses import nt_xent
from training.models import ProjectionMLP


class SimCLR(SSLMethod):
    def __init__(self, backbone: nn.Module, cfg: SSLConfig, clean: CleanConfig):
        super().__init__(backbone, cfg, clean)
        self.projector = ProjectionMLP(backbone.out_dim, cfg.proj_hidden, cfg.proj_dim)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        v1, v2 = self.views(x)
        z = self.projector(self.backbone(torch.cat([v1, v2]))).float()
        return nt_xent(z[: len(x)], z[len(x) :], self.cfg.temperature)
