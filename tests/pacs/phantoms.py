"""Phantom DICOM instances for the PACS tests: ultrasound frames from training.data.phantoms (numpy + OpenCV,
no torch) wrapped as the objects a scanner sends, plus the odd ones a PACS also holds.

Every instance carries a recognisable fake identity (PatientName, PatientID, birth date, accession number)
so that the tests can grep logs, metrics and error texts for it. Kinds:

* ``us``: Ultrasound Image Storage, one frame, MONOCHROME2, Explicit VR Little Endian;
* ``us_mf``: Ultrasound Multi-frame Image Storage, 5 frames;
* ``us_jpeg``: Ultrasound Image Storage, JPEG Baseline (encapsulated, one fragment per frame);
* ``us_mf_jpeg``: Ultrasound Multi-frame Image Storage, 3 JPEG frames;
* ``sc``: Secondary Capture Image Storage (a screen export);
* ``pdf``: Encapsulated PDF Storage (a non-image SOP class: ignored, counted);
* ``corrupt``: Ultrasound Image Storage whose JPEG fragment is garbage (dead-letter: corrupt_image);
* ``no_pixels``: Ultrasound Image Storage without Pixel Data (dead-letter: dicom_no_pixel_data).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from training.data.phantoms import PhantomConfig, generate

US = "1.2.840.10008.5.1.4.1.1.6.1"
US_MF = "1.2.840.10008.5.1.4.1.1.3.1"
SC = "1.2.840.10008.5.1.4.1.1.7"
PDF = "1.2.840.10008.5.1.4.1.1.104.1"

# The fake identity: distinctive strings that appear nowhere in the code base, so a grep hit is a leak.
NAME_MARK = "Quetzalova"
ID_MARK = "QZX"
BIRTH_DATE = "19870412"
ACCESSION_MARK = "ACQZ"
PHI_MARKS = (NAME_MARK, ID_MARK, BIRTH_DATE, ACCESSION_MARK)

IMAGE_KINDS = ("us", "us_mf", "us_jpeg", "us_mf_jpeg", "sc")
DEAD_KINDS = {"corrupt": "corrupt_image", "no_pixels": "dicom_no_pixel_data"}
MF_FRAMES = {"us_mf": 5, "us_mf_jpeg": 3}
_VIEWS = ("brain", "abdomen", "femur", "thorax_4ch", "spine", "profile", "kidneys")


@dataclass(frozen=True)
class Instance:
    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    data: bytes  # a DICOM file (preamble + file meta)
    dataset: Dataset

    @property
    def is_image(self) -> bool:
        return self.kind in IMAGE_KINDS

    @property
    def dead_code(self) -> str | None:
        return DEAD_KINDS.get(self.kind)


def _frames(seed: int, n: int, size: tuple[int, int]) -> list[np.ndarray]:
    cfg = PhantomConfig(size=size)
    view = _VIEWS[seed % len(_VIEWS)]
    return [generate(np.random.default_rng([seed, f]), view, f"P{seed:04d}", cfg).image for f in range(n)]


def _jpeg(frame: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


def make_instance(
    kind: str, index: int, *, patient: int | None = None, size: tuple[int, int] = (120, 160)
) -> Instance:
    """Instance ``index`` of ``kind``; ``patient`` picks the fake identity (default: index // 4)."""
    patient = index // 4 if patient is None else patient
    sop_class = {"us_mf": US_MF, "us_mf_jpeg": US_MF, "sc": SC, "pdf": PDF}.get(kind, US)
    uid = generate_uid(entropy_srcs=["fusc-pacs-test", kind, str(index)])
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid
    ds.PatientName = f"{NAME_MARK}^Anna{patient:04d}"
    ds.PatientID = f"{ID_MARK}{patient:06d}"
    ds.PatientBirthDate = BIRTH_DATE
    ds.PatientSex = "F"
    ds.AccessionNumber = f"{ACCESSION_MARK}{patient:06d}"
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["fusc-pacs-test-study", str(patient)])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["fusc-pacs-test-series", str(patient), kind])
    ds.StudyDate = ds.ContentDate = "20250102"
    ds.StudyTime = ds.ContentTime = "101500"
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, index + 1
    ds.ReferringPhysicianName = ""
    ds.Modality = "DOC" if kind == "pdf" else "US"  # an SC screen export from the scanner is US too
    ds.Manufacturer = "fusc phantom"
    if kind == "pdf":
        ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
        ds.EncapsulatedDocument = b"%PDF-1.4\n%phantom report\n%%EOF\n"
        ds.BurnedInAnnotation = "NO"
    elif kind != "no_pixels":
        n = MF_FRAMES.get(kind, 1)
        frames = _frames(index, n, size)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = frames[0].shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.BurnedInAnnotation = "YES"
        if n > 1:
            ds.NumberOfFrames = n
            ds.FrameIncrementPointer = 0x00181063
            ds.FrameTime = 33.3
        if kind in ("us_jpeg", "us_mf_jpeg", "corrupt"):
            ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
            fragments = [_jpeg(f) for f in frames]
            if kind == "corrupt":
                fragments = [b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4]
            ds.PixelData = encapsulate(fragments)
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
            ds.LossyImageCompression = "01"
        else:
            ds.PixelData = np.ascontiguousarray(np.stack(frames)).tobytes()
    else:
        ds.Rows, ds.Columns = size
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return Instance(kind, sop_class, uid, str(ds.StudyInstanceUID), buffer.getvalue(), ds)


def mixed_set(
    n: int, *, start: int = 0, odd: Sequence[str] = ("pdf", "corrupt", "no_pixels")
) -> list[Instance]:
    """``n`` instances: the odd kinds once each, the rest cycling through the image kinds."""
    out = [make_instance(kind, start + i) for i, kind in enumerate(odd)]
    for i in range(len(odd), n):
        out.append(make_instance(IMAGE_KINDS[i % len(IMAGE_KINDS)], start + i))
    return out
