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
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    JPEG2000,
    UID,
    ComprehensiveSRStorage,
    DeflatedExplicitVRLittleEndian,
    EncapsulatedPDFStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
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
PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-0042-SECRET"


def _dataset(
    pixels: np.ndarray | None,
    photometric: str = "MONOCHROME2",
    *,
    frames: int = 1,
    sop: str = SecondaryCaptureImageStorage,
    **extra,
) -> Dataset:
    """A minimal data set around ``pixels``: (H, W) or (H, W, 3), with a leading frame axis if frames > 1.

    It carries a patient name and ID so that the tests can check that no error message repeats them.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    if pixels is not None:
        ds.PhotometricInterpretation = photometric
        shape = pixels.shape[1:] if frames > 1 else pixels.shape
        ds.SamplesPerPixel = 3 if len(shape) == 3 else 1
        if ds.SamplesPerPixel == 3:
            ds.PlanarConfiguration = 0
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
    return ds


def _save(ds: Dataset, syntax: str | None = None) -> bytes:
    """Part 10 bytes; ``syntax`` re-labels an uncompressed data set (implicit, big endian, deflated)."""
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _dicom(
    pixels: np.ndarray | None,
    photometric: str = "MONOCHROME2",
    *,
    frames: int = 1,
    preamble: bool = True,
    implicit: bool = False,
    **extra,
) -> bytes:
    ds = _dataset(pixels, photometric, frames=frames, **extra)
    data = _save(ds, ImplicitVRLittleEndian if implicit else None)
    if not preamble:
        data = data[132:]  # drop the preamble and 'DICM': the file meta and data set, as some exports write
    return data


def _no_identifiers(exc: FuscError) -> None:
    text = f"{exc} {exc.message} {exc.to_dict()}"
    assert PATIENT_NAME not in text and "Doe" not in text and PATIENT_ID not in text


def test_dicom_monochrome2_8bit_exact():
    g = _gray()
    out = decode_image(_dicom(g))
    _check(out, g.shape)
    np.testing.assert_array_equal(out, g)


def test_dicom_without_preamble():
    g = _gray()
    np.testing.assert_array_equal(decode_image(_dicom(g, preamble=False)), g)
    np.testing.assert_array_equal(decode_image(_dicom(g, preamble=False, implicit=True)), g)


def test_dicom_bare_data_set_without_file_meta():
    g = _gray()
    ds = _dataset(g)
    buf = io.BytesIO()
    ds.file_meta = FileMetaDataset()
    ds.save_as(buf, implicit_vr=True, little_endian=True)  # no preamble, no group 0002: starts at (0008,xxxx)
    assert buf.getvalue()[:2] == b"\x08\x00"
    np.testing.assert_array_equal(decode_image(buf.getvalue()), g)


def test_dicom_monochrome1_is_inverted():
    g = _gray()
    np.testing.assert_array_equal(decode_image(_dicom(g, "MONOCHROME1")), 255 - g)


def test_dicom_rgb_is_luma():
    c = _bgr()
    rgb = np.ascontiguousarray(c[:, :, ::-1])
    np.testing.assert_array_equal(decode_image(_dicom(rgb, "RGB")), _luma(c))


def test_dicom_rgb_planar_configuration_1():
    c = _bgr()
    planes = np.ascontiguousarray(c[:, :, ::-1].transpose(2, 0, 1))  # RRR..GGG..BBB..
    ds = _dataset(np.ascontiguousarray(c[:, :, ::-1]), "RGB", PlanarConfiguration=1)
    ds.PixelData = planes.tobytes()
    np.testing.assert_array_equal(decode_image(_save(ds)), _luma(c))


def _ycbcr(seed: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return tuple(rng.integers(0, 256, (48, 64), dtype=np.uint8) for _ in range(3))


def test_dicom_ybr_full_gives_exactly_its_y_channel():
    y, cb, cr = _ycbcr()
    out = decode_image(_dicom(np.dstack([y, cb, cr]), "YBR_FULL"))
    np.testing.assert_array_equal(out, y)


def test_dicom_ybr_full_422_uncompressed_layout():
    # PS3.3 C.7.6.3.1.2: each pair of pixels on a row is stored Y1 Y2 Cb Cr, the chroma shared by the pair.
    y, cb, cr = _ycbcr()
    packed = np.stack([y[:, 0::2], y[:, 1::2], cb[:, 0::2], cr[:, 0::2]], axis=-1)
    ds = _dataset(np.dstack([y, cb, cr]), "YBR_FULL_422")
    ds.PixelData = packed.tobytes()
    assert len(ds.PixelData) == 48 * 64 * 2
    np.testing.assert_array_equal(decode_image(_save(ds)), y)


def _palette(pixels: np.ndarray, lut: np.ndarray, first: int = 0) -> bytes:
    """PALETTE COLOR data set: ``lut`` is (entries, 3), 8- or 16-bit; ``first`` the first index it maps."""
    ds = _dataset(pixels, "PALETTE COLOR")
    bits = lut.dtype.itemsize * 8
    for i, name in enumerate(("Red", "Green", "Blue")):
        setattr(ds, f"{name}PaletteColorLookupTableDescriptor", [len(lut), first, bits])
        data = np.ascontiguousarray(lut[:, i]).astype("<u2" if bits == 16 else np.uint8).tobytes()
        if len(data) % 2:
            data += b"\x00"
        setattr(ds, f"{name}PaletteColorLookupTableData", data)
    return _save(ds)


def test_dicom_palette_color_16bit_lut():
    idx = np.arange(256, dtype=np.uint8)
    lut8 = np.stack([idx, 255 - idx, (idx.astype(int) * 7 % 256).astype(np.uint8)], axis=1)
    g = _gray()
    out = decode_image(_palette(g, lut8.astype(np.uint16) * 257))  # exact 8-bit values after /257
    expected = _luma(np.ascontiguousarray(lut8[g][:, :, ::-1]))
    np.testing.assert_array_equal(out, expected)


def test_dicom_palette_color_8bit_lut_with_first_mapped_value():
    # 16 entries for indices 100..115; below the range -> the first entry, above -> the last (C.7.6.3.1.5).
    lut = np.zeros((16, 3), np.uint8)
    lut[:, 0] = np.arange(16) * 16  # red ramp
    lut[:, 1] = 200
    g = np.full((40, 48), 90, np.uint8)
    g[:, 16:32] = 105
    g[:, 32:] = 250
    out = decode_image(_palette(g, lut, first=100))
    want = {90: lut[0], 105: lut[5], 250: lut[15]}
    for col, value in ((0, 90), (20, 105), (40, 250)):
        r, gg, b = (int(v) for v in want[value])
        assert out[0, col] == _luma(np.array([[[b, gg, r]]], np.uint8))[0, 0]


def test_dicom_multiframe_middle_by_default_and_all_on_request():
    stack = np.stack([np.full((40, 40), 10 * (i + 1), np.uint8) for i in range(5)])
    data = _dicom(stack, frames=5)
    assert decode_image(data)[0, 0] == 30
    assert decode_image(data, frame=0)[0, 0] == 10
    frames = decode_dicom_frames(data)
    assert frames.shape == (5, 40, 40) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames[:, 0, 0], [10, 20, 30, 40, 50])
    np.testing.assert_array_equal(decode_dicom_frames(data, [4, 1])[:, 0, 0], [50, 20])
    for bad in (5, -1):
        with pytest.raises(DecodeError) as e:
            decode_image(data, frame=bad)
        assert e.value.code == "bad_frame_index" and e.value.http_status == 400
    with pytest.raises(DecodeError) as e:
        decode_dicom_frames(data, [0, 5])
    assert e.value.code == "bad_frame_index"
    with pytest.raises(ImageTooLargeError):
        decode_dicom_frames(data, max_pixels=40 * 40 * 4)


def test_decode_dicom_frames_refuses_other_formats():
    with pytest.raises(UnsupportedFormatError):
        decode_dicom_frames(_encode(".png", _gray()))


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
    _no_identifiers(e.value)


def _document(sop: str, **extra) -> bytes:
    return _save(_dataset(None, sop=sop, **extra))


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(lambda: _document(ComprehensiveSRStorage, ContentSequence=[]), id="structured-report"),
        pytest.param(lambda: _document("1.2.840.10008.5.1.4.1.1.88.59"), id="key-object-selection"),
        pytest.param(
            lambda: _document(
                EncapsulatedPDFStorage,
                MIMETypeOfEncapsulatedDocument="application/pdf",
                EncapsulatedDocument=b"%PDF-1.4\n%%EOF\n",
            ),
            id="encapsulated-pdf",
        ),
        pytest.param(lambda: _document(GrayscaleSoftcopyPresentationStateStorage), id="presentation-state"),
        pytest.param(
            lambda: _save(_dataset(_gray(), sop=SegmentationStorage)), id="segmentation-with-pixels"
        ),
    ],
)
def test_dicom_non_image_sop_classes(data):
    with pytest.raises(DecodeError) as e:
        decode_image(data())
    assert e.value.code == "dicom_not_an_image" and e.value.http_status == 422
    _no_identifiers(e.value)
    with pytest.raises(DecodeError) as e:
        decode_dicom_frames(data())
    assert e.value.code == "dicom_not_an_image"


def test_dicom_huge_header_rejected_before_pixels():
    data = _dicom(_gray(), Rows=60000, Columns=60000)  # header lies; the pixel data is 48x64
    with pytest.raises(ImageTooLargeError):
        decode_image(data)


def test_dicom_short_pixel_data():
    data = _dicom(_gray(), Rows=96)  # twice the rows the pixel data holds
    with pytest.raises(DecodeError) as e:
        decode_image(data)
    assert type(e.value) is DecodeError
    _no_identifiers(e.value)


def test_dicom_truncated_file():
    data = _dicom(_gray(200, 200))
    with pytest.raises(DecodeError) as e:
        decode_image(data[: len(data) // 2])
    assert type(e.value) is DecodeError
    _no_identifiers(e.value)


def test_dicom_wrong_type_is_unsupported():
    with pytest.raises(UnsupportedFormatError) as e:
        decode_image(io.BytesIO(_dicom(_gray())))  # a file object, not its bytes
    assert e.value.code == "unsupported_format"


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


# ------------------------------------------------------------------------------- ultrasound regions
def _region(x0: int, y0: int, x1: int, y1: int, spatial_format: int = 1) -> Dataset:
    item = Dataset()
    item.RegionSpatialFormat = spatial_format
    item.RegionDataType = 1 if spatial_format == 1 else 3
    item.RegionFlags = 0
    item.RegionLocationMinX0, item.RegionLocationMinY0 = x0, y0
    item.RegionLocationMaxX1, item.RegionLocationMaxY1 = x1, y1
    return item


def _screen() -> np.ndarray:
    """A 100x120 screen whose pixel (y, x) holds (x + 2y) % 256, so that any crop can be checked exactly."""
    yy, xx = np.mgrid[0:100, 0:120]
    return ((xx + 2 * yy) % 256).astype(np.uint8)


def test_regions_crop_to_the_2d_region_and_drop_the_spectral_strip():
    s = _screen()
    regions = [
        _region(10, 5, 89, 59),
        _region(0, 60, 119, 99, spatial_format=3),
    ]  # B-mode above, Doppler below
    out = decode_image(_dicom(s, SequenceOfUltrasoundRegions=regions))
    np.testing.assert_array_equal(out, s[5:60, 10:90])


def test_regions_union_of_several_2d_regions():
    s = _screen()
    regions = [_region(4, 10, 53, 69), _region(60, 20, 115, 79)]  # a dual (side-by-side) display
    np.testing.assert_array_equal(
        decode_image(_dicom(s, SequenceOfUltrasoundRegions=regions)), s[10:80, 4:116]
    )


def test_regions_clamped_to_the_frame_and_bad_ones_ignored():
    s = _screen()
    bad = Dataset()
    bad.RegionSpatialFormat = 1  # no coordinates at all
    regions = [_region(50, 40, 500, 400), _region(3, 3, 10, 10), bad]  # second: smaller than 32 px
    np.testing.assert_array_equal(decode_image(_dicom(s, SequenceOfUltrasoundRegions=regions)), s[40:, 50:])


def test_regions_none_usable_gives_the_whole_frame_and_cropping_can_be_turned_off():
    s = _screen()
    np.testing.assert_array_equal(
        decode_image(_dicom(s, SequenceOfUltrasoundRegions=[_region(0, 0, 119, 49, spatial_format=2)])), s
    )
    data = _dicom(s, SequenceOfUltrasoundRegions=[_region(10, 5, 89, 59)])
    np.testing.assert_array_equal(decode_image(data, crop_to_regions=False), s)


def test_regions_apply_to_every_frame():
    stack = np.stack([_screen(), 255 - _screen()])
    data = _dicom(stack, frames=2, SequenceOfUltrasoundRegions=[_region(10, 5, 89, 59)])
    out = decode_dicom_frames(data)
    assert out.shape == (2, 55, 80)
    np.testing.assert_array_equal(out[1], 255 - _screen()[5:60, 10:90])


def test_regions_window_and_stretch_see_only_the_region():
    x = np.zeros((64, 96), np.uint16)
    x[:, :48] = np.linspace(1000, 2000, 48, dtype=np.uint16)
    x[:, 48:] = 4000  # a bright side panel outside the region
    out = decode_image(_dicom(x, BitsStored=12, SequenceOfUltrasoundRegions=[_region(0, 0, 47, 63)]))
    assert out.shape == (64, 48) and out.min() == 0 and out.max() == 255


# ------------------------------------------------------------------------------------ compressed DICOM
def _encapsulated(ds: Dataset, syntax: str, fragments: list[bytes]) -> bytes:
    ds.PixelData = encapsulate(fragments)
    ds["PixelData"].VR = "OB"
    return _save(ds, syntax)


def _pillow(img: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, fmt, **kwargs)
    return buf.getvalue()


def _blocks() -> np.ndarray:
    """A smooth test card that lossy codecs keep close: two flat blocks and a gentle ramp."""
    g = np.full((64, 64), 100, np.uint8)
    g[16:48, 16:48] = 200
    g[:, 56:] = np.linspace(20, 240, 64, dtype=np.uint8)[:, None]
    return g


def _jpeg_lossless(img: np.ndarray, predictor: int = 1, precision: int = 8) -> bytes:
    """A JPEG lossless (ITU T.81 process 14, Annex H) codestream of a gray image, written from the standard.

    No encoder for this syntax ships with pydicom or Pillow; this one uses a single Huffman table whose 17
    difference categories all get 5-bit codes, no restart intervals and point transform 0.
    """
    h, w = img.shape
    x = img.astype(np.int64)
    ra = np.zeros_like(x)
    rb = np.zeros_like(x)
    rc = np.zeros_like(x)
    ra[:, 1:], rb[1:, :], rc[1:, 1:] = x[:, :-1], x[:-1, :], x[:-1, :-1]
    pred = {
        1: ra,
        2: rb,
        3: rc,
        4: ra + rb - rc,
        5: ra + ((rb - rc) >> 1),
        6: rb + ((ra - rc) >> 1),
        7: (ra + rb) >> 1,
    }[predictor].copy()
    pred[0, 1:] = x[0, :-1]  # first row: the left neighbour
    pred[1:, 0] = x[:-1, 0]  # first column: the one above
    pred[0, 0] = 1 << (precision - 1)
    diff = (x - pred) % 65536
    diff = np.where(diff >= 32768, diff - 65536, diff)

    bits: list[str] = []
    for d in diff.ravel().tolist():
        size = abs(d).bit_length()
        bits.append(format(size, "05b"))
        if size and size < 16:
            bits.append(format(d if d > 0 else d + (1 << size) - 1, f"0{size}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)
    scan = bytearray()
    for i in range(0, len(stream), 8):
        byte = int(stream[i : i + 8], 2)
        scan.append(byte)
        if byte == 0xFF:
            scan.append(0x00)  # byte stuffing

    def segment(marker: int, payload: bytes) -> bytes:
        return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload

    sof = struct.pack(">BHHB", precision, h, w, 1) + bytes([1, 0x11, 0])
    dht = bytes([0x00]) + bytes([0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17))
    sos = bytes([1, 1, 0x00, predictor, 0, 0])
    return (
        b"\xff\xd8" + segment(0xC3, sof) + segment(0xC4, dht) + segment(0xDA, sos) + bytes(scan) + b"\xff\xd9"
    )


def _compressed(syntax: str, photometric: str, img: np.ndarray, **extra) -> bytes:
    """``img`` (gray HxW or RGB HxWx3) as a DICOM file in ``syntax``, encoded by the test's own means."""
    ds = _dataset(img, photometric, **extra)
    if syntax == JPEGBaseline8Bit:
        if img.ndim == 3:
            ds.PhotometricInterpretation = "YBR_FULL_422"
            return _encapsulated(ds, syntax, [_pillow(img, "JPEG", quality=95, subsampling=1)])  # 4:2:2
        return _encapsulated(ds, syntax, [_pillow(img, "JPEG", quality=95)])
    if syntax in (JPEGLosslessSV1, JPEGLossless):
        precision = int(ds.BitsStored)
        return _encapsulated(
            ds, syntax, [_jpeg_lossless(img, 1 if syntax == JPEGLosslessSV1 else 7, precision)]
        )
    if syntax in (
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
    ):
        if syntax == ExplicitVRBigEndian:  # pydicom writes OW bytes as given: hand it big-endian samples
            ds.PixelData = img.astype(img.dtype.newbyteorder(">")).tobytes()
        return _save(ds, syntax)
    options = {JPEGLSNearLossless: {"jls_error": 2}, JPEG2000: {"j2k_psnr": [42]}}.get(syntax, {})
    ds.compress(syntax, **options)  # RLE natively, JPEG-LS via pyjpegls, JPEG 2000 via pylibjpeg-openjpeg
    return _save(ds)


# (transfer syntax, how far a decoded gray value may be from the source: 0 lossless, NEAR for JPEG-LS
# near-lossless, a mean error for the lossy codecs)
MATRIX = [
    (ExplicitVRLittleEndian, "exact"),
    (ImplicitVRLittleEndian, "exact"),
    (ExplicitVRBigEndian, "exact"),
    (DeflatedExplicitVRLittleEndian, "exact"),
    (RLELossless, "exact"),
    (JPEGBaseline8Bit, "lossy"),
    (JPEGLosslessSV1, "exact"),
    (JPEGLossless, "exact"),
    (JPEGLSLossless, "exact"),
    (JPEGLSNearLossless, "near"),
    (JPEG2000Lossless, "exact"),
    (JPEG2000, "lossy"),
]


def _compare(out: np.ndarray, want: np.ndarray, kind: str) -> None:
    err = np.abs(out.astype(int) - want.astype(int))
    if kind == "exact":
        np.testing.assert_array_equal(out, want)
    elif kind == "near":
        assert err.max() <= 2  # JPEG-LS near-lossless guarantees |error| <= NEAR per sample
    else:
        assert err.mean() < 3 and np.percentile(err, 99) < 16


@pytest.mark.parametrize("syntax,kind", MATRIX, ids=[UID(s).keyword for s, _ in MATRIX])
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_matrix_gray(syntax, kind, photometric):
    g = _blocks()
    out = decode_image(_compressed(syntax, photometric, g))
    _check(out, g.shape)
    _compare(out, g if photometric == "MONOCHROME2" else 255 - g, kind)


@pytest.mark.parametrize(
    "syntax,kind",
    [m for m in MATRIX if m[0] not in (JPEGLosslessSV1, JPEGLossless)],
    ids=[UID(s).keyword for s, _ in MATRIX if s not in (JPEGLosslessSV1, JPEGLossless)],
)
def test_matrix_colour(syntax, kind):
    g = _blocks()
    rgb = np.dstack([g, np.roll(g, 8, axis=1), 255 - g])
    out = decode_image(_compressed(syntax, "RGB", rgb))
    _compare(out, _luma(np.ascontiguousarray(rgb[:, :, ::-1])), kind)


@pytest.mark.parametrize(
    "syntax",
    [
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
        RLELossless,
        JPEGLSLossless,
        JPEG2000Lossless,
        JPEGLosslessSV1,
    ],
    ids=lambda s: UID(s).keyword,
)
def test_matrix_12bit_with_window(syntax):
    x = (np.tile(np.arange(64, dtype=np.uint16) * 64, (48, 1)) + 3).astype(np.uint16)  # 3 .. 4035
    out = decode_image(
        _compressed(syntax, "MONOCHROME2", x, BitsStored=12, WindowCenter=2048, WindowWidth=4096)
    )
    want = np.rint(np.clip(((x - 2047.5) / 4095 + 0.5) * 255, 0, 255)).astype(np.uint8)
    np.testing.assert_array_equal(out, want)


def test_jpeg_baseline_ybr_full_422_is_the_codestream_luma():
    g = _blocks()
    rgb = np.dstack([g, np.roll(g, 8, axis=1), 255 - g])
    stream = _pillow(rgb, "JPEG", quality=95, subsampling=1)
    y_pillow = np.asarray(Image.open(io.BytesIO(stream)).convert("YCbCr"))[:, :, 0]
    out = decode_image(_compressed(JPEGBaseline8Bit, "RGB", rgb))
    assert np.abs(out.astype(int) - y_pillow).max() <= 1  # two IJG-style decoders may differ by one rounding


def test_jpeg_lossless_encoder_predictors_all_decode_exactly():
    g = _gray(40, 48, seed=5)
    for predictor in range(1, 8):
        data = _encapsulated(_dataset(g), JPEGLossless, [_jpeg_lossless(g, predictor)])
        np.testing.assert_array_equal(decode_image(data), g, err_msg=f"predictor {predictor}")


def test_compressed_multiframe():
    stack = np.stack([np.full((40, 40), 10 * (i + 1), np.uint8) for i in range(5)])
    stack[:, 10:30, 10:30] += 100
    ds = _dataset(stack, frames=5)
    ds.compress(JPEGLSLossless)
    data = _save(ds)
    np.testing.assert_array_equal(decode_image(data), stack[2])
    np.testing.assert_array_equal(decode_dicom_frames(data), stack)
    np.testing.assert_array_equal(decode_dicom_frames(data, [4, 0]), stack[[4, 0]])


def test_dicom_pillow_jpeg2000_lossless_exact():
    g = _blocks()
    try:
        stream = _pillow(g, "JPEG2000", irreversible=False)
    except (OSError, KeyError):
        pytest.skip("this Pillow build has no JPEG 2000 codec")
    np.testing.assert_array_equal(decode_image(_encapsulated(_dataset(g), JPEG2000Lossless, [stream])), g)


@pytest.mark.parametrize(
    "syntax,photometric,irreversible", [(JPEG2000Lossless, "YBR_RCT", False), (JPEG2000, "YBR_ICT", True)]
)
def test_dicom_jpeg2000_colour_transforms(syntax, photometric, irreversible):
    g = _blocks()
    rgb = np.dstack([g, np.roll(g, 8, axis=1), 255 - g])
    try:
        stream = _pillow(rgb, "JPEG2000", irreversible=irreversible, mct=1)  # codestream with RCT / ICT
    except (OSError, KeyError):
        pytest.skip("this Pillow build has no JPEG 2000 codec")
    out = decode_image(_encapsulated(_dataset(rgb, photometric), syntax, [stream]))
    _compare(
        out, _luma(np.ascontiguousarray(rgb[:, :, ::-1])), "exact" if syntax == JPEG2000Lossless else "near"
    )


def test_codestream_bomb_in_jpeg_is_refused_before_decoding():
    g = _blocks()
    jpg = bytearray(_pillow(g, "JPEG", quality=90))
    sof = jpg.index(b"\xff\xc0")
    jpg[sof + 5 : sof + 9] = struct.pack(">HH", 30000, 30000)  # Rows/Columns still say 64x64
    with pytest.raises(DecodeError) as e:
        decode_image(_encapsulated(_dataset(g), JPEGBaseline8Bit, [bytes(jpg)]))
    assert e.value.code == "corrupt_image"
    assert "30000x30000" in e.value.message


def test_codestream_bomb_in_jpeg_2000_and_jpeg_ls_is_refused():
    g = _blocks()
    ds = _dataset(g)
    ds.compress(JPEG2000Lossless)
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    siz = frame.index(b"\xff\x51")
    frame[siz + 6 : siz + 14] = struct.pack(">II", 40000, 40000)
    with pytest.raises(DecodeError) as e:
        decode_image(_encapsulated(_dataset(g), JPEG2000Lossless, [bytes(frame)]))
    assert e.value.code == "corrupt_image"

    ds = _dataset(g)
    ds.compress(JPEGLSLossless)
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    sof = frame.index(b"\xff\xf7")
    frame[sof + 5 : sof + 9] = struct.pack(">HH", 50000, 50000)
    with pytest.raises(DecodeError) as e:
        decode_image(_encapsulated(_dataset(g), JPEGLSLossless, [bytes(frame)]))
    assert e.value.code == "corrupt_image"


def test_deflate_bomb_is_refused_without_inflating_it():
    g = _gray()
    data = _save(_dataset(g), DeflatedExplicitVRLittleEndian)
    np.testing.assert_array_equal(decode_image(data), g)
    start = data.index(b"1.2.840.10008.1.2.1.99") + 22
    start += 0 if data[start] else 1  # the UID's padding byte
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = b"".join(packer.compress(b"\x00" * 2**20) for _ in range(16)) + packer.flush()  # 16 MiB of zeros
    with pytest.raises(ImageTooLargeError) as e:
        decode_image(data[:start] + bomb, max_bytes=4 * 2**20)
    assert e.value.code == "image_too_large"
    with pytest.raises(DecodeError) as e:
        decode_image(data[:start] + b"\xff" * 64)
    assert e.value.code == "corrupt_image"


def test_dicom_unknown_transfer_syntax_is_unsupported():
    ds = _dataset(_blocks())
    ds.PixelData = encapsulate([b"\x00" * 16])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = UID("1.2.826.0.1.3680043.9.9999.1")  # a private syntax nobody decodes
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True, implicit_vr=False, little_endian=True)
    data = buf.getvalue()
    with pytest.raises(UnsupportedFormatError) as e:
        decode_image(data)
    assert e.value.code == "unsupported_format" and e.value.http_status == 415


def test_dicom_syntax_without_installed_decoder_is_unsupported(monkeypatch):
    import pydicom.pixels

    class Missing:
        is_available = False

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda uid: Missing())
    data = _encapsulated(_dataset(_blocks()), JPEGLSLossless, [b"\xff\xd8\xff\xf7" + b"\x00" * 32])
    with pytest.raises(UnsupportedFormatError) as e:
        decode_image(data)
    assert "JPEG-LS" in e.value.message
