"""The augmented views: shapes and ranges, the random imaged field, and the typed config that carries them."""

import dataclasses
import math

import pytest

torch = pytest.importorskip("torch")

from training.augment import STRONG, WEAK, AugmentConfig, augment, field_masks  # noqa: E402
from training.config import build_config  # noqa: E402


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
