"""decode: uploaded bytes (PNG, JPEG, BMP, TIFF, DICOM) -> one 8-bit gray frame; first arrow of the data path.

The format is found from magic bytes, never from a file name. Image dimensions are read from the container
header and checked against the limits *before* any pixel buffer is allocated, so a decompression bomb costs
a few microseconds. Every failure leaves as a :class:`service.errors.DecodeError` subclass with a stable code.

Policies, stated once:

* colour -> gray with the ITU-R BT.601 luma weights (0.299 R + 0.587 G + 0.114 B, OpenCV's own); alpha is
  ignored, as scanner screenshots with alpha are opaque;
* 16-bit PNG/TIFF -> 8 bit by ``round(v / 257)``, i.e. the full 16-bit range maps onto 0..255;
* DICOM: the modality rescale (slope/intercept) is applied, then the first VOI window if the file has one;
  without a window, data with at most 8 stored bits is kept as it is and deeper data is stretched from its
  min to its max; MONOCHROME1 is inverted so that bright always means strong echo; multi-frame files give
  their middle frame unless a frame index is asked for (:func:`decode_dicom_frames` gives them all).
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from typing import Literal

import cv2
import numpy as np
from pydicom.multival import MultiValue

from service.errors import (
    DecodeError,
    DicomNoPixelsError,
    EmptyInputError,
    FuscError,
    ImageTooLargeError,
    ImageTooSmallError,
    UnsupportedFormatError,
)

MAX_PIXELS = 50_000_000
MAX_BYTES = 64 * 2**20
MIN_SIDE = 32

Format = Literal["png", "jpeg", "bmp", "tiff", "dicom"]

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers that carry the frame size (C4 is DHT, C8 is reserved, CC is DAC).
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


# --------------------------------------------------------------------------------------------- sniffing
def sniff_format(data: bytes) -> Format | None:
    """The container format from its magic bytes, or None when it is none we read."""
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"BM") and len(data) >= 26:
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if data[128:132] == b"DICM" or data.startswith(b"DICM"):
        return "dicom"
    if _looks_like_raw_dicom(data):
        return "dicom"
    return None


def _looks_like_raw_dicom(data: bytes) -> bool:
    """A DICOM data set written without the 128-byte preamble and 'DICM' prefix.

    Such a stream starts with a group 0002 (file meta) or 0008 (identifying) element in little endian;
    the next two bytes are either an explicit VR (two upper-case letters) or an implicit-VR length.
    """
    if len(data) < 8 or data[:2] not in (b"\x02\x00", b"\x08\x00"):
        return False
    vr = data[4:6]
    if vr.isalpha() and vr.isupper():
        return True
    (length,) = struct.unpack_from("<I", data, 4)
    return length < len(data)


# ------------------------------------------------------------------------------ header-only dimensions
def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from IHDR, after checking every chunk's CRC and the final IEND chunk.

    libpng stops quietly at the end of a truncated stream and OpenCV then returns a half-grey image;
    walking the chunks first turns that case into an error.
    """
    pos = len(_PNG_MAGIC)
    size: tuple[int, int] | None = None
    n = len(data)
    while True:
        if pos + 8 > n:
            raise DecodeError("The PNG image is truncated (no IEND chunk).", code="truncated_image")
        length, ctype = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if end > n:
            raise DecodeError(
                "The PNG image is truncated (a chunk runs past the end).", code="truncated_image"
            )
        (crc,) = struct.unpack_from(">I", data, pos + 8 + length)
        if zlib.crc32(data[pos + 4 : pos + 8 + length]) != crc:
            raise DecodeError("The PNG image is corrupt (a chunk checksum does not match).")
        if size is None:
            if ctype != b"IHDR" or length != 13:
                raise DecodeError("The PNG image is corrupt (it does not start with an IHDR chunk).")
            size = struct.unpack_from(">II", data, pos + 8)
        if ctype == b"IEND":
            return size
        pos = end


def _jpeg_size(data: bytes) -> tuple[int, int]:
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            raise DecodeError("The JPEG image is corrupt (a marker is missing).")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length field
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if marker in _JPEG_SOF:
            if pos + 9 > n:
                break
            height, width = struct.unpack_from(">HH", data, pos + 5)
            if height == 0 or width == 0:  # a DNL-defined height: too rare in practice to support
                raise DecodeError("The JPEG image does not state its size in its header.")
            # A stream cut short decodes into a grey lower part without any error from libjpeg.
            if data.rfind(b"\xff\xd9", pos) < 0:
                raise DecodeError(
                    "The JPEG image is truncated (no end-of-image marker).", code="truncated_image"
                )
            return width, height
        if marker == 0xDA:  # start of scan before any frame header
            break
        pos += 2 + length
    raise DecodeError("The JPEG image is corrupt (no frame header).")


def _bmp_size(data: bytes) -> tuple[int, int]:
    (header_size,) = struct.unpack_from("<I", data, 14)
    if header_size == 12:  # OS/2 BITMAPCOREHEADER
        width, height = struct.unpack_from("<HH", data, 18)
    else:
        width, height = struct.unpack_from("<ii", data, 18)
    return abs(width), abs(height)


def _tiff_size(data: bytes) -> tuple[int, int]:
    """(width, height) of the first image file directory; classic and BigTIFF."""
    e = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    try:
        if big:
            (ifd,) = struct.unpack_from(e + "Q", data, 8)
            (count,) = struct.unpack_from(e + "Q", data, ifd)
            first, step = ifd + 8, 20
        else:
            (ifd,) = struct.unpack_from(e + "I", data, 4)
            (count,) = struct.unpack_from(e + "H", data, ifd)
            first, step = ifd + 2, 12
        dims: dict[int, int] = {}
        for k in range(min(count, 4096)):
            off = first + k * step
            tag, typ = struct.unpack_from(e + "HH", data, off)
            if tag in (256, 257):
                value_off = off + (12 if big else 8)
                fmt = {3: "H", 4: "I", 16: "Q"}.get(typ)
                if fmt is None:
                    raise DecodeError("The TIFF image is corrupt (bad size field).")
                (dims[tag],) = struct.unpack_from(e + fmt, data, value_off)
    except struct.error:
        raise DecodeError("The TIFF image is corrupt (its directory runs past the end).") from None
    if 256 not in dims or 257 not in dims:
        raise DecodeError("The TIFF image is corrupt (no width or height).")
    return dims[256], dims[257]


_HEADER_SIZE = {"png": _png_size, "jpeg": _jpeg_size, "bmp": _bmp_size, "tiff": _tiff_size}


def _check_size(width: int, height: int, frames: int, max_pixels: int, min_side: int) -> None:
    if width * height * max(frames, 1) > max_pixels:
        raise ImageTooLargeError(
            f"The image has {width * height * max(frames, 1)} pixels; the limit is {max_pixels}."
        )
    if min(width, height) < min_side:
        raise ImageTooSmallError(
            f"The image is {width}x{height} pixels; each side must be at least {min_side}."
        )


# ----------------------------------------------------------------------------------- pixel conversion
def _to_gray8(img: np.ndarray, *, rgb: bool) -> np.ndarray:
    """Any decoded array (HxW or HxWxC; uint8/uint16/other) -> uint8 HxW, C-contiguous."""
    if img.dtype == np.uint16:
        img = ((img.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = _stretch(img.astype(np.float64))
    if img.ndim == 3:
        channels = img.shape[2]
        if channels == 1:
            img = img[:, :, 0]
        elif channels in (3, 4):
            code = cv2.COLOR_RGB2GRAY if rgb else cv2.COLOR_BGR2GRAY
            img = cv2.cvtColor(np.ascontiguousarray(img[:, :, :3]), code)
        else:
            raise UnsupportedFormatError(f"Images with {channels} channels are not supported.")
    elif img.ndim != 2:
        raise DecodeError("The decoded image has an unexpected shape.")
    return np.ascontiguousarray(img)


def _stretch(x: np.ndarray) -> np.ndarray:
    """Min-max stretch to 0..255; a constant image becomes black."""
    finite = np.isfinite(x)
    if not finite.all():
        x = np.where(finite, x, 0.0)
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros(x.shape, np.uint8)
    return np.rint((x - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _decode_raster(data: bytes) -> np.ndarray:
    buf = np.frombuffer(data, np.uint8)
    # ANYDEPTH keeps 16-bit samples; ANYCOLOR keeps gray as one channel and drops alpha.
    img = cv2.imdecode(buf, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    if img is None:
        raise DecodeError("The image could not be decoded; it is corrupt or truncated.")
    return _to_gray8(img, rgb=False)


# ----------------------------------------------------------------------------------------------- DICOM
def _read_dicom(data: bytes):
    import pydicom
    from pydicom.errors import InvalidDicomError

    if data.startswith(b"DICM"):  # prefix without its preamble: give pydicom the layout it expects
        data = b"\x00" * 128 + data
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, EOFError, ValueError, struct.error, KeyError, TypeError, OverflowError) as exc:
        raise DecodeError("The DICOM file could not be parsed; it is corrupt or truncated.") from exc


def _dicom_geometry(ds) -> tuple[int, int, int]:
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DicomNoPixelsError("The DICOM file holds no image (no Pixel Data element).")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise DecodeError("The DICOM file lacks a valid Rows/Columns/Number of Frames.") from exc
    if rows <= 0 or cols <= 0 or frames <= 0:
        raise DecodeError("The DICOM file states a non-positive image size.")
    return rows, cols, frames


def _check_transfer_syntax(ds) -> None:
    """Refuse, as unsupported rather than corrupt, a compression whose decoder is not installed here.

    Uncompressed, deflated and RLE data decode with pydicom alone; JPEG baseline/extended and JPEG 2000
    through Pillow; JPEG-LS and JPEG lossless need pylibjpeg-libjpeg (or pyjpegls/gdcm) in the environment.
    """
    from pydicom.pixels import get_decoder

    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is None:
        return
    if ts.is_transfer_syntax and not ts.is_compressed:
        return
    try:
        available = ts.is_transfer_syntax and get_decoder(ts).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise UnsupportedFormatError(
            f"The DICOM transfer syntax '{ts.name}' cannot be decoded by this service; "
            "send it uncompressed, RLE, JPEG baseline or JPEG 2000."
        )


def _dicom_pixels(ds, index: int | None) -> np.ndarray:
    _check_transfer_syntax(ds)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.pixel_array_options(index=index)
            return ds.pixel_array
    except NotImplementedError as exc:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(ts, "name", "unknown")
        raise UnsupportedFormatError(
            f"The DICOM transfer syntax '{name}' cannot be decoded by this service.",
        ) from exc
    except (RuntimeError, ValueError, AttributeError, KeyError, TypeError, IndexError, struct.error) as exc:
        raise DecodeError("The DICOM pixel data could not be decoded; it is corrupt or truncated.") from exc


def _dicom_frame_to_gray8(ds, arr: np.ndarray) -> np.ndarray:
    """One frame (HxW or HxWx3, as pydicom returns it: YBR already converted to RGB) -> uint8 HxW."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr = apply_color_lut(arr, ds)
    if arr.ndim == 3:
        return _to_gray8(arr, rgb=True)  # 16-bit colour is rare; _to_gray8 handles it

    x = arr.astype(np.float64)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    x = x * slope + intercept
    center, width = _first_window(ds)
    if center is not None and width is not None and width >= 1:
        # DICOM PS3.3 C.11.2.1.2.1 linear VOI function, onto 0..255.
        y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0
        out = np.rint(np.clip(y, 0, 255)).astype(np.uint8)
    elif int(ds.get("BitsStored", 8) or 8) <= 8 and slope == 1 and intercept == 0 and x.min() >= 0:
        out = np.clip(x, 0, 255).astype(np.uint8)
    else:
        out = _stretch(x)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return np.ascontiguousarray(out)


def _first_window(ds) -> tuple[float | None, float | None]:
    """The first VOI window (a file may list several presets; the first is the default one)."""

    def first(value) -> float | None:
        if value is None:
            return None
        if isinstance(value, (list, tuple, MultiValue)):
            value = value[0] if len(value) else None
        try:
            return None if value is None else float(value)
        except (TypeError, ValueError):
            return None

    return first(ds.get("WindowCenter")), first(ds.get("WindowWidth"))


def _decode_dicom(data: bytes, frame: int | None, max_pixels: int, min_side: int) -> np.ndarray:
    ds = _read_dicom(data)
    rows, cols, frames = _dicom_geometry(ds)
    _check_size(cols, rows, 1, max_pixels, min_side)
    if frame is None:
        frame = frames // 2
    if not 0 <= frame < frames:
        raise DecodeError(
            f"Frame {frame} was asked for; the file has {frames} frame(s).", code="bad_frame_index"
        )
    arr = _dicom_pixels(ds, frame if frames > 1 else None)
    if arr.ndim == 4 or (arr.ndim == 3 and arr.shape[-1] not in (3, 4) and frames > 1):
        arr = arr[frame]
    return _dicom_frame_to_gray8(ds, arr)


# --------------------------------------------------------------------------------------------- public
def decode_image(
    data: bytes,
    *,
    max_pixels: int = MAX_PIXELS,
    max_bytes: int = MAX_BYTES,
    min_side: int = MIN_SIDE,
    frame: int | None = None,
) -> np.ndarray:
    """Decode uploaded bytes into one gray frame: uint8, HxW, C-contiguous.

    ``frame`` picks a frame of a multi-frame DICOM (default: the middle one); other formats ignore it.
    Raises only :class:`service.errors.DecodeError` subclasses.
    """
    try:
        fmt = _precheck(data, max_bytes)
        if fmt == "dicom":
            img = _decode_dicom(bytes(data), frame, max_pixels, min_side)
        else:
            width, height = _header_size(fmt, data)
            _check_size(width, height, 1, max_pixels, min_side)
            img = _decode_raster(bytes(data))
        _check_size(img.shape[1], img.shape[0], 1, max_pixels, min_side)
        return img
    except FuscError:
        raise
    except MemoryError as exc:
        raise ImageTooLargeError("The image does not fit in memory.") from exc
    except Exception as exc:  # any parser failure on hostile bytes is the caller's corrupt input, never a 500
        raise DecodeError("The image could not be decoded; it is corrupt or truncated.") from exc


def decode_dicom_frames(
    data: bytes,
    frames: Literal["all"] | list[int] = "all",
    *,
    max_pixels: int = MAX_PIXELS,
    max_bytes: int = MAX_BYTES,
    min_side: int = MIN_SIDE,
) -> np.ndarray:
    """All (or the listed) frames of a DICOM file as uint8 (F, H, W); ``max_pixels`` bounds F*H*W."""
    try:
        fmt = _precheck(data, max_bytes)
        if fmt != "dicom":
            raise UnsupportedFormatError("A DICOM file was expected.")
        ds = _read_dicom(bytes(data))
        rows, cols, n = _dicom_geometry(ds)
        wanted = list(range(n)) if frames == "all" else [int(i) for i in frames]
        if not wanted or any(not 0 <= i < n for i in wanted):
            raise DecodeError(f"Frames outside 0..{n - 1} were asked for.", code="bad_frame_index")
        _check_size(cols, rows, len(wanted), max_pixels, min_side)
        out = np.empty((len(wanted), rows, cols), np.uint8)
        for j, i in enumerate(wanted):
            arr = _dicom_pixels(ds, i if n > 1 else None)
            if arr.ndim == 4 or (arr.ndim == 3 and arr.shape[-1] not in (3, 4) and n > 1):
                arr = arr[0]
            out[j] = _dicom_frame_to_gray8(ds, arr)
        return out
    except FuscError:
        raise
    except MemoryError as exc:
        raise ImageTooLargeError("The image does not fit in memory.") from exc
    except Exception as exc:
        raise DecodeError("The DICOM file could not be decoded; it is corrupt or truncated.") from exc


def _precheck(data: bytes, max_bytes: int) -> Format:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise UnsupportedFormatError("The input must be raw bytes.")
    if len(data) == 0:
        raise EmptyInputError("The upload is empty (0 bytes).")
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"The upload has {len(data)} bytes; the limit is {max_bytes}.")
    fmt = sniff_format(bytes(data))
    if fmt is None:
        raise UnsupportedFormatError("The upload is not a PNG, JPEG, BMP, TIFF or DICOM image.")
    return fmt


def _header_size(fmt: Format, data: bytes) -> tuple[int, int]:
    try:
        return _HEADER_SIZE[fmt](bytes(data) if fmt == "png" else data)
    except struct.error as exc:
        raise DecodeError(f"The {fmt.upper()} header is truncated.", code="truncated_image") from exc
