"""The pictures of the review pages, made by the service's own decode + clean and cached on disk.

- thumbnail: the cleaned frame (:func:`service.clean.clean_frame`: overlays inpainted, outside the fan
  black) at ``THUMB`` px, so that no burnt-in text reaches a page;
- cleaned: the same at ``LARGE`` px for the image page;
- original: the frame as decoded, with the overlay mask painted over it in opaque magenta and everything
  outside the fan blurred and darkened, so that what cleaning removed can be judged without the text that
  was removed (names, dates, IDs) being legible.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from service.archive.store import Run
from service.clean import CleanConfig, clean_frame, overlay_mask, remove_overlays
from service.decode import decode_image
from service.errors import FuscError

THUMB = 160
LARGE = 384
KINDS = ("thumb", "clean", "original")


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def placeholder(side: int, text: str = "unreadable") -> bytes:
    img = np.full((side, side, 3), 40, np.uint8)
    cv2.putText(
        img, text, (8, side // 2), cv2.FONT_HERSHEY_SIMPLEX, side / 400, (200, 200, 200), 1, cv2.LINE_AA
    )
    return _png(img)


def _fit(img: np.ndarray, side: int) -> np.ndarray:
    h, w = img.shape[:2]
    s = side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)


def masked_original(frame: np.ndarray, cfg: CleanConfig, side: int = LARGE) -> np.ndarray:
    """RGB: the decoded frame with its overlay mask in opaque magenta, the area outside the fan blurred."""
    frame = np.ascontiguousarray(frame)
    h, w = frame.shape
    s = min(1.0, cfg.mask_max_side / max(h, w))
    if s < 1:
        frame = cv2.resize(frame, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
    mask = overlay_mask(frame, cfg)
    _, fan = remove_overlays(frame, cfg, full_resolution=True)
    rgb = cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
    k = max(15, (max(frame.shape) // 20) | 1)
    outside = (cv2.GaussianBlur(rgb, (k, k), 0) * 0.45).astype(np.uint8)
    rgb = np.where(fan[..., None], rgb, outside)
    rgb[mask] = (230, 0, 200)
    return _fit(rgb, side)


class ImageStore:
    """Pictures of a run's images, made on first request and kept as PNG under ``cache``."""

    def __init__(self, run: Run, cfg: CleanConfig, cache: Path) -> None:
        self.run = run
        self.cfg = cfg
        self.cache = Path(cache)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.root = Path(run.manifest.source_root or run.root)
        self.sources = run.table.column("source").to_pylist()
        self.keys = run.table.column("key").to_pylist()
        self._locks = [threading.Lock() for _ in range(16)]

    def _frame(self, row: int) -> np.ndarray:
        source = self.sources[row]
        if "://" in source:
            raise FuscError("the image lies behind a URL; the review reads local files only")
        data = (self.root / source).read_bytes()
        key = self.keys[row]
        frame = None
        if "#f" in key:
            frame = int(key.rsplit("#f", 1)[1])
        return decode_image(data, frame=frame)

    def make(self, row: int, kind: str) -> bytes:
        frame = self._frame(row)
        if kind == "thumb":
            return _png(clean_frame(frame, self.cfg.model_copy(update={"size": THUMB})))
        if kind == "clean":
            return _png(clean_frame(frame, self.cfg.model_copy(update={"size": LARGE, "work_size": LARGE})))
        if kind == "original":
            return _png(masked_original(frame, self.cfg))
        raise ValueError(f"unknown picture {kind!r}")

    def path(self, image_id: str, kind: str) -> Path:
        return self.cache / kind / image_id[:2] / f"{image_id}.png"

    def get(self, row: int, image_id: str, kind: str) -> bytes:
        """The PNG of ``kind`` for result row ``row`` (whose page id is ``image_id``); a gray placeholder when
        the source cannot be read or cleaned any more."""
        if kind not in KINDS:
            raise ValueError(f"unknown picture {kind!r}")
        path = self.path(image_id, kind)
        if path.is_file():
            return path.read_bytes()
        with self._locks[hash(image_id) % len(self._locks)]:
            if path.is_file():
                return path.read_bytes()
            try:
                data = self.make(row, kind)
            except (OSError, FuscError, ValueError, cv2.error):
                return placeholder(THUMB if kind == "thumb" else LARGE)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
            return data
