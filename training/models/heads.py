"""Heads over the backbone's features: the SSL projection MLP and the FUSC cluster heads."""

from __future__ import annotations

import torch
from torch import nn


class ProjectionMLP(nn.Module):
    def __init__(self, in_dim: int, hidden: int = 512, out_dim: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ClusterHeads(nn.Module):
    """Several linear heads over the L2-normalised embedding; training keeps the one with the lowest loss."""

    def __init__(self, in_dim: int, num_clusters: int, num_heads: int = 5):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(in_dim, num_clusters) for _ in range(num_heads))

    def forward(self, emb: torch.Tensor) -> list[torch.Tensor]:
        return [h(emb) for h in self.heads]
