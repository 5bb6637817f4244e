"""decode never widens a whole frame to float64: the gray mappings run block by block, with the same result
as one float64 pass (checked against that reference here, with blocks small enough to have many seams)."""

from __future__ import annotations

import tracemalloc

import cv2
import numpy as np
import pytest

from service import decode


class Dataset(dict):
    """Just enough of a pydicom Dataset for the gray mapping: ``get`` of a few attributes."""


def reference(arr: np.ndarray, meta: dict, photometric: str = "MONOCHROME2") -> np.ndarray:
    """The mapping written as one float64 pass over the frame (the rule of the module docstring)."""
    slope, intercept = float(meta.get("RescaleSlope", 1)), float(meta.get("RescaleIntercept", 0))
    x = arr.astype(np.float64) * slope + intercept
    if "WindowCenter" in meta:
        c, w = float(meta["WindowCenter"]), float(meta["WindowWidth"])
        out = np.rint(np.clip(((x - (c - 0.5)) / (w - 1) + 0.5) * 255.0, 0, 255)).astype(np.uint8)
    elif int(meta.get("BitsStored", 16)) <= 8 and slope == 1 and intercept == 0 and x.min() >= 0:
        out = np.clip(x, 0, 255).astype(np.uint8)
    else:
        x = np.where(np.isfinite(x), x, 0.0)
        lo, hi = x.min(), x.max()
        out = (
            np.zeros(x.shape, np.uint8)
            if hi <= lo
            else np.rint((x - lo) * (255.0 / (hi - lo))).astype(np.uint8)
        )
    return 255 - out if photometric == "MONOCHROME1" else out


@pytest.mark.parametrize(
    "meta",
    [
        {},
        {"RescaleSlope": 2.5, "RescaleIntercept": -1024},
        {"WindowCenter": 40, "WindowWidth": 400, "RescaleIntercept": -1024},
        {"BitsStored": 8},
    ],
)
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_blockwise_mapping_equals_one_float64_pass(
    meta: dict, photometric: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(decode, "_BLOCK_VALUES", 500)
    rng = np.random.default_rng(3)
    for arr in (
        rng.integers(-2000, 3000, size=(61, 47)).astype(np.int16),
        rng.integers(0, 256, size=(61, 47)).astype(np.uint16),
    ):
        got = decode._dicom_frame_to_gray8(Dataset(meta), arr, photometric)
        assert np.array_equal(got, reference(arr, meta, photometric))


def test_16_bit_to_8_bit_is_round_v_over_257_for_every_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode, "_BLOCK_VALUES", 1000)
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    expected = np.floor(values / 257.0 + 0.5).astype(np.uint8)
    assert np.array_equal(decode._to_gray8(values, rgb=False), expected)


def peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_16_bit_dicom_frame_is_mapped_without_float64_copies() -> None:
    arr = np.random.default_rng(0).integers(0, 4096, size=(2000, 2000)).astype(np.uint16)  # 8 MB
    for meta in (
        {"RescaleSlope": 1.5, "RescaleIntercept": -100},
        {"WindowCenter": 2000, "WindowWidth": 1000},
    ):
        peak = peak_bytes(lambda m=meta: decode._dicom_frame_to_gray8(Dataset(m), arr, "MONOCHROME1"))
        # The uint8 output and its inversion (4 MB each) plus a few MB of blocks; one float64 copy is 32 MB.
        assert peak < 16e6, peak


def test_a_16_bit_png_decodes_without_wide_copies() -> None:
    frame = np.random.default_rng(1).integers(0, 65536, size=(1500, 2000)).astype(np.uint16)  # 6 MB
    ok, buf = cv2.imencode(".png", frame)
    assert ok
    data = buf.tobytes()
    out = decode.decode_image(data)
    assert np.array_equal(out, np.floor(frame / 257.0 + 0.5).astype(np.uint8))
    # The decoded uint16 frame (6 MB), the uint8 result (3 MB) and a block or two; one uint32 copy of the
    # frame, as the mapping used to make, is 12 MB more.
    assert peak_bytes(lambda: decode.decode_image(data)) < 13e6
