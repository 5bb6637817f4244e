"""A set of images that are not ultrasound at all, for measuring the service's out-of-distribution check.

    python -m training.evaluate.ood_set --out DIR [--n 240] [--seed 0]

Writes ``DIR/images/*.png`` (a few ``.jpg``) and ``DIR/manifest.csv`` (filename,kind,detail): noise
(gaussian, uniform, salt-and-pepper, at several sizes), blank frames, linear and radial gradients,
checkerboards, rendered text pages (dark on white, light on black), and the photographs shipped inside
scikit-image (gray and colour, colour kept in colour), cropped, flipped and resized to reach ``n``. The same
``seed`` gives the same files. numpy, OpenCV and scikit-image's bundled files only: no torch, no download.
"""

from __future__ import annotations

import argparse
import csv
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

KINDS = ("noise", "blank", "gradient", "checkerboard", "text", "photo_gray", "photo_colour")
# (H, W): from just above the decoder's 32 px minimum to a large screenshot.
SIZES = ((48, 64), (128, 128), (240, 320), (480, 640), (768, 1024))
# Photographs inside scikit-image's own wheel (``skimage.data``), none fetched from the network.
GRAY_PHOTOS = (
    "camera",
    "coins",
    "moon",
    "page",
    "text",
    "cell",
    "brick",
    "grass",
    "gravel",
    "clock",
    "horse",
    "microaneurysms",
    "shepp_logan_phantom",
)
COLOUR_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "retina",
    "hubble_deep_field",
    "immunohistochemistry",
    "colorwheel",
    "logo",
)
_WORDS = (
    "patient report summary the quick brown fox jumps over a lazy dog invoice total amount due "
    "meeting agenda item notes please review attached figure table results method data page chapter "
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt"
).split()
_FONTS = (
    cv2.FONT_HERSHEY_SIMPLEX,
    cv2.FONT_HERSHEY_DUPLEX,
    cv2.FONT_HERSHEY_COMPLEX,
    cv2.FONT_HERSHEY_PLAIN,
    cv2.FONT_HERSHEY_TRIPLEX,
)


@dataclass(frozen=True)
class Item:
    kind: str
    detail: str
    make: Callable[[np.random.Generator], np.ndarray]  # uint8 HxW (gray) or HxWx3 (RGB)
    jpeg: bool = False


# ------------------------------------------------------------------------------------------- synthetic
def _noise(kind: str, h: int, w: int, colour: bool) -> Callable[[np.random.Generator], np.ndarray]:
    shape = (h, w, 3) if colour else (h, w)

    def make(rng: np.random.Generator) -> np.ndarray:
        if kind == "gaussian":
            img = rng.normal(128, 50, shape)
        elif kind == "uniform":
            img = rng.uniform(0, 256, shape)
        else:  # salt and pepper on mid-gray
            img = np.full(shape, 128.0)
            u = rng.random((h, w))
            img[u < 0.1], img[u > 0.9] = 0, 255
        return np.clip(img, 0, 255).astype(np.uint8)

    return make


def _blank(level: int, h: int, w: int) -> Callable[[np.random.Generator], np.ndarray]:
    return lambda rng: np.full((h, w), level, np.uint8)


def _linear_gradient(angle_deg: float, h: int, w: int) -> Callable[[np.random.Generator], np.ndarray]:
    def make(rng: np.random.Generator) -> np.ndarray:
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        t = np.cos(np.radians(angle_deg)) * x / w + np.sin(np.radians(angle_deg)) * y / h
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        return (255 * t).astype(np.uint8)

    return make


def _radial_gradient(h: int, w: int, inverted: bool) -> Callable[[np.random.Generator], np.ndarray]:
    def make(rng: np.random.Generator) -> np.ndarray:
        cy, cx = h * rng.uniform(0.3, 0.7), w * rng.uniform(0.3, 0.7)
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        r = np.hypot(y - cy, x - cx)
        t = r / r.max()
        return (255 * (t if inverted else 1 - t)).astype(np.uint8)

    return make


def _checkerboard(square: int, h: int, w: int, colour: bool) -> Callable[[np.random.Generator], np.ndarray]:
    def make(rng: np.random.Generator) -> np.ndarray:
        y, x = np.mgrid[0:h, 0:w]
        board = ((y // square + x // square) % 2).astype(bool)
        if not colour:
            return np.where(board, 255, 0).astype(np.uint8)
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        return np.where(board[..., None], a, b).astype(np.uint8)

    return make


def _text_page(dark_on_light: bool, h: int, w: int) -> Callable[[np.random.Generator], np.ndarray]:
    def make(rng: np.random.Generator) -> np.ndarray:
        ink, paper = (20, 245) if dark_on_light else (235, 0)
        img = np.full((h, w), paper, np.uint8)
        font = int(rng.choice(_FONTS))
        scale = float(rng.uniform(0.5, 1.2)) * w / 640
        thickness = max(1, round(2 * scale))
        line_h = int(cv2.getTextSize("Ag", font, scale, thickness)[0][1] * 2.0) + 2
        y = line_h + int(rng.integers(0, line_h))
        while y < h - line_h // 2:
            words = rng.choice(_WORDS, size=int(rng.integers(3, 12)))
            cv2.putText(img, " ".join(words), (int(w * 0.05), y), font, scale, ink, thickness, cv2.LINE_AA)
            y += line_h
        return img

    return make


def synthetic_items() -> list[Item]:
    items: list[Item] = []
    for h, w in SIZES:
        for kind in ("gaussian", "uniform", "salt_pepper"):
            items.append(Item("noise", f"{kind} {h}x{w}", _noise(kind, h, w, colour=False)))
        items.append(Item("noise", f"gaussian colour {h}x{w}", _noise("gaussian", h, w, colour=True)))
    for (h, w), level in zip(((240, 320), (480, 640), (128, 128)), (0, 255, 128), strict=True):
        for size in ((h, w), (600, 800)):
            items.append(Item("blank", f"level {level} {size[0]}x{size[1]}", _blank(level, *size)))
    for angle in (0, 45, 90, 135, 180, 270):
        items.append(Item("gradient", f"linear {angle} deg", _linear_gradient(angle, 300, 400)))
    for inverted in (False, True):
        for h, w in ((256, 256), (480, 640)):
            items.append(Item("gradient", f"radial {h}x{w}", _radial_gradient(h, w, inverted)))
    for square in (2, 4, 8, 16, 32, 64):
        items.append(Item("checkerboard", f"{square} px", _checkerboard(square, 480, 640, colour=False)))
        items.append(Item("checkerboard", f"{square} px colour", _checkerboard(square, 256, 256, True)))
    for dark in (True, False):
        paper = "white" if dark else "black"
        for h, w in ((480, 640), (600, 800), (1024, 768), (240, 320), (300, 300)):
            items.append(Item("text", f"on {paper} {h}x{w}", _text_page(dark, h, w)))
    return items


# -------------------------------------------------------------------------------------------- photos
def load_photos() -> dict[str, np.ndarray]:
    """name -> uint8 HxW (gray) or HxWx3 (RGB) for each photograph that this scikit-image ships."""
    from skimage import data

    photos: dict[str, np.ndarray] = {}
    for name in (*GRAY_PHOTOS, *COLOUR_PHOTOS):
        loader = getattr(data, name, None)
        if loader is None:
            continue
        try:
            img = np.asarray(loader())
        except Exception:  # a photo that this version would fetch from the network: left out
            continue
        if img.dtype == bool:
            img = img.astype(np.uint8) * 255
        elif img.dtype != np.uint8:
            img = (255 * (img - img.min()) / max(float(img.max() - img.min()), 1e-6)).astype(np.uint8)
        if img.ndim == 3 and img.shape[2] == 4:  # RGBA logo: onto white
            alpha = img[..., 3:].astype(np.float32) / 255
            img = (img[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
        photos[name] = img
    return photos


def _photo(img: np.ndarray) -> Callable[[np.random.Generator], np.ndarray]:
    return lambda rng: img


def _photo_variant(img: np.ndarray) -> Callable[[np.random.Generator], np.ndarray]:
    """A random crop (35-100 % of each side), maybe flipped, resized to 0.5-2x: same photo, new frame."""

    def make(rng: np.random.Generator) -> np.ndarray:
        h, w = img.shape[:2]
        ch, cw = (max(40, int(s * rng.uniform(0.35, 1.0))) for s in (h, w))
        ch, cw = min(ch, h), min(cw, w)
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        out = img[y : y + ch, x : x + cw]
        flip = int(rng.integers(0, 4))  # none, horizontal, vertical, both
        if flip:
            out = cv2.flip(out, {1: 1, 2: 0, 3: -1}[flip])
        scale = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
        size = (max(40, round(cw * scale)), max(40, round(ch * scale)))
        return cv2.resize(np.ascontiguousarray(out), size, interpolation=cv2.INTER_AREA)

    return make


def _kind(img: np.ndarray) -> str:
    return "photo_colour" if img.ndim == 3 else "photo_gray"


# ------------------------------------------------------------------------------------------------ plan
def plan(n: int, seed: int = 0, photos: dict[str, np.ndarray] | None = None) -> list[Item]:
    """The ``n`` items, in order. Every synthetic pattern and every photograph once, then photo variants to
    reach ``n``; when ``n`` is smaller than that, kinds take turns so that each is represented."""
    if n < 1:
        raise ValueError("n must be at least 1")
    photos = load_photos() if photos is None else photos
    base = synthetic_items()
    colour_names = [name for name, img in photos.items() if img.ndim == 3]
    jpeg = set(colour_names[:3])  # a few camera-like JPEGs; the rest PNG
    base += [Item(_kind(img), name, _photo(img), jpeg=name in jpeg) for name, img in photos.items()]
    if n <= len(base):
        by_kind = {k: [it for it in base if it.kind == k] for k in KINDS}
        out: list[Item] = []
        while len(out) < n:
            for k in KINDS:
                if by_kind[k] and len(out) < n:
                    out.append(by_kind[k].pop(0))
        return out
    if not photos:
        raise RuntimeError("scikit-image ships no photographs here; install scikit-image (the dev extra)")
    names = sorted(photos)
    rng = np.random.default_rng([seed, 7])
    variants = []
    for i in range(n - len(base)):
        name = names[i % len(names)] if i < len(names) else str(rng.choice(names))
        img = photos[name]
        variants.append(
            Item(_kind(img), f"{name} variant", _photo_variant(img), jpeg=bool(rng.random() < 0.1))
        )
    return base + variants


def write_ood_set(out_dir: str | Path, n: int = 240, seed: int = 0) -> Path:
    """Write the images and ``manifest.csv`` (filename,kind,detail) under ``out_dir``; returns it."""
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, item in enumerate(plan(n, seed)):
        img = item.make(np.random.default_rng([seed, i]))
        name = f"ood_{i:04d}.{'jpg' if item.jpeg else 'png'}"
        bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if img.ndim == 3 else img
        params = [cv2.IMWRITE_JPEG_QUALITY, 90] if item.jpeg else []
        if not cv2.imwrite(str(images / name), bgr, params):
            raise OSError(f"could not write {images / name}")
        rows.append((name, item.kind, item.detail))
    with open(out / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "kind", "detail"])
        writer.writerows(rows)
    return out


def read_manifest(out_dir: str | Path) -> list[tuple[Path, str]]:
    """(image path, kind) for each row of ``out_dir/manifest.csv``."""
    out = Path(out_dir)
    with open(out / "manifest.csv", newline="") as f:
        return [(out / "images" / row["filename"], row["kind"]) for row in csv.DictReader(f)]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m training.evaluate.ood_set", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument("--n", type=int, default=240, help="number of images (default 240)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = write_ood_set(args.out, args.n, args.seed)
    counts = Counter(kind for _, kind in read_manifest(out))
    print(f"wrote {sum(counts.values())} non-ultrasound images to {out / 'images'}")
    for kind in KINDS:
        print(f"  {kind:<13} {counts[kind]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
