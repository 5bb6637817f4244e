"""Self-supervised methods on one small base (``training.methods.base``): one file each, losses as pure
functions in ``losses``. ``build_method`` picks one by name."""

from __future__ import annotations

from collections.abc import Callable

from service.clean import CleanConfig
from training.config import SSLConfig
from training.methods.base import SSLMethod, compute_embeddings, train_ssl

__all__ = ["METHODS", "SSLMethod", "build_method", "compute_embeddings", "train_ssl"]


def _simclr(*args):
    from training.methods.simclr import SimCLR

    return SimCLR(*args)


def _barlowtwins(*args):
    from training.methods.barlowtwins import BarlowTwins

    return BarlowTwins(*args)


def _dino(*args):
    from training.methods.dino import DINO

    return DINO(*args)


METHODS: dict[str, Callable[..., SSLMethod]] = {"simclr": _simclr, "barlowtwins": _barlowtwins, "dino": _dino}


def build_method(cfg: SSLConfig, clean: CleanConfig) -> SSLMethod:
    from training.models import build_backbone

    if cfg.method not in METHODS:
        raise ValueError(f"unknown SSL method {cfg.method!r}; choose from {sorted(METHODS)}")
    backbone = build_backbone(cfg.backbone, stem=cfg.stem, img_size=clean.size, init=cfg.init)
    if cfg.freeze_blocks:
        if not hasattr(backbone, "freeze"):
            raise ValueError(f"ssl.freeze_blocks is for EfficientNet-Lite backbones, not {cfg.backbone!r}")
        backbone.freeze(cfg.freeze_blocks)
    return METHODS[cfg.method](backbone, cfg, clean)
