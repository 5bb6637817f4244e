"""decode: every supported container gives the exact expected gray pixels; every bad input a stable error."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from service.decode import decode_dicom_frames, decode_image, sniff_format
from service.errors import (
    DecodeError,
    DicomNoPixelsError,
    EmptyInputError,
    FuscError,
    ImageTooLargeError,
    ImageTooSmallError,
    UnsupportedFormatError,
)

HC18 = Path(__file__).resolve().parents[3] / "shared" / "data" / "hc18" / "images"


def _gray(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def _bgr(h: int = 48, w: int = 64, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _encode(ext: str, img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(ext, img)
    assert ok
    return buf.tobytes()


def _luma(bgr: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)


def _check(out: np.ndarray, shape: tuple[int, int]) -> None:
    assert out.dtype == np.uint8 and out.shape == shape and out.flags.c_contiguous


# ------------------------------------------------------------------------------------------ rasters
@pytest.mark.parametrize("ext", [".png", ".bmp", ".tiff"])
def test_lossless_gray_roundtrip(ext):
    g = _gray()
    out = decode_image(_encode(ext, g))
    _check(out, g.shape)
    np.testing.assert_array_equal(out, g)


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tiff"])
def test_lossless_colour_is_bt601_luma(ext):
    c = _bgr()
    np.testing.assert_array_equal(decode_image(_encode(ext, c)), _luma(c))


def test_png_rgba_ignores_alpha():
    c = _bgr()
    alpha = np.zeros(c.shape[:2], np.uint8)  # fully transparent: still the colour underneath
    rgba = np.dstack([c, alpha])
    np.testing.assert_array_equal(decode_image(_encode(".png", rgba)), _luma(c))


def test_png_16bit_gray_maps_full_range():
    g16 = np.array([[0, 257, 65535, 32768, 128, 129]], np.uint16).repeat(40, 0).repeat(8, 1)
    out = decode_image(_encode(".png", g16))
    np.testing.assert_array_equal(out[0, ::8], [0, 1, 255, 128, 0, 1])


def test_png_16bit_rgb():
    c16 = _bgr().astype(np.uint16) * 257  # exact multiples: 8-bit values come back unchanged
    np.testing.assert_array_equal(decode_image(_encode(".png", c16)), _luma(_bgr()))


def test_png_palette():
    rgb = np.zeros((40, 40, 3), np.uint8)
    rgb[:, 20:] = (255, 0, 0)
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("P").save(buf, "PNG")
    out = decode_image(buf.getvalue())
    assert out[0, 0] == 0 and out[0, 39] == 76  # 0.299 * 255


def test_jpeg_close_to_source():
    g = np.full((64, 64), 100, np.uint8)
    g[16:48, 16:48] = 200
    out = decode_image(_encode(".jpg", g))
    _check(out, g.shape)
    assert np.abs(out.astype(int) - g).mean() < 3


def test_format_from_magic_not_name():
    assert sniff_format(_encode(".png", _gray())) == "png"
    assert sniff_format(_encode(".jpg", _gray())) == "jpeg"
    assert sniff_format(_encode(".bmp", _gray())) == "bmp"
    assert sniff_format(_encode(".tiff", _gray())) == "tiff"
    assert sniff_format(b"hello world, this is text") is None


# ------------------------------------------------------------------------------------------ bad input
def test_zero_bytes():
    with pytest.raises(EmptyInputError) as e:
        decode_image(b"")
    assert e.value.code == "empty_input" and e.value.http_status == 400


def test_text_file():
    with pytest.raises(UnsupportedFormatError) as e:
        decode_image(b"patient notes: nothing to see here\n" * 10)
    assert e.value.code == "unsupported_format" and e.value.http_status == 415


@pytest.mark.parametrize("cut", [-12, -1, 0.5, 40, 12])
def test_truncated_png_is_an_error_not_half_an_image(cut):
    png = _encode(".png", _gray(200, 200))
    n = int(len(png) * cut) if isinstance(cut, float) else (len(png) + cut if cut < 0 else cut)
    with pytest.raises(DecodeError) as e:
        decode_image(png[:n])
    assert type(e.value) is DecodeError and e.value.code == "truncated_image" and e.value.http_status == 400


def test_png_bad_crc():
    png = bytearray(_encode(".png", _gray()))
    idat = png.index(b"IDAT")
    png[idat + 10] ^= 0xFF
    with pytest.raises(DecodeError) as e:
        decode_image(bytes(png))
    assert type(e.value) is DecodeError and e.value.code == "corrupt_image"


def test_truncated_jpeg():
    jpg = _encode(".jpg", _gray(200, 200))
    with pytest.raises(DecodeError) as e:
        decode_image(jpg[: len(jpg) // 2])
    assert e.value.code == "truncated_image"


def test_garbage_after_magic():
    with pytest.raises(DecodeError) as e:
        decode_image(b"\xff\xd8\xff" + bytes(range(256)) * 4)
    assert e.value.code == "corrupt_image"


def _png_chunk(ctype: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload))


def _png_claiming(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def test_decompression_bomb_png_rejected_from_header():
    with pytest.raises(ImageTooLargeError) as e:
        decode_image(_png_claiming(100_000, 100_000))
    assert e.value.code == "image_too_large" and e.value.http_status == 413


def test_max_pixels_and_max_bytes_are_honoured():
    png = _encode(".png", _gray(100, 100))
    with pytest.raises(ImageTooLargeError):
        decode_image(png, max_pixels=9_999)
    with pytest.raises(ImageTooLargeError):
        decode_image(png, max_bytes=len(png) - 1)
    assert decode_image(png, max_pixels=10_000).shape == (100, 100)


@pytest.mark.parametrize("shape", [(31, 64), (64, 31), (8, 8)])
def test_tiny_image(shape):
    with pytest.raises(ImageTooSmallError) as e:
        decode_image(_encode(".png", np.zeros(shape, np.uint8)))
    assert e.value.code == "image_too_small" and e.value.http_status == 422


def test_bomb_in_jpeg_header():
    jpg = bytearray(_encode(".jpg", _gray(64, 64)))
    sof = jpg.index(b"\xff\xc0")
    jpg[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)
    with pytest.raises(ImageTooLargeError):
        decode_image(bytes(jpg))


# ------------------------------------------------------------------------------------------ DICOM
def _dicom(
    pixels: np.ndarray | None,
    photometric: str = "MONOCHROME2",
    *,
    frames: int = 1,
    preamble: bool = True,
    implicit: bool = False,
    **extra,
) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    if pixels is not None:
        ds.PhotometricInterpretation = photometric
        color = photometric in ("RGB", "YBR_FULL")
        ds.SamplesPerPixel = 3 if color else 1
        if color:
            ds.PlanarConfiguration = 0
        shape = pixels.shape[1:] if frames > 1 else pixels.shape
        ds.Rows, ds.Columns = shape[0], shape[1]
        bits = pixels.dtype.itemsize * 8
        ds.BitsAllocated = bits
        ds.BitsStored = extra.pop("BitsStored", bits)
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 0
        if frames > 1:
            ds.NumberOfFrames = frames
        ds.PixelData = pixels.tobytes()
    for k, v in extra.items():
        setattr(ds, k, v)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True, implicit_vr=implicit, little_endian=True)
    data = buf.getvalue()
    if not preamble:
        data = data[132:]  # drop the preamble and 'DICM': the bare data set, as some PACS exports write
    return data


def test_dicom_monochrome2_8bit_exact():
    g = _gray()
    out = decode_image(_dicom(g))
    _check(out, g.shape)
    np.testing.assert_array_equal(out, g)


def test_dicom_without_preamble():
    g = _gray()
    np.testing.assert_array_equal(decode_image(_dicom(g, preamble=False)), g)
    np.testing.assert_array_equal(decode_image(_dicom(g, preamble=False, implicit=True)), g)


def test_dicom_monochrome1_is_inverted():
    g = _gray()
    np.testing.assert_array_equal(decode_image(_dicom(g, "MONOCHROME1")), 255 - g)


def test_dicom_rgb_is_luma():
    c = _bgr()
    rgb = np.ascontiguousarray(c[:, :, ::-1])
    np.testing.assert_array_equal(decode_image(_dicom(rgb, "RGB")), _luma(c))


def test_dicom_ybr_full_is_its_y_channel():
    c = _bgr()
    ycrcb = cv2.cvtColor(c, cv2.COLOR_BGR2YCrCb)
    ybr = np.ascontiguousarray(ycrcb[:, :, [0, 2, 1]])  # DICOM order is Y, Cb, Cr
    out = decode_image(_dicom(ybr, "YBR_FULL"))
    assert np.abs(out.astype(int) - ycrcb[:, :, 0]).max() <= 1  # one rounding step through RGB


def test_dicom_multiframe_middle_by_default_and_all_on_request():
    stack = np.stack([np.full((40, 40), 10 * (i + 1), np.uint8) for i in range(5)])
    data = _dicom(stack, frames=5)
    assert decode_image(data)[0, 0] == 30
    assert decode_image(data, frame=0)[0, 0] == 10
    frames = decode_dicom_frames(data)
    assert frames.shape == (5, 40, 40) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames[:, 0, 0], [10, 20, 30, 40, 50])
    np.testing.assert_array_equal(decode_dicom_frames(data, [4, 1])[:, 0, 0], [50, 20])
    with pytest.raises(DecodeError) as e:
        decode_image(data, frame=5)
    assert e.value.code == "bad_frame_index"
    with pytest.raises(ImageTooLargeError):
        decode_dicom_frames(data, max_pixels=40 * 40 * 4)


def test_dicom_16bit_window():
    x = np.array([[0, 100, 200, 300, 400]], np.uint16).repeat(40, 0).repeat(8, 1)
    out = decode_image(_dicom(x, BitsStored=12, WindowCenter=200, WindowWidth=201))
    # Linear VOI (PS3.3 C.11.2.1.2.1): c - 0.5 - (w-1)/2 = 99.5 -> 0, 299.5 -> 255.
    np.testing.assert_array_equal(out[0, ::8], [0, 1, 128, 255, 255])


def test_dicom_16bit_rescale_without_window_is_stretched():
    x = np.array([[1000, 1500, 2000]], np.uint16).repeat(40, 0).repeat(12, 1)
    out = decode_image(_dicom(x, BitsStored=12, RescaleSlope=2, RescaleIntercept=-1024))
    np.testing.assert_array_equal(out[0, ::12], [0, 128, 255])


def test_dicom_without_pixel_data():
    with pytest.raises(DicomNoPixelsError) as e:
        decode_image(_dicom(None))
    assert e.value.code == "dicom_no_pixel_data" and e.value.http_status == 422


def test_dicom_huge_header_rejected_before_pixels():
    data = _dicom(_gray(), Rows=60000, Columns=60000)  # header lies; the pixel data is 48x64
    with pytest.raises(ImageTooLargeError):
        decode_image(data)


def test_dicom_short_pixel_data():
    data = _dicom(_gray(), Rows=96)  # twice the rows the pixel data holds
    with pytest.raises(DecodeError) as e:
        decode_image(data)
    assert type(e.value) is DecodeError


def test_dicom_truncated_file():
    data = _dicom(_gray(200, 200))
    with pytest.raises(DecodeError) as e:
        decode_image(data[: len(data) // 2])
    assert type(e.value) is DecodeError


def test_only_fusc_errors_escape_on_random_prefixes():
    rng = np.random.default_rng(7)
    seeds = [_encode(".png", _gray()), _encode(".jpg", _gray()), _dicom(_gray()), _encode(".tiff", _gray())]
    for data in seeds:
        for _ in range(25):
            b = bytearray(data)
            for i in rng.integers(0, len(b), 8):
                b[i] = rng.integers(0, 256)
            try:
                decode_image(bytes(b))
            except FuscError:
                pass


@pytest.mark.skipif(
    not HC18.is_dir(), reason="real HC18 images live in ../shared/data (absent in a fresh clone)"
)
def test_real_hc18_png():
    path = sorted(HC18.glob("*.png"))[0]
    out = decode_image(path.read_bytes())
    np.testing.assert_array_equal(out, cv2.imread(str(path), cv2.IMREAD_GRAYSCALE))


# ------------------------------------------------------------------------------------ compressed DICOM
def _reencode(data: bytes, transfer_syntax, fragment: bytes) -> bytes:
    ds = dcmread(io.BytesIO(data))
    ds.PixelData = encapsulate([fragment])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def _blocks() -> np.ndarray:
    g = np.full((64, 64), 100, np.uint8)
    g[16:48, 16:48] = 200
    return g


def test_dicom_rle_lossless_exact():
    ds = dcmread(io.BytesIO(_dicom(_gray())))
    ds.compress(RLELossless)
    buf = io.BytesIO()
    ds.save_as(buf)
    np.testing.assert_array_equal(decode_image(buf.getvalue()), _gray())


def test_dicom_jpeg_baseline():
    g = _blocks()
    data = _reencode(_dicom(g), JPEGBaseline8Bit, _encode(".jpg", g))
    assert np.abs(decode_image(data).astype(int) - g).mean() < 2


def test_dicom_jpeg2000_lossless_exact():
    g = _blocks()
    buf = io.BytesIO()
    try:
        Image.fromarray(g).save(buf, "JPEG2000", irreversible=False)
    except (OSError, KeyError):
        pytest.skip("this Pillow build has no JPEG 2000 codec")
    np.testing.assert_array_equal(decode_image(_reencode(_dicom(g), JPEG2000Lossless, buf.getvalue())), g)


def test_dicom_unknown_transfer_syntax_is_unsupported():
    data = _reencode(_dicom(_blocks()), UID("1.2.826.0.1.3680043.9.9999.1"), b"\x00" * 16)
    with pytest.raises(UnsupportedFormatError) as e:
        decode_image(data)
    assert e.value.code == "unsupported_format" and e.value.http_status == 415


def test_dicom_jpeg_ls_without_plugin_is_unsupported():
    from pydicom.pixels import get_decoder

    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    data = _reencode(_dicom(_blocks()), JPEGLSLossless, b"\xff\xd8\xff\xf7" + b"\x00" * 32)
    with pytest.raises(UnsupportedFormatError):
        decode_image(data)
