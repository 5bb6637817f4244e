"""Build a test archive for ``python -m service.archive run``: the project's phantoms as PNG and as DICOM
(a PACS-like tree, files without suffix), the real images of ../shared/data (linked, never copied into the
repository), some of them wrapped as DICOM, and a few corrupt files of the kinds an archive holds.

    python -m benchmarks.make_archive --out /work/exp/archive10k/src --phantoms 9000 --phantom-dicom 800 \
        --real-dicom 100

Writes ``truth.csv`` beside the tree (key, kind, view for phantoms) for evaluation only; the archive run
never reads it. Phantoms depend only on (seed, index): the same command builds the same archive.
"""

from __future__ import annotations

import argparse
import csv
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from training.data.phantoms import PhantomConfig, generate, plan

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"
US_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"  # Ultrasound Image Storage
SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR: an archive's non-image object


def write_dicom(
    path: Path, frame: np.ndarray | None, patient_id: str, uid_seed: str, sop_class: str = US_STORAGE
):
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["fusc-archive", uid_seed])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality = "US" if sop_class == US_STORAGE else "SR"
    ds.PatientName, ds.PatientID = f"PHANTOM^{patient_id}", patient_id
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["fusc-archive-study", patient_id])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["fusc-archive-series", patient_id, sop_class])
    ds.StudyDate, ds.Manufacturer = "20240101", "fusc test archive"
    if frame is not None:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = frame.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.BurnedInAnnotation = "YES"
        ds.PixelData = np.ascontiguousarray(frame).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    os.symlink(src.resolve(), dst)


def build(
    out: Path,
    *,
    phantoms: int = 9000,
    phantom_dicom: int = 800,
    real: Path | None = DEFAULT_DATA,
    real_limit: int | None = None,
    real_dicom: int = 100,
    corrupt: bool = True,
    seed: int = 11,
    progress: bool = True,
) -> dict[str, int]:
    """The archive under ``out`` (created); returns counts by kind."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    truth: list[tuple[str, str, str]] = []
    total = phantoms + phantom_dicom
    cfg = PhantomConfig()
    planned = plan(total, seed) if total else []
    for i, (view, subject) in enumerate(tqdm(planned, desc="phantoms", unit="img", disable=not progress)):
        ph = generate(np.random.default_rng([seed, i, 2]), view, subject, cfg)
        if i < phantoms:
            key = f"phantoms/{subject}/img_{i:06d}.png"
            (out / key).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(out / key), ph.image)
            truth.append((key, "phantom_png", view))
        else:
            key = f"pacs/{subject}/study1/IM{i:06d}"
            write_dicom(out / key, ph.image, f"PH-{subject}", f"{seed}-{i}")
            truth.append((key, "phantom_dicom", view))
    counts = {"phantom_png": min(phantoms, total), "phantom_dicom": max(0, total - phantoms)}
    n_real = n_real_dicom = 0
    if real is not None and Path(real).is_dir():
        images = sorted(
            p for name in ("hc18", "fetal_planes_db") for p in (Path(real) / name / "images").glob("*.png")
        )[:real_limit]
        for j, path in enumerate(images):
            source = path.parent.parent.name
            key = f"real/{source}/{path.name}"
            _link(path, out / key)
            truth.append((key, f"real_{source}", ""))
            n_real += 1
            if n_real_dicom < real_dicom and source == "hc18":
                frame = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
                key = f"pacs/HC18-{j:04d}/study1/IM{j:06d}"
                write_dicom(out / key, frame, f"HC18-{j:04d}", f"hc18-{j}")
                truth.append((key, "real_dicom", ""))
                n_real_dicom += 1
    counts.update(real=n_real, real_dicom=n_real_dicom)
    if corrupt:
        bad = out / "bad"
        bad.mkdir(exist_ok=True)
        some = next((out / "phantoms").rglob("*.png"), None) if phantoms else None
        good = some.read_bytes() if some else cv2.imencode(".png", np.zeros((64, 64), np.uint8))[1].tobytes()
        rng = np.random.default_rng(seed)
        made = []
        for k in range(8):
            made.append((f"bad/truncated_{k}.png", good[: len(good) * (k + 1) // 10]))
        for k in range(4):
            made.append((f"bad/noise_{k}.png", rng.bytes(4000)))
        for k in range(3):
            made.append((f"bad/empty_{k}.jpg", b""))
        made.append(("bad/text.jpg", b"this is not a JPEG at all\n"))
        for key, data in made:
            (out / key).write_bytes(data)
            truth.append((key, "corrupt", ""))
        write_dicom(out / "bad" / "no_pixels", None, "BAD-0001", "no-pixels")
        write_dicom(out / "bad" / "report_sr", None, "BAD-0002", "sr", sop_class=SR_STORAGE)
        truth += [("bad/no_pixels", "corrupt", ""), ("bad/report_sr", "corrupt", "")]
        counts["corrupt"] = len(made) + 2
    with open(out.parent / "truth.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["key", "kind", "view"])
        writer.writerows(sorted(truth))
    counts["total"] = len(truth)
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.make_archive", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--phantoms", type=int, default=9000)
    ap.add_argument("--phantom-dicom", type=int, default=800)
    ap.add_argument("--real", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--real-limit", type=int, default=None)
    ap.add_argument("--real-dicom", type=int, default=100)
    ap.add_argument("--no-corrupt", action="store_true")
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args(argv)
    counts = build(
        args.out,
        phantoms=args.phantoms,
        phantom_dicom=args.phantom_dicom,
        real=args.real,
        real_limit=args.real_limit,
        real_dicom=args.real_dicom,
        corrupt=not args.no_corrupt,
        seed=args.seed,
    )
    print(counts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
