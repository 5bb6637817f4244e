"""Vision Transformer backbone for 1-channel ultrasound: the DINO backbone of the FUSC paper (ViT-S/16).

Maps [N,1,S,S] to the final-LayerNorm CLS token [N, dim]. Position embeddings are learnt for ``img_size``
and resampled (bicubic) for other input sizes, so DINO's smaller local crops go through the same network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 1,
        dim: int = 384,
        depth: int = 12,
        heads: int = 6,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"ViT width {dim} is not divisible by {heads} heads")
        if img_size < patch_size:
            raise ValueError(f"ViT input of {img_size} px is smaller than one {patch_size} px patch")
        self.patch_size, self.out_dim = patch_size, dim
        self.grid = img_size // patch_size
        self.patch_embed = nn.Conv2d(in_chans, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        # N(0, 0.02): DINO's trunc_normal_(std=0.02) cuts at +-2 absolute, i.e. never, and costs 10x more.
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def pos_embed_for(self, h: int, w: int) -> torch.Tensor:
        """Position embeddings for an h x w patch grid: the learnt ones, resampled if the grid differs.

        The branch is decided by Python ints, so an ONNX export at ``img_size`` holds no resampling.
        """
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        cls, patches = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        d = patches.shape[-1]
        patches = patches.reshape(1, self.grid, self.grid, d).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, h * w, d)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # [N, dim, h, w]; a border narrower than a patch is dropped
        h, w = int(x.shape[-2]), int(x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.blocks(x + self.pos_embed_for(h, w))
        return self.norm(x)[:, 0]


# name -> (patch, dim, depth, heads)
VITS: dict[str, tuple[int, int, int, int]] = {
    "vit-small-16": (16, 384, 12, 6),
    "vit-tiny-16": (16, 192, 12, 3),
    "vit-tiny-8": (8, 192, 12, 3),
    # For CPU runs on 64-px inputs: 64 patches, 4 blocks.
    "vit-micro-8": (8, 96, 4, 3),
}


def build_vit(name: str, img_size: int = 224, in_chans: int = 1) -> VisionTransformer:
    try:
        patch, dim, depth, heads = VITS[name]
    except KeyError:
        raise ValueError(f"unknown ViT {name!r}; choose from {sorted(VITS)}") from None
    return VisionTransformer(img_size, patch, in_chans, dim, depth, heads)
