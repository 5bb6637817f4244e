"""Archive fixtures: the tiny model repository and a small archive tree made on the spot (synthetic frames as
PNG, a few as DICOM with patient identifiers, a few corrupt files, a file that is no image at all)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.service.conftest import build_tiny_repository, png_bytes, synthetic_frame

PATIENT_IDS = ("PAT-0001-SECRET", "PAT-0002-SECRET")


def write_dicom(path: Path, frame: np.ndarray, patient_id: str, index: int) -> None:
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    us_storage = "1.2.840.10008.5.1.4.1.1.6.1"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = us_storage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["fusc-archive-test", str(index)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = us_storage, meta.MediaStorageSOPInstanceUID, "US"
    ds.PatientName, ds.PatientID = "DOE^JANE", patient_id
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["fusc-archive-test-study", patient_id])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["fusc-archive-test-series", patient_id])
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = frame.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(frame).tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def make_archive(root: Path, n_png: int, *, seed: int = 0) -> Path:
    """``n_png`` PNGs in two folders, 4 DICOM files of two patients (no suffix, as PACS exports name them),
    3 corrupt files and a text file that the listing leaves out."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_png):
        folder = root / ("study_a" if i % 2 else "study_b")
        folder.mkdir(exist_ok=True)
        (folder / f"img{i:04d}.png").write_bytes(png_bytes(synthetic_frame(seed * 100_000 + i)))
    dicom = root / "dicom" / "series1"
    dicom.mkdir(parents=True, exist_ok=True)
    for j in range(4):
        write_dicom(dicom / f"IM{j:04d}", synthetic_frame(10_000 + j), PATIENT_IDS[j % 2], j)
    good = png_bytes(synthetic_frame(1))
    (root / "study_a" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "study_a" / "empty.jpg").write_bytes(b"")
    (root / "study_b" / "noise.png").write_bytes(np.random.default_rng(0).bytes(3000))
    (root / "README.txt").write_text("not an image")
    return root


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_repository(tmp_path_factory.mktemp("archive_model_repository"))


@pytest.fixture(scope="session")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_archive(tmp_path_factory.mktemp("archive") / "src", 40)
