"""Datasets for training: read image lists from the published layouts, clean every frame once with the
service's own decode/clean functions, and cache the model-sized uint8 frames."""

from __future__ import annotations

import csv
import hashlib
import hmac
import json
import os
import secrets
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from service.clean import CleanConfig, clean_frame
from service.decode import decode_image, sniff_format
from service.errors import FuscError
from service.taxonomy import FPDB_BRAIN, FPDB_BRAIN_PLANES

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm"}


@dataclass
class ImageList:
    """Paths plus optional labels and subject ids (labels are only ever used for evaluation)."""

    paths: list[Path] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    subjects: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def extend(self, other: ImageList) -> None:
        self.paths += other.paths
        self.labels += other.labels
        self.subjects += other.subjects
        self.sources += other.sources


def read_csv_layout(root: Path, name: str | None = None) -> ImageList:
    """``labels.csv`` (filename,label,subject; other columns ignored), files in ``images/`` or beside it."""
    root = Path(root)
    csv_path = root / "labels.csv" if root.is_dir() else root
    base = csv_path.parent / "images" if (csv_path.parent / "images").is_dir() else csv_path.parent
    out = ImageList()
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            out.paths.append(base / row["filename"])
            out.labels.append(row.get("label") or None)
            out.subjects.append(row.get("subject") or row["filename"])
            out.sources.append(name or csv_path.parent.name)
    return out


def read_fetal_planes_db(root: Path, fine: bool = False) -> ImageList:
    """Published FETAL_PLANES_DB layout: ``Images/<name>.png`` + ``FETAL_PLANES_DB_data.csv`` (";").

    ``fine``: brain images are labelled by their sub-plane (Trans-thalamic, Trans-cerebellum,
    Trans-ventricular), the fine labels that the coarse-view table merges back into "Fetal brain".
    """
    root = Path(root)
    out = ImageList()
    with open(root / "FETAL_PLANES_DB_data.csv", newline="") as f:
        for row in csv.DictReader(f, delimiter=";"):
            row = {k.strip(): v.strip() for k, v in row.items() if k}
            path = root / "Images" / f"{row['Image_name']}.png"
            if path.exists():
                out.paths.append(path)
                out.labels.append(fine_plane(row["Plane"], row.get("Brain_plane")) if fine else row["Plane"])
                out.subjects.append(f"FPDB_{row['Patient_num']}")
                out.sources.append("fetal_planes_db")
    return out


def read_folder(root: Path) -> ImageList:
    """Every image under a folder, unlabelled; the subject is the first sub-folder (or the file)."""
    root = Path(root)
    out = ImageList()
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        rel = path.relative_to(root)
        out.paths.append(path)
        out.labels.append(None)
        out.subjects.append(rel.parts[0] if len(rel.parts) > 1 else rel.stem)
        out.sources.append(root.name)
    return out


def fine_plane(plane: str, brain_plane: str | None) -> str:
    """The brain sub-plane for a brain image that has one (service.taxonomy.FPDB_BRAIN_PLANES), else the
    plane itself."""
    return brain_plane if plane == FPDB_BRAIN and brain_plane in FPDB_BRAIN_PLANES else plane


def read_csv_layout_fine(root: Path) -> ImageList:
    """A csv layout whose ``brain_plane`` column (as in the shared fetal_planes_db) refines brain labels."""
    root = Path(root)
    csv_path = root / "labels.csv" if root.is_dir() else root
    out = read_csv_layout(root)
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    out.labels = [
        fine_plane(lab, row.get("brain_plane")) if lab else lab
        for lab, row in zip(out.labels, rows, strict=True)
    ]
    return out


# ------------------------------------------------------------------------------------------------- DICOM
SUBJECT_KEY_FILE = "subject-key"


def subject_key(cache_dir: Path | None) -> bytes:
    """The secret that keys the subject hashes of DICOM data, kept (mode 0600) in the cache folder.

    A keyed hash, unlike a plain SHA-256, cannot be reversed by hashing every plausible patient id. The same
    cache folder gives the same subjects, hence the same split, run after run. Without a cache: a fresh key.
    """
    if cache_dir is None:
        return secrets.token_bytes(32)
    path = Path(cache_dir) / SUBJECT_KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    return path.read_bytes()


def hash_subject(identity: str, key: bytes) -> str:
    return "dcm-" + hmac.new(key, identity.encode(), hashlib.sha256).hexdigest()[:16]


def _dicom_identity(path: Path) -> str | None:
    """PatientID (all of a patient's images on one side of the split), else StudyInstanceUID, else None."""
    import pydicom

    try:
        ds = pydicom.dcmread(
            path, stop_before_pixels=True, force=True, specific_tags=["PatientID", "StudyInstanceUID"]
        )
        for tag in ("PatientID", "StudyInstanceUID"):
            value = str(ds.get(tag, "") or "").strip()
            if value:
                return f"{tag}={value}"
    except Exception:  # an unreadable header: the decoder gives the typed error later
        return None
    return None


def _dicom_label_table(root: Path) -> dict[str, str]:
    """Labels from ``labels.csv`` inside the folder, or ``<folder>.csv`` beside it: columns ``filename``
    (path relative to the folder) and ``label``. No file: no labels."""
    for csv_path in (root / "labels.csv", root.with_name(root.name + ".csv")):
        if csv_path.is_file():
            with open(csv_path, newline="") as f:
                return {
                    Path(row["filename"]).as_posix(): row["label"]
                    for row in csv.DictReader(f)
                    if row.get("filename") and row.get("label")
                }
    return {}


def read_dicom_folder(root: Path, key: bytes | None = None) -> ImageList:
    """Every DICOM file under ``root`` (recursively, any file name: found by its magic bytes).

    The subject is a keyed hash of the PatientID (else the StudyInstanceUID, else the file's path): the
    identifiers themselves go nowhere, neither logs nor caches nor reports. Frames are read later by the
    service's decoder, with its frame policy (the middle frame of a multi-frame file); files it cannot read
    are skipped then, counted by error code. Non-DICOM files in the folder are counted and left out here.
    """
    root = Path(root)
    key = key if key is not None else subject_key(None)
    labels = _dicom_label_table(root)
    out = ImageList()
    other = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "labels.csv"):
        with open(path, "rb") as f:
            head = f.read(4096)
        if sniff_format(head) != "dicom":
            other += 1
            continue
        rel = path.relative_to(root).as_posix()
        identity = _dicom_identity(path) or f"path={rel}"
        out.paths.append(path)
        out.labels.append(labels.get(rel))
        out.subjects.append(hash_subject(identity, key))
        out.sources.append(root.name)
    if other:
        print(f"{root.name}: {other} non-DICOM files left out")
    if not len(out):
        raise SystemExit(f"no DICOM files under {root.name}")
    return out


READERS = {
    "csv": read_csv_layout,
    "csv-fine": read_csv_layout_fine,
    "fpdb": read_fetal_planes_db,
    "fpdb-fine": lambda root: read_fetal_planes_db(root, fine=True),
    "folder": read_folder,
    "dicom": read_dicom_folder,
}


def read_spec(spec: str, cache_dir: Path | None = None) -> ImageList:
    """``kind:path`` (kinds: csv, csv-fine, fpdb, fpdb-fine, folder, dicom); a bare path is read as csv when
    it has labels.csv, else as a folder. ``cache_dir`` holds the key of DICOM subject hashes."""
    kind, _, path = (
        spec.partition(":") if ":" in spec and spec.split(":", 1)[0] in READERS else ("", "", spec)
    )
    if not kind:
        kind = "csv" if (Path(path) / "labels.csv").exists() or path.endswith(".csv") else "folder"
    if kind == "dicom":
        return read_dicom_folder(Path(path), subject_key(cache_dir))
    return READERS[kind](Path(path))


def _clean_one(args: tuple[str, dict]) -> np.ndarray | str:
    path, cfg_dict = args
    try:
        frame = decode_image(Path(path).read_bytes())
        return clean_frame(frame, CleanConfig(**cfg_dict))
    except FuscError as exc:
        return exc.code
    except Exception:  # the decoder types every failure it knows; anything else must not stop a run either
        return FuscError.code


def load_frames(
    images: ImageList,
    cfg: CleanConfig,
    cache_dir: Path | None = None,
    workers: int | None = None,
    return_errors: bool = False,
):
    """Decode + clean every image (cached on disk by content of the list and the config).

    Returns (frames uint8 [N,S,S], ok bool [N]), and with ``return_errors`` also {error code: count} of
    the files the decoder refused; those are reported by code (never by name) and marked not ok.
    """
    key = hashlib.sha256(
        json.dumps([[str(p) for p in images.paths], cfg.model_dump()], sort_keys=True).encode()
    ).hexdigest()[:16]
    cache = Path(cache_dir) / f"frames-{key}.npz" if cache_dir else None
    if cache is not None and cache.exists():
        data = np.load(cache)
        errors = json.loads(str(data["errors"])) if "errors" in data.files else {}
        return (data["frames"], data["ok"], errors) if return_errors else (data["frames"], data["ok"])
    frames = np.zeros((len(images), cfg.size, cfg.size), np.uint8)
    ok = np.zeros(len(images), bool)
    jobs = [(str(p), cfg.model_dump()) for p in images.paths]
    workers = workers or min(4, os.cpu_count() or 1)
    errors: dict[str, int] = {}
    with ProcessPoolExecutor(workers) as pool:
        results = pool.map(_clean_one, jobs, chunksize=16)
        for i, res in enumerate(tqdm(results, total=len(jobs), desc="decode+clean", unit="img")):
            if isinstance(res, str):
                errors[res] = errors.get(res, 0) + 1
            else:
                frames[i], ok[i] = res, True
    errors = dict(sorted(errors.items()))
    if errors:
        print(f"skipped {sum(errors.values())} unreadable images: {errors}")
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, frames=frames, ok=ok, errors=np.array(json.dumps(errors)))
    return (frames, ok, errors) if return_errors else (frames, ok)


def subject_split(subjects: list[str], test_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of held-out images: whole subjects go to one side only (no leakage across images)."""
    uniq = sorted(set(subjects))
    rng = np.random.default_rng(seed)
    rng.shuffle(uniq)
    held = set(uniq[: int(round(test_fraction * len(uniq)))])
    return np.array([s in held for s in subjects])
