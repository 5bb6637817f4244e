"""decode under hostile bytes: mutated PNG/JPEG/BMP/TIFF/DICOM give a frame or a FuscError, nothing else.

Two kinds of mutation: byte-level (flip, set, cut, insert, delete; biased towards the headers) on valid files
of every family, and field-level on DICOM (a data set re-written with hostile values in the elements that
steer decoding: geometry, bit depths, photometric, LUT descriptors, windows, ultrasound regions, SOP class).
The DICOM seeds cover every transfer syntax and photometric the decoder reads.

The fast test runs 200 mixed examples (a few seconds); ``-m slow`` runs 1,200 per family and checks the count.
"""

from __future__ import annotations

import collections
import io
import random
import struct
import zlib

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.uid import (
    JPEG2000,
    ComprehensiveSRStorage,
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    UltrasoundImageStorage,
)

from service.decode import decode_dicom_frames, decode_image
from service.errors import FuscError
from tests.service.test_decode import _compressed, _dataset, _palette, _region, _save

SLOW_EXAMPLES = 1200  # per family; the slow test checks that at least 1,000 of them ran


def _frame() -> np.ndarray:
    """64x48: a ramp, a bright block and speckle-like noise, so that the codecs have real entropy to code."""
    g = np.tile(np.arange(64, dtype=np.uint8) * 3, (48, 1))
    g[10:30, 20:40] = 230
    return g + np.random.default_rng(0).integers(0, 24, g.shape, dtype=np.uint8)


def _dicom_seeds() -> list[bytes]:
    g = _frame()
    rgb = cv2.merge([g, 255 - g, g // 2])
    idx = np.arange(256, dtype=np.uint16)
    lut = np.stack([idx, 255 - idx, idx // 2], axis=1) * 257
    stack = np.stack([g, 255 - g, g // 2])
    seeds = [
        _save(_dataset(g, frames=1, NumberOfFrames=1)),
        _save(_dataset(stack, frames=3)),
        _save(_dataset(rgb, "RGB")),
        _save(_dataset(rgb, "YBR_FULL")),
        _save(_dataset(g.astype(np.uint16) * 16, BitsStored=12, WindowCenter=2048, WindowWidth=4096)),
        _save(_dataset(g, sop=UltrasoundImageStorage, SequenceOfUltrasoundRegions=[_region(4, 4, 59, 43)])),
        _palette(g, lut),
        _save(_dataset(g), DeflatedExplicitVRLittleEndian),
    ]
    ybr422 = _dataset(rgb, "YBR_FULL_422")
    ybr422.PixelData = np.stack([g[:, 0::2], g[:, 1::2], g[:, 0::2], g[:, 1::2]], axis=-1).tobytes()
    seeds.append(_save(ybr422))
    for syntax in (RLELossless, JPEGBaseline8Bit, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless):
        seeds.append(_compressed(syntax, "MONOCHROME2", g))
    for syntax in (RLELossless, JPEGBaseline8Bit, JPEGLSLossless, JPEG2000Lossless, JPEG2000):
        seeds.append(_compressed(syntax, "RGB", rgb))
    seeds.append(_compressed(JPEG2000Lossless, "MONOCHROME1", g))
    return seeds


def _raster_seeds() -> dict[str, list[bytes]]:
    g = _frame()
    c = cv2.merge([g, 255 - g, g // 2])
    return {
        "png": [
            cv2.imencode(".png", g)[1].tobytes(),
            cv2.imencode(".png", c)[1].tobytes(),
            cv2.imencode(".png", g.astype(np.uint16) * 257)[1].tobytes(),
        ],
        "jpeg": [
            cv2.imencode(".jpg", g)[1].tobytes(),
            cv2.imencode(".jpg", c)[1].tobytes(),
            cv2.imencode(".jpg", c, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes(),
        ],
        "bmp-tiff": [cv2.imencode(".bmp", g)[1].tobytes(), cv2.imencode(".tiff", c)[1].tobytes()],
    }


FAMILIES = {**_raster_seeds(), "dicom": _dicom_seeds()}
ALL_SEEDS = [seed for seeds in FAMILIES.values() for seed in seeds]


def _repair_png_crcs(data: bytearray) -> None:
    """Recompute every whole chunk's CRC, so that a mutation reaches libpng instead of the CRC check."""
    pos = 8
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        if pos + 12 + length > len(data):
            return
        struct.pack_into(">I", data, pos + 8 + length, zlib.crc32(data[pos + 4 : pos + 8 + length]))
        pos += 12 + length


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    where = random.Random(draw(st.integers(0, 2**32 - 1)))  # uniform positions; hypothesis's favour 0
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "header", "header"]))
        if not data:
            break
        i = where.randrange(len(data))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[i] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, draw(st.integers(0, 255))]))
        elif op == "truncate":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 16))]
        else:  # the first kilobyte holds the headers (DICOM: file meta, image module), where parsers branch
            j = where.randrange(min(len(data), 1024))
            data[j] = draw(st.sampled_from([0x00, 0xFF, draw(st.integers(0, 255))]))
    if data.startswith(b"\x89PNG") and draw(st.booleans()):
        _repair_png_crcs(data)
    return bytes(data)


_DS = st.sampled_from(["0", "1", "-1", "0.5", "1e308", "-1e308", "4095", "1e-300"])
_FIELDS = {
    "Rows": st.integers(0, 65535),
    "Columns": st.integers(0, 65535),
    "NumberOfFrames": st.sampled_from(["0", "1", "2", "3", "7", "1000000000", "-1"]),
    "BitsAllocated": st.sampled_from([0, 1, 7, 8, 12, 16, 32, 64]),
    "BitsStored": st.integers(0, 70),
    "HighBit": st.integers(0, 70),
    "SamplesPerPixel": st.integers(0, 5),
    "PixelRepresentation": st.integers(0, 2),
    "PlanarConfiguration": st.integers(0, 2),
    "PhotometricInterpretation": st.sampled_from(
        [
            "MONOCHROME1",
            "MONOCHROME2",
            "RGB",
            "YBR_FULL",
            "YBR_FULL_422",
            "YBR_PARTIAL_420",
            "YBR_ICT",
            "YBR_RCT",
            "PALETTE COLOR",
            "HSV",
            "",
        ]
    ),
    "WindowCenter": _DS,
    "WindowWidth": _DS,
    "RescaleSlope": _DS,
    "RescaleIntercept": _DS,
    "RedPaletteColorLookupTableDescriptor": st.lists(st.integers(0, 65535), min_size=3, max_size=3),
    "GreenPaletteColorLookupTableData": st.binary(max_size=64),
    "SOPClassUID": st.sampled_from([ComprehensiveSRStorage, "1.2.840.10008.5.1.4.1.1.104.1", "1.2.3", ""]),
}


@st.composite
def dicom_fields(draw) -> bytes:
    """A DICOM seed re-written with one to four hostile element values."""
    seed = draw(st.sampled_from(FAMILIES["dicom"]))
    ds = dcmread(io.BytesIO(seed))
    for name in draw(st.lists(st.sampled_from([*_FIELDS, "regions"]), min_size=1, max_size=4, unique=True)):
        if name == "regions":
            coords = st.integers(0, 2**32 - 1) | st.integers(0, 100)
            ds.SequenceOfUltrasoundRegions = [
                _region(*(draw(coords) for _ in range(4)), spatial_format=draw(st.integers(0, 6)))
                for _ in range(draw(st.integers(0, 3)))
            ]
        else:
            setattr(ds, name, draw(_FIELDS[name]))
    try:
        return _save(ds)
    except Exception:  # pydicom refuses to write this combination: fuzz the seed as it was
        return seed


def _outcome(data: bytes) -> str:
    """Decode once (and all frames, for DICOM); the outcome is 'ok' or the error code. Anything else fails."""
    try:
        out = decode_image(data, max_pixels=4_000_000)
        assert out.dtype == np.uint8 and out.ndim == 2 and out.flags.c_contiguous
        assert min(out.shape) >= 32
        if data[128:132] == b"DICM":
            frames = decode_dicom_frames(data, max_pixels=4_000_000)
            assert frames.dtype == np.uint8 and frames.ndim == 3
    except FuscError as exc:
        assert exc.code and 400 <= exc.http_status < 500
        return exc.code
    return "ok"


def _any_input() -> st.SearchStrategy[bytes]:
    return mutated(ALL_SEEDS) | dicom_fields()


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(_any_input())
def test_mutated_images_fast(data):
    _outcome(data)


@settings(max_examples=100, deadline=None, database=None)
@given(st.binary(max_size=2048))
def test_random_bytes(data):
    _outcome(data)


@pytest.mark.slow
@pytest.mark.parametrize("family", [*FAMILIES, "dicom-fields"])
def test_mutated_images_slow(family):
    outcomes: collections.Counter[str] = collections.Counter()
    strategy = dicom_fields() if family == "dicom-fields" else mutated(FAMILIES[family])

    @settings(
        max_examples=SLOW_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(strategy)
    def run(data):
        outcomes[_outcome(data)] += 1

    run()
    print(f"\n{family}: {sum(outcomes.values())} inputs, {dict(outcomes.most_common())}")
    assert sum(outcomes.values()) >= 1000
