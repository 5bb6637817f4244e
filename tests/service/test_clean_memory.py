"""clean's colour mask goes through a large frame in stripes of rows, with the whole frame's result."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from service import clean
from service.clean import CleanConfig, colour_mask


@pytest.mark.parametrize(("min_area", "dilate"), [(3, 2), (1, 0), (6, 1), (3, 0)])
def test_stripes_give_the_whole_frames_mask(
    min_area: int, dilate: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(min_area * 10 + dilate)
    chroma = np.zeros((97, 83), np.uint8)
    chroma[rng.random(chroma.shape) < 0.08] = 200  # specks, pairs and small clusters across every seam
    chroma[40:43, 10:60] = 90  # a line crossing stripes
    cfg = CleanConfig(colour_min_area=min_area, colour_dilate_px=dilate)
    whole = colour_mask(chroma, cfg)
    monkeypatch.setattr(clean, "_COLOUR_STRIPE_ROWS", 7)
    assert np.array_equal(colour_mask(chroma, cfg), whole)


def test_a_large_colour_frame_needs_no_full_size_labels() -> None:
    chroma = np.zeros((3000, 3000), np.uint8)  # 9 MB; int32 labels of the whole frame alone are 36 MB
    chroma[::7, ::5] = 255
    tracemalloc.start()
    try:
        mask = colour_mask(chroma)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert mask.shape == chroma.shape
    assert peak < 40e6, peak  # the whole frame at once: 72 MB
