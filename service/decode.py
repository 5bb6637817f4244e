"""decode: uploaded bytes (PNG, JPEG, BMP, TIFF, DICOM) -> one 8-bit gray frame; first arrow of the data path.

The format is found from magic bytes, never from a file name. Image dimensions are read from the container
header (for compressed DICOM, from the codestream of the frame itself) and checked against the limits *before*
any pixel buffer is allocated, so a decompression bomb costs a few microseconds. Every failure leaves as a
:class:`service.errors.DecodeError` subclass with a stable code; ``docs/decoding.md`` lists them all.

Policies, stated once:

* colour -> gray with the ITU-R BT.601 luma weights (0.299 R + 0.587 G + 0.114 B, OpenCV's own); alpha is
  ignored, as scanner screenshots with alpha are opaque. DICOM YCbCr data (YBR_FULL, YBR_FULL_422, and
  JPEG baseline's own YCbCr) gives its Y channel, which *is* that luma, with no round trip through RGB;
* colour kept as chroma: a frame decoded from colour data in which some pixel is coloured comes back as a
  :class:`ColourFrame`, the same gray frame carrying ``chroma`` = max(R, G, B) - min(R, G, B) per pixel
  (uint8 HxW), measured before the gray conversion, so that :mod:`service.clean` can find colour overlays
  (colour Doppler, coloured text and markers) that luma alone cannot tell from echo. Gray inputs, and
  colour files whose pixels are all gray, give a plain ``np.ndarray`` exactly as before;
* 16-bit PNG/TIFF -> 8 bit by ``round(v / 257)``, i.e. the full 16-bit range maps onto 0..255;
* DICOM: the modality rescale (slope/intercept) is applied, then the first VOI window if the file has one;
  without a window, data with at most 8 stored bits is kept as it is and deeper data is stretched from its
  min to its max; MONOCHROME1 is inverted so that bright always means strong echo; PALETTE COLOR goes
  through its LUT, then to luma;
* DICOM frames: a multi-frame file gives its middle frame unless a frame index is asked for
  (:func:`decode_dicom_frames` gives all of them, or a list);
* DICOM ultrasound regions: when the file has a Sequence of Ultrasound Regions, the frame is cropped to the
  bounding box of the union of its 2D regions (Region Spatial Format 1), clamped to the frame; spectral,
  M-mode and waveform strips and the screen around them go. Without a usable 2D region, the whole frame.
"""

from __future__ import annotations

import contextlib
import io
import struct
import warnings
import zlib
from collections.abc import Iterator
from typing import Literal

import cv2
import numpy as np
from pydicom.multival import MultiValue

from service.errors import (
    DecodeError,
    DicomNoPixelsError,
    DicomNotAnImageError,
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
# JPEG-LS (ITU T.87) frames use SOF55 (F7) in the same layout; only DICOM carries them here.
_JPEG_LS_SOF = 0xF7


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


def _jpeg_frame_header(data: bytes, sof_markers: set[int] | frozenset[int]) -> tuple[int, int, int]:
    """(width, height, offset of the frame header) from the first start-of-frame marker in ``sof_markers``."""
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
        if marker in sof_markers:
            if pos + 9 > n:
                break
            height, width = struct.unpack_from(">HH", data, pos + 5)
            if height == 0 or width == 0:  # a DNL-defined height: too rare in practice to support
                raise DecodeError("The JPEG image does not state its size in its header.")
            return width, height, pos
        if marker == 0xDA:  # start of scan before any frame header
            break
        pos += 2 + length
    raise DecodeError("The JPEG image is corrupt (no frame header).")


def _jpeg_size(data: bytes) -> tuple[int, int]:
    width, height, pos = _jpeg_frame_header(data, _JPEG_SOF)
    # A stream cut short decodes into a grey lower part without any error from libjpeg.
    if data.rfind(b"\xff\xd9", pos) < 0:
        raise DecodeError("The JPEG image is truncated (no end-of-image marker).", code="truncated_image")
    return width, height


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
class ColourFrame(np.ndarray):
    """A uint8 HxW gray frame decoded from colour data, with ``chroma`` (uint8 HxW: max - min of the
    pixel's R, G, B) beside it. It is an ``np.ndarray`` in every other respect; arrays derived from it
    (slices, copies, arithmetic) are plain frames with ``chroma = None``, so a chroma map never
    outlives the frame it was measured on."""

    chroma: np.ndarray | None

    def __array_finalize__(self, obj) -> None:
        self.chroma = None


def _with_chroma(gray: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """``gray`` as a :class:`ColourFrame` when some pixel of ``colour`` (HxWx3, uint8, any channel order)
    is coloured, else as it is."""
    # Per-channel OpenCV max/min: about 20x faster than numpy's reduction over the interleaved last axis.
    a, b, c = cv2.split(np.ascontiguousarray(colour[:, :, :3]))
    chroma = cv2.subtract(cv2.max(cv2.max(a, b), c), cv2.min(cv2.min(a, b), c))
    if not cv2.countNonZero(chroma):
        return gray
    out = gray.view(ColourFrame)
    out.chroma = np.ascontiguousarray(chroma)
    return out


def _ybr_to_rgb(ybr: np.ndarray) -> np.ndarray:
    """Full-range YCbCr (BT.601, as DICOM YBR_FULL and JPEG store it) -> RGB uint8."""
    return cv2.cvtColor(np.ascontiguousarray(ybr[:, :, [0, 2, 1]]), cv2.COLOR_YCrCb2RGB)


def _to_gray8(img: np.ndarray, *, rgb: bool) -> np.ndarray:
    """Any decoded array (HxW or HxWxC; uint8/uint16/other) -> uint8 HxW, C-contiguous."""
    if img.dtype == np.uint16:
        img = _map_blocks(img, lambda b: ((b.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8))
    elif img.dtype != np.uint8:
        img = _stretch(img)
    if img.ndim == 3:
        channels = img.shape[2]
        if channels == 1:
            img = img[:, :, 0]
        elif channels in (3, 4):
            code = cv2.COLOR_RGB2GRAY if rgb else cv2.COLOR_BGR2GRAY
            colour = np.ascontiguousarray(img[:, :, :3])
            return _with_chroma(np.ascontiguousarray(cv2.cvtColor(colour, code)), colour)
        else:
            raise UnsupportedFormatError(f"Images with {channels} channels are not supported.")
    elif img.ndim != 2:
        raise DecodeError("The decoded image has an unexpected shape.")
    return np.ascontiguousarray(img)


# Pixel mappings run in float64 on blocks of rows of about this many values: the result is the same as one
# float64 pass over the whole frame, but a 50-megapixel 16-bit frame needs a few MB on top of itself instead
# of 400 MB per temporary array.
_BLOCK_VALUES = 1 << 18


def _blocks(shape: tuple[int, ...]) -> Iterator[slice]:
    """Slices of whole rows (axis 0) holding about ``_BLOCK_VALUES`` values each."""
    per_row = max(1, int(np.prod(shape[1:], dtype=np.int64)))
    step = max(1, _BLOCK_VALUES // per_row)
    for start in range(0, shape[0], step):
        yield slice(start, min(start + step, shape[0]))


def _map_blocks(x: np.ndarray, fn) -> np.ndarray:
    """``fn`` (an elementwise mapping to uint8) applied block by block: uint8 of ``x``'s shape."""
    out = np.empty(x.shape, np.uint8)
    for rows in _blocks(x.shape):
        out[rows] = fn(x[rows])
    return out


def _as_float64(x: np.ndarray, slope: float = 1.0, intercept: float = 0.0) -> np.ndarray:
    """One block in float64, rescaled (DICOM modality LUT) when asked, non-finite values as 0."""
    v = x.astype(np.float64)
    if slope != 1.0 or intercept != 0.0:
        v *= slope
        v += intercept
    finite = np.isfinite(v)
    return v if finite.all() else np.where(finite, v, 0.0)


def _stretch(x: np.ndarray, slope: float = 1.0, intercept: float = 0.0) -> np.ndarray:
    """Min-max stretch of ``x * slope + intercept`` to 0..255 in float64 (non-finite values count as 0);
    a constant image becomes black. Any numeric dtype; computed block by block."""
    lo, hi = np.inf, -np.inf
    for rows in _blocks(x.shape):
        v = _as_float64(x[rows], slope, intercept)
        if v.size:
            lo, hi = min(lo, float(v.min())), max(hi, float(v.max()))
    if not hi > lo:
        return np.zeros(x.shape, np.uint8)
    scale = 255.0 / (hi - lo)
    return _map_blocks(x, lambda b: np.rint((_as_float64(b, slope, intercept) - lo) * scale).astype(np.uint8))


def _decode_raster(data: bytes) -> np.ndarray:
    buf = np.frombuffer(data, np.uint8)
    # ANYDEPTH keeps 16-bit samples; ANYCOLOR keeps gray as one channel and drops alpha.
    img = cv2.imdecode(buf, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    if img is None:
        raise DecodeError("The image could not be decoded; it is corrupt or truncated.")
    return _to_gray8(img, rgb=False)


# ----------------------------------------------------------------------------------------------- DICOM
_DEFLATED = "1.2.840.10008.1.2.1.99"
# Explicit-VR elements whose length field is 4 bytes after 2 reserved ones (PS3.5 7.1.2).
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}

# SOP classes that are no pictures, even when they carry pixel-like data. Each entry names one class and,
# with everything below it, its family.
_NOT_IMAGE_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.88",  # structured reports, key object selection
    "1.2.840.10008.5.1.4.1.1.104",  # encapsulated PDF, CDA, STL, OBJ, MTL
    "1.2.840.10008.5.1.4.1.1.11",  # presentation states
    "1.2.840.10008.5.1.4.1.1.9",  # waveforms (ECG, audio, haemodynamic, ...)
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, spatial registration and fiducials, segmentations, surfaces
    "1.2.840.10008.5.1.4.1.1.67",  # real world value mapping
    "1.2.840.10008.5.1.4.1.1.481",  # radiotherapy objects (an RT portal image is no ultrasound view either)
)


def _file_meta_end(data: bytes) -> tuple[int, dict[int, bytes]]:
    """Walk the file meta group (always explicit VR little endian, right after 'DICM' at offset 128).

    Returns the offset of the first byte after the group and each element's raw bytes by element number.
    """
    pos, n = 132, len(data)
    elements: dict[int, bytes] = {}
    while pos + 8 <= n:
        group, element = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        if data[pos + 4 : pos + 6] in _LONG_VRS:
            if pos + 12 > n:
                break
            (length,) = struct.unpack_from("<I", data, pos + 8)
            end = pos + 12 + length
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            end = pos + 8 + length
        if end > n:
            raise DecodeError("The DICOM file is truncated (in its file meta group).", code="truncated_image")
        elements[element] = data[pos:end]
        pos = end
    return pos, elements


def _inflate(data: bytes, max_bytes: int) -> bytes:
    """A Deflated Explicit VR Little Endian file -> the same file, inflated, with an explicit VR syntax.

    pydicom inflates the whole data set with no bound; a few kB of deflated zeros would inflate to
    gigabytes. The inflated data set is held to the same ``max_bytes`` as an upload: the sender could have
    sent it uncompressed within that limit.
    """
    end, elements = _file_meta_end(data)
    syntax = elements.get(0x0010, b"")
    if syntax[8:].rstrip(b"\x00 ").decode("ascii", "replace") != _DEFLATED:
        return data
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        body = inflater.decompress(data[end:], max_bytes + 1)
    except zlib.error as exc:
        raise DecodeError("The deflated DICOM data set is corrupt.") from exc
    if len(body) > max_bytes:
        raise ImageTooLargeError(f"The deflated DICOM data set inflates past the limit of {max_bytes} bytes.")
    explicit = b"1.2.840.10008.1.2.1\x00"
    syntax = b"\x02\x00\x10\x00UI" + struct.pack("<H", len(explicit)) + explicit
    ordered = sorted(elements.items())  # the group length (element 0) is rewritten below
    group = b"".join(raw for k, raw in ordered if 0 < k < 0x10) + syntax
    group += b"".join(raw for k, raw in ordered if k > 0x10)
    length = b"\x02\x00\x00\x00UL\x04\x00" + struct.pack("<I", len(group))
    return data[:132] + length + group + body


def _read_dicom(data: bytes, max_bytes: int):
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if data.startswith(b"DICM"):  # prefix without its preamble: give pydicom the layout it expects
        data = b"\x00" * 128 + data
    if data[128:132] == b"DICM":
        data = _inflate(data, max_bytes)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, EOFError, ValueError, struct.error, KeyError, TypeError, OverflowError) as exc:
        raise DecodeError("The DICOM file could not be parsed; it is corrupt or truncated.") from exc
    if "TransferSyntaxUID" not in ds.file_meta:
        # A bare data set (no file meta): its encoding is the one pydicom found while reading it.
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
    return ds


def _check_is_image(ds) -> None:
    sop = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
    if any(sop == uid or sop.startswith(uid + ".") for uid in _NOT_IMAGE_SOP_CLASSES):
        from pydicom.uid import UID

        raise DicomNotAnImageError(f"The DICOM file is a '{UID(sop).name}' object, not an image.")
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DicomNoPixelsError("The DICOM file holds no image (no Pixel Data element).")


def _dicom_geometry(ds) -> tuple[int, int, int]:
    _check_is_image(ds)
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise DecodeError("The DICOM file lacks a valid Rows/Columns/Number of Frames.") from exc
    if rows <= 0 or cols <= 0 or frames <= 0:
        raise DecodeError("The DICOM file states a non-positive image size.")
    return rows, cols, frames


def _transfer_syntax(ds):
    """The data set's transfer syntax; refused as unsupported (not as corrupt) when nothing here decodes it.

    Uncompressed, deflated and RLE data decode with pydicom alone; JPEG (baseline, extended, lossless),
    JPEG-LS and JPEG 2000 through pylibjpeg with its libjpeg and openjpeg plugins (Pillow as a fallback
    for JPEG baseline and JPEG 2000).
    """
    from pydicom.pixels import get_decoder

    ts = ds.file_meta.TransferSyntaxUID
    try:
        available = ts.is_transfer_syntax and get_decoder(ts).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise UnsupportedFormatError(
            f"The DICOM transfer syntax '{ts.name}' cannot be decoded by this service; "
            "send it uncompressed, deflated, RLE, JPEG, JPEG-LS or JPEG 2000."
        )
    return ts


def _j2k_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG 2000 SIZ segment, in a bare codestream or inside a JP2 wrapper."""
    at = data.find(b"\xff\x4f\xff\x51", 0, 1 << 20)  # SOC then SIZ; a JP2 box header comes first
    if at < 0:
        raise DecodeError("The JPEG 2000 codestream is corrupt (no SIZ segment).")
    x, y, x0, y0 = struct.unpack_from(">IIII", data, at + 8)
    if x <= x0 or y <= y0:
        raise DecodeError("The JPEG 2000 codestream states an empty image.")
    return x - x0, y - y0


def _check_codestream(ds, ts, index: int, rows: int, cols: int, frames: int) -> None:
    """A compressed frame must state in its own header the size that Rows/Columns promise.

    The codecs allocate what the codestream says, not what the data set says: a 64x64 DICOM whose JPEG
    header claims 30000x30000 would make libjpeg allocate gigabytes. RLE needs no check (its decoders size
    the output from Rows/Columns).
    """
    from pydicom import uid
    from pydicom.encaps import get_frame

    if ts in uid.JPEGTransferSyntaxes or ts in uid.JPEGLSTransferSyntaxes:
        size = lambda b: _jpeg_frame_header(b, _JPEG_SOF | {_JPEG_LS_SOF})[:2]  # noqa: E731
    elif ts in uid.JPEG2000TransferSyntaxes:
        size = _j2k_size
    else:
        return
    offsets = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    codestream = get_frame(ds.PixelData, index, extended_offsets=offsets, number_of_frames=frames)
    try:
        width, height = size(codestream)
    except struct.error as exc:
        raise DecodeError("The DICOM frame's codestream is truncated.", code="truncated_image") from exc
    if (width, height) != (cols, rows):
        raise DecodeError(
            f"The DICOM frame's codestream is {width}x{height} pixels but Rows/Columns say {cols}x{rows}."
        )


def _dicom_pixels(ds, ts, index: int) -> tuple[np.ndarray, str]:
    """One decoded frame as pydicom's decoders give it, without colour conversion, and its photometric.

    The photometric can differ from the data set's: JPEG 2000 decoders return YBR_ICT/RCT data as RGB, and
    uncompressed YBR_FULL_422 comes back with its chroma upsampled (YBR_FULL).
    """
    from pydicom.pixels import get_decoder

    try:
        arr, props = get_decoder(ts).as_array(ds, index=index, raw=True)
    except NotImplementedError as exc:
        raise UnsupportedFormatError(
            f"The DICOM transfer syntax '{ts.name}' cannot be decoded by this service."
        ) from exc
    except (RuntimeError, ValueError, AttributeError, KeyError, TypeError, IndexError, struct.error) as exc:
        raise DecodeError("The DICOM pixel data could not be decoded; it is corrupt or truncated.") from exc
    return arr, str(props.get("photometric_interpretation", "MONOCHROME2")).upper()


def _us_region_box(ds, rows: int, cols: int, min_side: int) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1), end-exclusive, of the union of the 2D ultrasound regions; None: the whole frame.

    Regions are clamped to the frame; one that is then smaller than ``min_side`` on a side, or malformed, is
    ignored, so a bad calibration never costs an otherwise good image.
    """
    try:
        regions = list(ds.get("SequenceOfUltrasoundRegions") or [])
    except Exception:  # a malformed sequence is read lazily by pydicom and may fail in many ways
        return None
    boxes = []
    for item in regions:
        try:
            if int(item.get("RegionSpatialFormat", -1)) != 1:  # 1: 2D (tissue or colour flow)
                continue
            x0, x1 = max(int(item.RegionLocationMinX0), 0), min(int(item.RegionLocationMaxX1), cols - 1)
            y0, y1 = max(int(item.RegionLocationMinY0), 0), min(int(item.RegionLocationMaxY1), rows - 1)
        except Exception:  # missing or malformed coordinates: this region says nothing usable
            continue
        if x1 - x0 + 1 >= min_side and y1 - y0 + 1 >= min_side:
            boxes.append((x0, y0, x1, y1))
    if not boxes:
        return None
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
    return y0, y1 + 1, x0, x1 + 1


def _dicom_frame_to_gray8(ds, arr: np.ndarray, photometric: str) -> np.ndarray:
    """One frame (HxW, or HxWx3 for colour) -> uint8 HxW, by its photometric interpretation."""
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        return _to_gray8(apply_color_lut(arr, ds), rgb=True)
    if arr.ndim == 3:
        if photometric in ("YBR_FULL", "YBR_FULL_422", "YBR_ICT"):  # their Y is the BT.601 luma
            gray = _to_gray8(arr[:, :, 0], rgb=True)
            if arr.dtype == np.uint8:
                return _with_chroma(gray, _ybr_to_rgb(arr))
            return gray
        return _to_gray8(arr, rgb=True)  # RGB; 16-bit colour is rare and _to_gray8 handles it

    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    center, width = _first_window(ds)

    def rescaled(block: np.ndarray) -> np.ndarray:
        v = block.astype(np.float64)
        v *= slope
        v += intercept
        return v

    if center is not None and width is not None and width >= 1:
        # DICOM PS3.3 C.11.2.1.2.1 linear VOI function, onto 0..255.
        c, w = center, width
        out = _map_blocks(
            arr,
            lambda b: np.rint(np.clip(((rescaled(b) - (c - 0.5)) / (w - 1) + 0.5) * 255.0, 0, 255)).astype(
                np.uint8
            ),
        )
    elif (
        int(ds.get("BitsStored", 8) or 8) <= 8
        and slope == 1
        and intercept == 0
        and arr.size
        and float(arr.min()) >= 0
    ):
        out = _map_blocks(arr, lambda b: np.clip(rescaled(b), 0, 255).astype(np.uint8))
    else:
        out = _stretch(arr, slope, intercept)
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


def _dicom_frame(ds, ts, index: int, frames: int, box: tuple[int, int, int, int] | None) -> np.ndarray:
    """Frame ``index``: header checked, decoded, cropped to the ultrasound region, made gray."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    if ts.is_encapsulated:
        _check_codestream(ds, ts, index, rows, cols, frames)
    arr, photometric = _dicom_pixels(ds, ts, index)
    if arr.shape[:2] != (rows, cols):
        raise DecodeError("The decoded DICOM frame does not have the size that Rows/Columns state.")
    if box is not None:
        y0, y1, x0, x1 = box
        arr = arr[y0:y1, x0:x1]  # before the gray mapping, so that a min-max stretch sees only the image
    return _dicom_frame_to_gray8(ds, arr, photometric)


def _open_dicom(data: bytes, max_bytes: int, min_side: int, crop_to_regions: bool):
    """Parse, refuse what is no image, and find geometry, transfer syntax and ultrasound-region crop.

    pydicom warns about every odd value of a hostile or sloppy file; the callers silence those warnings
    (:func:`_quiet`), as the outcome is either a frame or a typed error that says what went wrong.
    """
    ds = _read_dicom(data, max_bytes)
    rows, cols, frames = _dicom_geometry(ds)
    ts = _transfer_syntax(ds)
    box = _us_region_box(ds, rows, cols, min_side) if crop_to_regions else None
    return ds, ts, rows, cols, frames, box


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _decode_dicom(
    data: bytes, frame: int | None, max_pixels: int, max_bytes: int, min_side: int, crop_to_regions: bool
) -> np.ndarray:
    ds, ts, rows, cols, frames, box = _open_dicom(data, max_bytes, min_side, crop_to_regions)
    _check_size(cols, rows, 1, max_pixels, min_side)
    if frame is None:
        frame = frames // 2
    if not 0 <= frame < frames:
        raise DecodeError(
            f"Frame {frame} was asked for; the file has {frames} frame(s).", code="bad_frame_index"
        )
    return _dicom_frame(ds, ts, frame, frames, box)


# --------------------------------------------------------------------------------------------- public
def decode_image(
    data: bytes,
    *,
    max_pixels: int = MAX_PIXELS,
    max_bytes: int = MAX_BYTES,
    min_side: int = MIN_SIDE,
    frame: int | None = None,
    crop_to_regions: bool = True,
) -> np.ndarray:
    """Decode uploaded bytes into one gray frame: uint8, HxW, C-contiguous.

    ``frame`` picks a frame of a multi-frame DICOM (default: the middle one); ``crop_to_regions`` crops a
    DICOM to its 2D ultrasound regions when it lists any. Other formats ignore both.
    Raises only :class:`service.errors.DecodeError` subclasses.
    """
    try:
        fmt = _precheck(data, max_bytes)
        if fmt == "dicom":
            with _quiet():
                img = _decode_dicom(bytes(data), frame, max_pixels, max_bytes, min_side, crop_to_regions)
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
    crop_to_regions: bool = True,
) -> np.ndarray:
    """All (or the listed) frames of a DICOM file as uint8 (F, H, W); ``max_pixels`` bounds F*H*W.

    Every frame gets the same ultrasound-region crop (the regions belong to the whole file).
    """
    try:
        fmt = _precheck(data, max_bytes)
        if fmt != "dicom":
            raise UnsupportedFormatError("A DICOM file was expected.")
        with _quiet():
            ds, ts, rows, cols, n, box = _open_dicom(bytes(data), max_bytes, min_side, crop_to_regions)
            wanted = list(range(n)) if frames == "all" else [int(i) for i in frames]
            if not wanted or any(not 0 <= i < n for i in wanted):
                raise DecodeError(f"Frames outside 0..{n - 1} were asked for.", code="bad_frame_index")
            _check_size(cols, rows, len(wanted), max_pixels, min_side)
            height, width = (box[1] - box[0], box[3] - box[2]) if box else (rows, cols)
            out = np.empty((len(wanted), height, width), np.uint8)
            for j, i in enumerate(wanted):
                out[j] = _dicom_frame(ds, ts, i, n, box)
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
