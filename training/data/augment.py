"""Ultrasound-aware augmentations, applied batch-wise to cached uint8 frames on the training device.

No colour jitter (the data is gray): random resized crops and rotations (probe position, tilt and
depth), horizontal flips (left/right is arbitrary in these planes), gain and gamma (machine settings),
multiplicative speckle and blur (transducer and resolution), cut-outs (shadows, missing windows), and a
random imaged field (a sector or a rectangle, as another probe or depth would show): without it, the shape
of the field is the easiest thing two views of one frame share, and the embedding sorts probes, not views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    scale: tuple[float, float] = (0.35, 1.0)
    # Sonographers hold a plane at up to about +-40 degrees from its textbook orientation.
    max_rotation_deg: float = 40.0
    flip_p: float = 0.5
    gain: tuple[float, float] = (0.7, 1.3)
    gamma: tuple[float, float] = (0.7, 1.4)
    speckle_p: float = 0.5
    speckle_std: float = 0.25
    blur_p: float = 0.3
    cutout_p: float = 0.3
    # Share of views masked by a random imaged field; of those, the share with a rectangular (linear) field.
    field_p: float = 0.0
    field_linear_p: float = 0.3
    # Before a view gets its random field, fill the black outside the frame's own field with tissue-like
    # noise, so the random field replaces the frame's field instead of cutting into it: two views of one
    # frame then share no field shape at all (without it they share the frame's black corners).
    field_fill: bool = False
    # Smooth multiplicative gain field (time-gain compensation, attenuation, a patient's coarse tissue
    # texture): exp of a random coarse map (4x4, bilinear) plus a linear ramp over depth, both with this std.
    shading_p: float = 0.0
    shading_std: float = 0.3


WEAK = AugmentConfig(scale=(0.7, 1.0), max_rotation_deg=8.0, speckle_p=0.2, blur_p=0.1, cutout_p=0.0)
STRONG = AugmentConfig(field_p=0.8)


def field_masks(n: int, size: int, linear_p: float, device: torch.device) -> torch.Tensor:
    """n random imaged fields [n,1,S,S] (1 inside): sectors with their apex above the frame (convex or
    phased probes) or rectangles (linear probes), with the depth ranges and widths scanners show."""
    c = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size * 2 - 1  # pixel centres, -1..1
    v, u = c.view(1, size, 1), c.view(1, 1, size)
    top = _uniform(n, -1.0, -0.75, device).view(n, 1, 1)
    bottom = _uniform(n, 0.75, 1.0, device).view(n, 1, 1)
    # Sector: apex on the centre line above the top edge, half-angle 25-45 degrees.
    ax = _uniform(n, -0.08, 0.08, device).view(n, 1, 1)
    ay = top - _uniform(n, 0.05, 1.2, device).view(n, 1, 1)
    half = torch.deg2rad(_uniform(n, 25.0, 45.0, device)).view(n, 1, 1)
    du, dv = u - ax, v - ay
    radius = torch.sqrt(du * du + dv * dv)
    sector = (torch.atan2(du, dv).abs() <= half) & (radius >= top - ay) & (radius <= bottom - ay)
    # Rectangle: a centred window 55-95 % of the width.
    width = _uniform(n, 0.55, 0.95, device).view(n, 1, 1)
    cx = _uniform(n, -0.1, 0.1, device).view(n, 1, 1)
    rect = ((u - cx).abs() <= width) & (v >= top) & (v <= bottom)
    linear = (torch.rand(n, device=device) < linear_p).view(n, 1, 1)
    return torch.where(linear, rect, sector).unsqueeze(1).float()


def own_field(x: torch.Tensor, level: float = 2.5 / 255) -> torch.Tensor:
    """The imaged field of frames x [n,1,S,S] in 0..1, as a 0/1 mask: in each row, from the first to the last
    pixel above ``level``. Sectors and rectangles are convex, so every row of the field is one run; fluid
    touching the field's edge may fall outside, which only means it is refilled too."""
    n, _, h, w = x.shape
    on = x[:, 0] > level
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    first = torch.where(on, cols, w).amin(dim=2, keepdim=True)
    last = torch.where(on, cols, -1).amax(dim=2, keepdim=True)
    return ((cols >= first) & (cols <= last)).unsqueeze(1).float()


def tissue_fill(x: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """x with the outside of ``field`` replaced by noise of the field's own mean and spread (coarse blobs plus
    grain), so nothing about the old field's shape is left."""
    n, _, h, w = x.shape
    area = field.sum(dim=(1, 2, 3), keepdim=True).clamp(min=1.0)
    mean = (x * field).sum(dim=(1, 2, 3), keepdim=True) / area
    var = ((x - mean) ** 2 * field).sum(dim=(1, 2, 3), keepdim=True) / area
    coarse = F.interpolate(
        torch.randn(n, 1, max(2, h // 8), max(2, w // 8), device=x.device),
        size=(h, w),
        mode="bilinear",
        align_corners=False,
    )
    noise = 0.6 * coarse + 0.8 * torch.randn_like(x)
    fill = (mean + var.sqrt() * noise).clamp(0, 1)
    return x * field + fill * (1 - field)


def shading(n: int, size: int, std: float, device: torch.device) -> torch.Tensor:
    """n smooth gain fields [n,1,S,S] around 1: a coarse random map and a ramp over depth (rows)."""
    coarse = F.interpolate(
        torch.randn(n, 1, 4, 4, device=device), size=(size, size), mode="bilinear", align_corners=True
    )
    depth = torch.linspace(-1, 1, size, device=device).view(1, 1, size, 1)
    ramp = torch.randn(n, 1, 1, 1, device=device) * depth
    return torch.exp(std * (coarse + ramp))


def _uniform(n: int, lo: float, hi: float, device: torch.device) -> torch.Tensor:
    return torch.empty(n, device=device).uniform_(lo, hi)


def augment(
    images: torch.Tensor, cfg: AugmentConfig, mean: float, std: float, out_size: int | None = None
) -> torch.Tensor:
    """uint8 [N,H,W] -> normalised float32 [N,1,S,S] with independent random transforms per image."""
    x = images.float().unsqueeze(1) / 255.0
    n, dev = x.shape[0], x.device
    size = out_size or x.shape[-1]

    # Geometry: one affine grid per image = crop scale, aspect, translation, rotation, flip.
    area = _uniform(n, *cfg.scale, dev)
    log_ratio = _uniform(n, math.log(3 / 4), math.log(4 / 3), dev)
    sx = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
    sy = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    tx = (1 - sx) * _uniform(n, -1, 1, dev)
    ty = (1 - sy) * _uniform(n, -1, 1, dev)
    theta_r = _uniform(n, -1, 1, dev) * math.radians(cfg.max_rotation_deg)
    flip = torch.where(torch.rand(n, device=dev) < cfg.flip_p, -1.0, 1.0)
    cos, sin = torch.cos(theta_r), torch.sin(theta_r)
    theta = torch.stack(
        [
            torch.stack([sx * cos * flip, -sy * sin, tx], dim=1),
            torch.stack([sx * sin * flip, sy * cos, ty], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
    frames = x
    x = F.grid_sample(frames, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if cfg.field_p > 0:
        on = (torch.rand(n, 1, 1, 1, device=dev) < cfg.field_p).float()
        if cfg.field_fill:
            # Views that get a new field: refill, then resample with reflection so no frame edge shows either.
            filled = F.grid_sample(
                tissue_fill(frames, own_field(frames)),
                grid,
                mode="bilinear",
                padding_mode="reflection",
                align_corners=False,
            )
            x = on * filled + (1 - on) * x
        x = x * (1 - on + on * field_masks(n, size, cfg.field_linear_p, dev))

    # Intensity: gain and gamma like a sonographer turning knobs.
    x = x.clamp(0, 1) ** _uniform(n, *cfg.gamma, dev).view(n, 1, 1, 1)
    x = x * _uniform(n, *cfg.gain, dev).view(n, 1, 1, 1)
    if cfg.shading_p > 0:
        on = (torch.rand(n, 1, 1, 1, device=dev) < cfg.shading_p).float()
        x = x * (1 - on + on * shading(n, size, cfg.shading_std, dev))

    if cfg.speckle_p > 0:
        on = (torch.rand(n, 1, 1, 1, device=dev) < cfg.speckle_p).float()
        noise = 1 + cfg.speckle_std * torch.randn_like(x)
        x = x * (1 - on + on * noise)
    if cfg.blur_p > 0:
        on = (torch.rand(n, 1, 1, 1, device=dev) < cfg.blur_p).float()
        k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], device=dev)
        k = (k[:, None] * k[None, :]) / 256.0
        blurred = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), k.view(1, 1, 5, 5))
        x = on * blurred + (1 - on) * x
    if cfg.cutout_p > 0:
        on = torch.rand(n, device=dev) < cfg.cutout_p
        side = (_uniform(n, 0.1, 0.3, dev) * size).long()
        cy = (torch.rand(n, device=dev) * size).long()
        cx = (torch.rand(n, device=dev) * size).long()
        yy = torch.arange(size, device=dev).view(1, size, 1)
        xx = torch.arange(size, device=dev).view(1, 1, size)
        box = ((yy - cy.view(n, 1, 1)).abs() < side.view(n, 1, 1) // 2) & (
            (xx - cx.view(n, 1, 1)).abs() < side.view(n, 1, 1) // 2
        )
        x = x.masked_fill((box & on.view(n, 1, 1)).unsqueeze(1), 0.0)

    return (x.clamp(0, 1) - mean) / std


def plain(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """The serving-time view: no augmentation, just normalisation (the same formula as service.clean)."""
    return (images.float().unsqueeze(1) / 255.0 - mean) / std
