"""Losses as pure functions: NT-Xent for SimCLR and the FUSC/SCAN clustering loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SimCLR's normalised-temperature cross entropy over 2N views; positives are (i, i+N)."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, targets)


def fusc_loss(
    anchor_logits: torch.Tensor, neighbor_logits: torch.Tensor, entropy_weight: float = 5.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FUSC (SCAN) loss: -mean log <p(x), p(k)> for a mined neighbour k, minus weight * H(mean p(x)).

    The entropy term spreads the batch over all clusters (FUSC uses weight 5). Returns (total,
    consistency, entropy) so both parts can be logged.
    """
    p_a = F.softmax(anchor_logits, dim=1)
    p_n = F.softmax(neighbor_logits, dim=1)
    similarity = (p_a * p_n).sum(dim=1)
    consistency = -torch.log(similarity.clamp_min(1e-8)).mean()
    mean_p = p_a.mean(dim=0)
    entropy = -(mean_p * torch.log(mean_p.clamp_min(1e-8))).sum()
    return consistency - entropy_weight * entropy, consistency, entropy


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, redundancy_weight: float = 5e-3) -> torch.Tensor:
    """BarlowTwins: the cross-correlation of the two standardised views should be the identity matrix.

    sum_i (1 - C_ii)^2 + w * sum_{i != j} C_ij^2, with C computed over the batch.
    """
    n = z1.shape[0]
    z1 = (z1 - z1.mean(0)) / (z1.std(0, unbiased=False) + 1e-6)
    z2 = (z2 - z2.mean(0)) / (z2.std(0, unbiased=False) + 1e-6)
    c = z1.t() @ z2 / n
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = (c - torch.diag(torch.diagonal(c))).pow(2).sum()
    return on_diag + redundancy_weight * off_diag
