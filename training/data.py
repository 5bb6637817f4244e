"""Datasets for training: read image lists from the published layouts, clean every frame once with the
service's own decode/clean functions, and cache the model-sized uint8 frames."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from service.clean import CleanConfig, clean_frame
from service.decode import decode_image
from service.errors import FuscError

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


def read_fetal_planes_db(root: Path) -> ImageList:
    """Published FETAL_PLANES_DB layout: ``Images/<name>.png`` + ``FETAL_PLANES_DB_data.csv`` (";")."""
    root = Path(root)
    out = ImageList()
    with open(root / "FETAL_PLANES_DB_data.csv", newline="") as f:
        for row in csv.DictReader(f, delimiter=";"):
            row = {k.strip(): v.strip() for k, v in row.items() if k}
            path = root / "Images" / f"{row['Image_name']}.png"
            if path.exists():
                out.paths.append(path)
                out.labels.append(row["Plane"])
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


READERS = {"csv": read_csv_layout, "fpdb": read_fetal_planes_db, "folder": read_folder}


def read_spec(spec: str) -> ImageList:
    """``kind:path`` (kinds: csv, fpdb, folder); a bare path is read as csv when it has labels.csv."""
    kind, _, path = (
        spec.partition(":") if ":" in spec and spec.split(":", 1)[0] in READERS else ("", "", spec)
    )
    if not kind:
        kind = "csv" if (Path(path) / "labels.csv").exists() or path.endswith(".csv") else "folder"
    return READERS[kind](Path(path))


def _clean_one(args: tuple[str, dict]) -> np.ndarray | str:
    path, cfg_dict = args
    try:
        frame = decode_image(Path(path).read_bytes())
        return clean_frame(frame, CleanConfig(**cfg_dict))
    except FuscError as exc:
        return exc.code


def load_frames(
    images: ImageList, cfg: CleanConfig, cache_dir: Path | None = None, workers: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Decode + clean every image (cached on disk by content of the list and the config).

    Returns (frames uint8 [N,S,S], ok bool [N]); unreadable files are reported and marked not ok.
    """
    key = hashlib.sha256(
        json.dumps([[str(p) for p in images.paths], cfg.model_dump()], sort_keys=True).encode()
    ).hexdigest()[:16]
    cache = Path(cache_dir) / f"frames-{key}.npz" if cache_dir else None
    if cache is not None and cache.exists():
        data = np.load(cache)
        return data["frames"], data["ok"]
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
    if errors:
        print(f"skipped {sum(errors.values())} unreadable images: {errors}")
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, frames=frames, ok=ok)
    return frames, ok


def subject_split(subjects: list[str], test_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of held-out images: whole subjects go to one side only (no leakage across images)."""
    uniq = sorted(set(subjects))
    rng = np.random.default_rng(seed)
    rng.shuffle(uniq)
    held = set(uniq[: int(round(test_fraction * len(uniq)))])
    return np.array([s in held for s in subjects])
