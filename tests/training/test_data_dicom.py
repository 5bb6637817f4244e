"""The DICOM folder data source: files found by magic bytes, subjects as keyed hashes, the service's frame
policy, labels from a CSV, undecodable files skipped and counted by their typed error code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid

from service.clean import CleanConfig
from service.decode import decode_image
from tests.service.test_decode import _dataset, _save
from training.data.readers import SUBJECT_KEY_FILE, load_frames, read_spec

PATIENTS = ("DOE^JANE", "ROE^RICHARD")
IDS = ("PID-778812", "PID-990213")
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def _dicom(
    pixels: np.ndarray | None, patient: int, *, sop: str = US_IMAGE, frames: int = 1, **extra
) -> bytes:
    """An ultrasound DICOM of one of two patients, written by the decode tests' own builder."""
    return _save(
        _dataset(
            pixels,
            frames=frames,
            sop=sop,
            PatientName=PATIENTS[patient],
            PatientID=IDS[patient],
            StudyInstanceUID=generate_uid(),
            **extra,
        )
    )


def _frame(seed: int, value: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (64, 80), dtype=np.uint8)
    if value is not None:
        img[:] = value
    return img


@pytest.fixture
def dicom_dir(tmp_path: Path) -> Path:
    """Two patients in nested folders (names with and without .dcm), one 3-frame clip whose middle frame
    differs, one truncated file, one structured report, one text file, and a label CSV for some files."""
    root = tmp_path / "archive"
    (root / "a" / "study1").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "a" / "study1" / "IM0001").write_bytes(_dicom(_frame(0), 0))
    (root / "a" / "study1" / "IM0002.dcm").write_bytes(_dicom(_frame(1), 0))
    clip = np.stack([_frame(2, 10), _frame(3, 200), _frame(4, 60)])
    (root / "b" / "clip.dcm").write_bytes(_dicom(clip, 1, frames=3))
    good = _dicom(_frame(5), 1)
    (root / "b" / "cut.dcm").write_bytes(good[: len(good) // 2])
    (root / "b" / "report.dcm").write_bytes(_dicom(None, 1, sop=BASIC_TEXT_SR))
    (root / "notes.txt").write_text("not an image")
    (root / "labels.csv").write_text("filename,label\na/study1/IM0001,brain\nb/clip.dcm,abdomen\n")
    return root


def test_dicom_folder_lists_every_dicom_with_hashed_subjects(dicom_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    images = read_spec(f"dicom:{dicom_dir}", cache_dir=cache)
    names = [p.relative_to(dicom_dir).as_posix() for p in images.paths]
    assert names == ["a/study1/IM0001", "a/study1/IM0002.dcm", "b/clip.dcm", "b/cut.dcm", "b/report.dcm"]
    assert images.labels == ["brain", None, "abdomen", None, None]
    assert set(images.sources) == {"archive"}
    # One subject per patient (the cut file's header still names its patient), no identifier in it.
    assert images.subjects[0] == images.subjects[1]
    assert images.subjects[2] == images.subjects[4]
    assert images.subjects[0] != images.subjects[2]
    for s in images.subjects:
        assert s.startswith("dcm-") and not any(i in s for i in IDS)
    # The subject hashes are keyed by a secret kept in the cache: same cache, same subjects.
    assert (cache / SUBJECT_KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert read_spec(f"dicom:{dicom_dir}", cache_dir=cache).subjects == images.subjects
    other = read_spec(f"dicom:{dicom_dir}", cache_dir=tmp_path / "other-cache").subjects
    assert other[0] != images.subjects[0]
    out = capsys.readouterr().out
    assert "1 non-DICOM files" in out
    assert not any(x in out for x in (*IDS, *PATIENTS, "DOE"))


def test_dicom_frames_use_the_service_decoder_and_skip_bad_files(dicom_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    images = read_spec(f"dicom:{dicom_dir}", cache_dir=cache)
    cfg = CleanConfig(size=32)
    frames, ok, errors = load_frames(images, cfg, cache, workers=1, return_errors=True)
    assert ok.tolist() == [True, True, True, False, False]
    assert errors == {"corrupt_image": 1, "dicom_not_an_image": 1}
    printed = capsys.readouterr().out
    assert "skipped 2 unreadable images" in printed and "dicom_not_an_image" in printed
    # The multi-frame clip gives its middle frame, as the service does (bright, value 200).
    middle = decode_image((dicom_dir / "b" / "clip.dcm").read_bytes())
    assert middle.mean() == 200
    assert frames[2].mean() > 150
    # The cache gives the same frames and counts back, and holds no identifier.
    again = load_frames(images, cfg, cache, workers=1, return_errors=True)
    np.testing.assert_array_equal(again[0], frames)
    assert again[2] == errors
    for f in cache.iterdir():
        blob = f.read_bytes()
        assert not any(x.encode() in blob for x in (*IDS, *PATIENTS))


def test_dicom_folder_without_labels_or_dicoms(tmp_path):
    root = tmp_path / "plain"
    root.mkdir()
    (root / "x.dcm").write_bytes(_dicom(_frame(0), 0))
    images = read_spec(f"dicom:{root}", cache_dir=tmp_path / "c")
    assert images.labels == [None]
    # A CSV beside the folder (``<folder>.csv``) labels it too.
    (tmp_path / "plain.csv").write_text("filename,label\nx.dcm,femur\n")
    assert read_spec(f"dicom:{root}", cache_dir=tmp_path / "c").labels == ["femur"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("x")
    with pytest.raises(SystemExit, match="no DICOM files"):
        read_spec(f"dicom:{empty}")
