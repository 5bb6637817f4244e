"""The augmented views: shapes and ranges, the random imaged field, and the typed config that carries them."""

import dataclasses
import math

import pytest

torch = pytest.importorskip("torch")

from training.config import build_config  # noqa: E402
from training.data.augment import (  # noqa: E402
    STRONG,
    WEAK,
    AugmentConfig,
    augment,
    field_masks,
    own_field,
    tissue_fill,
)


def test_field_masks_are_sectors_and_rectangles_of_plausible_size():
    torch.manual_seed(0)
    size = 64
    sectors = field_masks(200, size, linear_p=0.0, device=torch.device("cpu"))[:, 0]
    rects = field_masks(200, size, linear_p=1.0, device=torch.device("cpu"))[:, 0]
    assert sectors.shape == rects.shape == (200, size, size)
    assert set(torch.unique(sectors).tolist()) == {0.0, 1.0}
    for masks in (sectors, rects):
        share = masks.mean((1, 2))
        # Every field keeps a real part of the frame and removes some of it.
        assert float(share.min()) > 0.2 and float(share.max()) < 0.99

    # A rectangle is as wide at its top row as at its bottom row; a sector widens with depth.
    def widths(m: torch.Tensor, row: int) -> torch.Tensor:
        return m[:, row, :].sum(1)

    top, bottom = int(0.27 * size), int(0.6 * size)
    assert torch.equal(widths(rects, top), widths(rects, bottom))
    # (a wide sector can fill both rows to the frame's edges)
    assert bool((widths(sectors, bottom) >= widths(sectors, top)).all())
    assert float((widths(sectors, bottom) > widths(sectors, top)).float().mean()) > 0.8
    # Sectors are symmetric about a line near the centre: the apex sits within 8 % of the middle.
    cols = torch.arange(size, dtype=torch.float32)
    centre = (sectors[:, bottom, :] * cols).sum(1) / sectors[:, bottom, :].sum(1)
    assert float((centre - (size - 1) / 2).abs().max()) <= 0.08 * size / 2 + 1.5


def test_field_p_masks_the_share_of_views_asked_for():
    torch.manual_seed(1)
    frames = torch.full((400, 32, 32), 200, dtype=torch.uint8)
    plain = dataclasses.replace(STRONG, scale=(1.0, 1.0), max_rotation_deg=0.0, cutout_p=0.0, speckle_p=0.0)
    off = augment(frames, dataclasses.replace(plain, field_p=0.0), mean=0.0, std=1.0)
    on = augment(frames, dataclasses.replace(plain, field_p=0.5), mean=0.0, std=1.0)
    zero_share = lambda x: (x[:, 0] <= 1e-6).float().mean((1, 2))  # noqa: E731
    assert float(zero_share(off).max()) == 0.0  # a full frame with no field keeps every pixel
    masked = float((zero_share(on) > 0.02).float().mean())
    assert abs(masked - 0.5) < 0.1


def test_strong_views_get_a_field_weak_ones_do_not():
    assert STRONG.field_p > 0 and WEAK.field_p == 0


def test_augment_config_is_part_of_the_typed_run_config():
    cfg = build_config("cpu-small", ssl={"augment": {"field_p": 0.25, "max_rotation_deg": 10}})
    assert isinstance(cfg.ssl.augment, AugmentConfig)
    assert cfg.ssl.augment.field_p == 0.25 and cfg.ssl.augment.max_rotation_deg == 10
    assert cfg.ssl.augment.scale == STRONG.scale  # fields not given keep STRONG's values
    assert build_config("cpu-small").ssl.augment == STRONG
    # Self-labeling's strong views are set apart from the SSL views.
    cfg = build_config("cpu-small", selflabel={"augment": {"field_p": 0.0}})
    assert cfg.selflabel.augment.field_p == 0.0 and cfg.ssl.augment == STRONG
    with pytest.raises(ValueError):
        build_config("cpu-small", ssl={"augment": {"field_p": "often"}})


def test_views_are_normalised_and_finite():
    torch.manual_seed(2)
    frames = torch.randint(0, 256, (16, 48, 48), dtype=torch.uint8)
    out = augment(frames, STRONG, mean=0.5, std=0.25, out_size=32)
    assert out.shape == (16, 1, 32, 32)
    assert bool(torch.isfinite(out).all())
    assert float(out.min()) >= (0 - 0.5) / 0.25 - 1e-6 and float(out.max()) <= (1 - 0.5) / 0.25 + 1e-6
    assert not math.isclose(float(out.std()), 0.0)


def _narrow_field_frames(n: int = 64, size: int = 32) -> torch.Tensor:
    """Frames whose own field is the middle third of the columns (black at both sides), textured inside."""
    torch.manual_seed(3)
    frames = torch.zeros((n, size, size), dtype=torch.uint8)
    frames[:, :, size // 3 : 2 * size // 3] = torch.randint(60, 200, (n, size, 2 * size // 3 - size // 3)).to(
        torch.uint8
    )
    return frames


def test_own_field_is_each_rows_run_of_signal():
    frames = _narrow_field_frames(4)
    x = frames.float().unsqueeze(1) / 255.0
    x[0, 0, 10, 12:14] = 0.0  # dark fluid inside the field stays inside: the run spans it
    field = own_field(x)
    assert field.shape == x.shape
    expected = torch.zeros(32, 32)
    expected[:, 32 // 3 : 2 * 32 // 3] = 1.0
    for i in range(4):
        assert torch.equal(field[i, 0], expected)
    # An empty row has no field.
    x[1, 0, 5] = 0.0
    assert float(own_field(x)[1, 0, 5].sum()) == 0.0


def test_tissue_fill_keeps_the_field_and_fills_the_rest_like_it():
    torch.manual_seed(4)
    frames = _narrow_field_frames(8)
    x = frames.float().unsqueeze(1) / 255.0
    field = own_field(x)
    out = tissue_fill(x, field)
    assert torch.equal(out * field, x * field)  # the field itself is untouched
    outside = out[field == 0]
    inside = x[field == 1]
    assert float((outside <= 1e-6).float().mean()) < 0.05  # nothing left black where the old field ended
    assert abs(float(outside.mean()) - float(inside.mean())) < 0.05
    assert 0.5 < float(outside.std()) / float(inside.std()) < 2.0


def test_field_fill_removes_the_frames_own_field_from_the_view():
    """With the fill, a view's black pixels are those of its random field alone; without it, the frame's own
    black sides show through the random field in every view."""
    frames = _narrow_field_frames(64)
    plain = dataclasses.replace(
        STRONG, scale=(1.0, 1.0), max_rotation_deg=0.0, flip_p=0.0, cutout_p=0.0, speckle_p=0.0, blur_p=0.0
    )
    own_black = torch.ones(32, 32, dtype=torch.bool)
    own_black[:, 32 // 3 : 2 * 32 // 3] = False
    for fill, expect_black in ((False, True), (True, False)):
        torch.manual_seed(5)
        cfg = dataclasses.replace(plain, field_p=1.0, field_fill=fill)
        views = augment(frames, cfg, mean=0.0, std=1.0)[:, 0]
        black_in_own_sides = (views[:, own_black] <= 1e-6).float().mean()
        if expect_black:  # (all but the edge pixels that resampling blends with the field)
            assert float(black_in_own_sides) > 0.9
        else:
            # Only where the random field ends: far less than all of the frame's own black sides.
            assert float(black_in_own_sides) < 0.6


def test_shading_is_a_smooth_gain_field_around_one():
    from training.data.augment import shading

    torch.manual_seed(6)
    g = shading(64, 32, std=0.3, device=torch.device("cpu"))
    assert g.shape == (64, 1, 32, 32) and bool((g > 0).all())
    assert abs(float(g.log().mean())) < 0.1  # centred on a gain of 1
    # Smooth: neighbouring pixels differ far less than the field varies over the frame.
    step = (g[..., 1:] - g[..., :-1]).abs().mean()
    spread = (g - g.mean(dim=(2, 3), keepdim=True)).abs().mean()
    assert float(step) < 0.2 * float(spread)
    # Views without shading keep their pixels: with shading_p 0, augment is unchanged by the field.
    frames = torch.full((8, 32, 32), 128, dtype=torch.uint8)
    flat = dataclasses.replace(
        STRONG, field_p=0.0, speckle_p=0.0, blur_p=0.0, cutout_p=0.0, gain=(1.0, 1.0), gamma=(1.0, 1.0)
    )
    shaded = dataclasses.replace(flat, shading_p=1.0)
    torch.manual_seed(7)
    a = augment(frames, flat, mean=0.0, std=1.0)
    torch.manual_seed(7)
    b = augment(frames, shaded, mean=0.0, std=1.0)
    inside = (a - 128 / 255).abs() < 1e-4  # away from the black the crop/rotation brings in
    assert float(inside.float().mean()) > 0.5
    assert float((b[inside] - a[inside]).abs().mean()) > 0.02
