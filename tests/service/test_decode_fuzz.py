"""decode under hostile bytes: mutated PNG/JPEG/BMP/TIFF/DICOM give a frame or a FuscError, nothing else.

The fast test runs 200 examples; the one marked ``slow`` runs 3000.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from service.decode import decode_image
from service.errors import FuscError


def _frame() -> np.ndarray:
    g = np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1))
    g[10:30, 20:40] = 255
    return g


def _dicom_seed(frames: int = 1) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.SamplesPerPixel = 1
    ds.Rows, ds.Columns = 48, 64
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = frames
    ds.PixelData = np.stack([_frame()] * frames).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _seeds() -> list[bytes]:
    g = _frame()
    c = cv2.merge([g, 255 - g, g // 2])
    return [
        cv2.imencode(".png", g)[1].tobytes(),
        cv2.imencode(".png", c)[1].tobytes(),
        cv2.imencode(".png", g.astype(np.uint16) * 257)[1].tobytes(),
        cv2.imencode(".jpg", g)[1].tobytes(),
        cv2.imencode(".jpg", c, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes(),
        cv2.imencode(".bmp", g)[1].tobytes(),
        cv2.imencode(".tiff", c)[1].tobytes(),
        _dicom_seed(),
        _dicom_seed(frames=3),
    ]


SEEDS = _seeds()


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "header"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
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
        else:  # the first 400 bytes hold the headers, where the interesting parser paths are
            j = draw(st.integers(0, min(len(data), 400) - 1))
            data[j] = draw(st.integers(0, 255))
    return bytes(data)


def _decode_or_fusc_error(data: bytes) -> None:
    try:
        out = decode_image(data, max_pixels=4_000_000)
    except FuscError as exc:
        assert exc.code and 400 <= exc.http_status < 500
        return
    assert out.dtype == np.uint8 and out.ndim == 2 and out.flags.c_contiguous
    assert min(out.shape) >= 32


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_images_fast(data):
    _decode_or_fusc_error(data)


@pytest.mark.slow
@settings(max_examples=3000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_images_slow(data):
    _decode_or_fusc_error(data)


@settings(max_examples=100, deadline=None, database=None)
@given(st.binary(max_size=2048))
def test_random_bytes(data):
    _decode_or_fusc_error(data)
