"""Before/after gallery of cleaning on real images: each pair is the decoded frame with the detected overlay
mask outlined in red, and the clean_frame output. A figure to look at, not a test.

    python -m training.evaluate.gallery [--data ../shared/data] [--out docs/cleaning_gallery.png]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import cv2
import numpy as np

from service.clean import CleanConfig, clean_frame, overlay_mask
from service.decode import decode_image
from service.taxonomy import FPDB_BRAIN, FPDB_BRAIN_PLANES, FPDB_NOT_BRAIN, FPDB_PLANES

ROOT = Path(__file__).resolve().parents[1]
# FETAL_PLANES_DB (plane, brain sub-plane) -> how many to show: every plane the local copy has.
FPDB_PICK = {
    **{(FPDB_BRAIN, sub): 2 for sub in FPDB_BRAIN_PLANES},
    **{(plane, FPDB_NOT_BRAIN): 2 for plane in FPDB_PLANES if plane != FPDB_BRAIN},
}
HC18_COUNT = 8
CELL = 220  # px height of each half of a pair


def pick(data: Path) -> list[tuple[Path, str]]:
    chosen: list[tuple[Path, str]] = []
    fpdb = data / "fetal_planes_db"
    if (fpdb / "labels.csv").is_file():
        with open(fpdb / "labels.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        for (plane, sub), k in FPDB_PICK.items():
            match = [r for r in rows if r["label"] == plane and r["brain_plane"] == sub]
            step = max(1, len(match) // k)
            for r in match[::step][:k]:
                tag = f"FPDB {plane.replace('Fetal ', '').replace('Maternal ', '')}"
                tag += f" {sub.replace('Trans-', 'T-')}" if plane == FPDB_BRAIN else ""
                chosen.append((fpdb / "images" / r["filename"], tag))
    hc = sorted((data / "hc18" / "images").glob("*.png"))
    step = max(1, len(hc) // HC18_COUNT)
    chosen += [(p, "HC18 head") for p in hc[::step][:HC18_COUNT]]
    return chosen


def pair(frame: np.ndarray, cfg: CleanConfig, label: str) -> np.ndarray:
    mask = overlay_mask(frame, cfg).astype(np.uint8)
    cleaned = clean_frame(frame, cfg.model_copy(update={"size": CELL}))
    scale = CELL / frame.shape[0]
    left = cv2.cvtColor(
        cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA), cv2.COLOR_GRAY2BGR
    )
    small = cv2.resize(mask, (left.shape[1], left.shape[0]), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(left, contours, -1, (0, 0, 255), 1)
    right = cv2.cvtColor(cleaned, cv2.COLOR_GRAY2BGR)
    out = np.hstack([left, np.full((CELL, 4, 3), 255, np.uint8), right])
    cv2.putText(out, label, (4, CELL - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 255, 255), 1, cv2.LINE_AA)
    return out


def gallery(items: list[tuple[Path, str]], cfg: CleanConfig, per_row: int = 4) -> np.ndarray:
    cells = [pair(decode_image(p.read_bytes()), cfg, label) for p, label in items]
    width = max(c.shape[1] for c in cells)
    cells = [np.pad(c, ((0, 0), (0, width - c.shape[1]), (0, 0))) for c in cells]
    rows = []
    for i in range(0, len(cells), per_row):
        row = cells[i : i + per_row]
        row += [np.zeros_like(cells[0])] * (per_row - len(row))
        rows.append(np.hstack([np.pad(c, ((4, 4), (4, 4), (0, 0)), constant_values=40) for c in row]))
    return np.vstack(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m training.evaluate.gallery", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "cleaning_gallery.png")
    args = ap.parse_args(argv)
    items = pick(args.data)
    if not items:
        raise SystemExit(f"no images under {args.data}")
    img = gallery(items, CleanConfig())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), img, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    size_mb = args.out.stat().st_size / 1e6
    print(f"wrote {args.out}: {len(items)} pairs, {img.shape[1]}x{img.shape[0]} px, {size_mb:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
