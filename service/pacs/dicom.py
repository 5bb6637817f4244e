"""What the PACS path takes in: the ultrasound SOP classes, and a header read that keeps pydicom quiet.

pydicom warns about odd values and may quote them (a patient name among them): the worker silences its
warnings and turns validation off, so that no header value can reach a log line.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import pydicom
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset

from service.errors import DecodeError

US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
SC_MULTIFRAME = (
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color
)
ULTRASOUND_CLASSES = frozenset({US_IMAGE, US_MULTIFRAME})
SECONDARY_CAPTURE_CLASSES = frozenset({SECONDARY_CAPTURE, *SC_MULTIFRAME})
# The classes the receiver queues (a sender routes ultrasound to it, Secondary Capture included: scanners
# and workstations export screens as SC). Every other storage class is accepted and ignored, counted.
ACCEPTED_CLASSES = ULTRASOUND_CLASSES | SECONDARY_CAPTURE_CLASSES


def is_wanted(sop_class_uid: str, modality: str | None = None) -> bool:
    """Ultrasound classes always; Secondary Capture when the modality is US or not known (the watcher
    knows it and skips SC screens of other modalities; a C-STORE sender has chosen to send it)."""
    if sop_class_uid in ULTRASOUND_CLASSES:
        return True
    if sop_class_uid in SECONDARY_CAPTURE_CLASSES:
        return modality is None or modality.upper() == "US"
    return False


def silence_pydicom() -> None:
    """Process-wide: no pydicom/highdicom warnings and no value validation on reading (a warning may quote
    a header value, a patient name among them). The worker calls it once at start; the warnings filters
    are global, so doing it per read from several threads would race."""
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    for module in ("pydicom", "highdicom", "pynetdicom"):
        warnings.filterwarnings("ignore", module=module)


def read_header(source: Path | bytes) -> Dataset:
    """The dataset without its pixel data; a file that does not parse is a corrupt instance."""
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else str(source)
        return pydicom.dcmread(fp, stop_before_pixels=True, force=True)
    except Exception as exc:  # any parser failure on a received file is that file's fault
        raise DecodeError("the DICOM header could not be read; the instance is corrupt") from exc


def number_of_frames(header: Dataset) -> int:
    try:
        return max(1, int(header.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1
