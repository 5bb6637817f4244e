"""clean on phantoms whose overlay pixels are known exactly: how much of the burnt-in text, calipers and
scale the overlay mask finds (recall), how much of what it finds is overlay (precision), and whether OCR can
still read a word after cleaning.

The OCR part needs the tesseract binary (CI: apt-get install -y tesseract-ocr tesseract-ocr-eng;
pip install pytesseract) and skips without it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import cv2
import numpy as np
import pytest

from service.clean import CleanConfig, overlay_mask, remove_overlays
from training.data.phantoms import Phantom, iter_phantoms

TOLERANCE_PX = 2  # Chebyshev distance: the overlay mask itself is grown by a 5x5 square
WORD = re.compile(r"[A-Za-z]{3,}")


def _grow(mask: np.ndarray, px: int) -> np.ndarray:
    return cv2.dilate(mask.astype(np.uint8), np.ones((2 * px + 1, 2 * px + 1), np.uint8)).astype(bool)


def true_overlay(ph: Phantom) -> np.ndarray:
    """Drawn overlay pixels. The black anonymisation box is left out: the overlay search is for bright
    graphics, and the box is handled as a black area outside the fan (never inpainted as anatomy)."""
    return ph.overlay_mask & (ph.image > 0)


def clean_full_resolution(frame: np.ndarray, cfg: CleanConfig | None = None) -> np.ndarray:
    """clean_frame's overlay and fan steps at the frame's own size (no crop, no resize), for OCR to read."""
    return remove_overlays(frame, cfg, full_resolution=True)[0]


@dataclass
class PixelScore:
    true_px: int = 0
    found_true_px: int = 0
    detected_px: int = 0
    detected_near_true_px: int = 0

    def add(self, truth: np.ndarray, detected: np.ndarray) -> None:
        self.true_px += int(truth.sum())
        self.found_true_px += int((truth & _grow(detected, TOLERANCE_PX)).sum())
        self.detected_px += int(detected.sum())
        self.detected_near_true_px += int((detected & _grow(truth, TOLERANCE_PX)).sum())

    @property
    def recall(self) -> float:
        return self.found_true_px / max(1, self.true_px)

    @property
    def precision(self) -> float:
        return self.detected_near_true_px / max(1, self.detected_px)


def pixel_scores(phantoms: list[Phantom]) -> PixelScore:
    score = PixelScore()
    for ph in phantoms:
        score.add(true_overlay(ph), overlay_mask(ph.image))
    return score


def test_scores_worked_by_hand() -> None:
    truth = np.zeros((20, 20), bool)
    truth[5, 2:12] = True  # a 10-px stroke
    detected = np.zeros((20, 20), bool)
    detected[7, 2:7] = True  # 2 px away from its left half: counts
    detected[15, 15] = True  # far from any stroke: a false detection
    s = PixelScore()
    s.add(truth, detected)
    assert (s.true_px, s.found_true_px) == (10, 7)  # columns 2..8 are within 2 px of a detected pixel
    assert (s.detected_px, s.detected_near_true_px) == (6, 5)


@pytest.fixture(scope="module")
def phantoms() -> list[Phantom]:
    return list(iter_phantoms(120, seed=21))


def test_overlay_mask_recall_on_phantoms(phantoms) -> None:
    s = pixel_scores(phantoms)
    assert s.recall >= 0.95, f"recall {s.recall:.3f} over {s.true_px} overlay px"


# Measured (120 phantoms, seed 21): precision 0.776 before fan-rim echoes were dropped (most false px lay on
# the fan's rim or, once dilated, just outside it), 0.912 after, recall 0.988 -> 0.981. All pixels count.
def test_overlay_mask_precision_on_phantoms(phantoms) -> None:
    s = pixel_scores(phantoms)
    assert s.precision >= 0.85, f"precision {s.precision:.3f} over {s.detected_px} detected px"


# ---------------------------------------------------------------------------------------------- OCR
def _ocr_words(images: list[np.ndarray], phantoms: list[Phantom]) -> list[list[str]]:
    """Words of 3+ letters tesseract reads in each image, on every line where text was drawn."""
    from training.data import ocr

    crops, owner = [], []
    cfg = ocr.LineConfig()
    for k, (img, ph) in enumerate(zip(images, phantoms, strict=True)):
        boxes, glyph_h, _ = ocr.line_boxes(true_overlay(ph), cfg)
        for x, y, w, h in boxes:
            p = cfg.pad + round(0.5 * glyph_h)
            patch = img[max(0, y - p) : y + h + p, max(0, x - p) : x + w + p]
            scale = cfg.target_height / patch.shape[0]
            crops.append(cv2.resize(255 - patch, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC))
            owner.append(k)
    texts = ocr.TesseractReader().read(crops)
    words: list[list[str]] = [[] for _ in images]
    for k, text in zip(owner, texts, strict=True):
        words[k] += [w for w in text.split() if WORD.search(w)]
    return words


def _letters(word: str) -> str:
    return "".join(ch for ch in word.upper() if ch.isalpha())


def _near(a: str, b: str) -> bool:
    """Equal up to one substituted, dropped or added letter."""
    if abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b, strict=True)) <= 1
    short, long_ = sorted((a, b), key=len)
    return any(long_[:i] + long_[i + 1 :] == short for i in range(len(long_)))


def _reads_drawn_word(read: list[str], drawn: list[str]) -> bool:
    """Whether any word read is one of the drawn 3+-letter words (case-insensitive, one OCR slip allowed)."""
    targets = {_letters(m) for line in drawn for m in WORD.findall(line)}
    return any(_near(_letters(w), t) for w in read for t in targets if len(_letters(w)) >= 3)


@dataclass
class OcrRates:
    """Shares of the images with text in which OCR reads, on the lines where text was drawn, ..."""

    drawn_before: float  # ... a drawn 3+-letter word, in the frame as it came
    drawn_after: float  # ... the same, after cleaning
    any_before: float  # ... any 3+-letter word at all
    any_after: float
    any_truth: float  # ... any 3+-letter word in the phantom before overlays were burnt in (speckle read
    #                       as "eee", "owe": the floor that no cleaning can go below)


def ocr_rates(n: int, seed: int) -> OcrRates:
    phantoms = [ph for ph in iter_phantoms(n, seed=seed) if ph.text]
    before = _ocr_words([ph.image for ph in phantoms], phantoms)
    after = _ocr_words([clean_full_resolution(ph.image) for ph in phantoms], phantoms)
    truth = _ocr_words([ph.clean for ph in phantoms], phantoms)
    m = len(phantoms)
    return OcrRates(
        drawn_before=sum(_reads_drawn_word(w, ph.text) for w, ph in zip(before, phantoms, strict=True)) / m,
        drawn_after=sum(_reads_drawn_word(w, ph.text) for w, ph in zip(after, phantoms, strict=True)) / m,
        any_before=sum(map(bool, before)) / m,
        any_after=sum(map(bool, after)) / m,
        any_truth=sum(map(bool, truth)) / m,
    )


def _needs_tesseract() -> None:
    from training.data import ocr

    if not ocr.tesseract_available():
        pytest.skip(
            "tesseract binary or pytesseract missing (apt-get install -y tesseract-ocr tesseract-ocr-eng)"
        )


@pytest.fixture(scope="module")
def rates() -> OcrRates:
    _needs_tesseract()
    return ocr_rates(60, seed=22)


def test_no_drawn_word_is_readable_after_cleaning(rates) -> None:
    """Tesseract reads a burnt-in word of 3+ letters back in at most 5% of the cleaned images."""
    assert rates.drawn_before >= 0.9, f"the OCR check is toothless: only {rates.drawn_before:.2f} before"
    assert rates.drawn_after <= 0.05, f"a drawn word is still read in {rates.drawn_after:.1%} ({rates})"


def test_what_ocr_reads_after_cleaning_is_at_the_speckle_floor(rates) -> None:
    """Tesseract reads speckle as short words ("eee", "ail") even in phantoms that never had text: the
    cleaned images are read no more often than those, give or take a few images."""
    assert rates.any_after <= rates.any_truth + 0.05, rates


# Some 3+-letter string read after cleaning / in the phantom before text was drawn (generator v3), 120
# phantoms each: held out, seed 25 4.2 % / 0.8 %, seed 26 3.3 % / 2.5 %, seed 27 4.2 % / 2.5 %; seed 22
# (tuned on) 6.7 % / 4.2 %; this fixture (60, seed 22) 5.0 % / 3.3 %. What is read is tesseract's reading
# of speckle and of the smooth fill where a caliper mark on bright tissue was missed, never a drawn word.
def test_no_word_at_all_is_readable_after_cleaning(rates) -> None:
    """No 3+-letter word at all is read in at least 95 % of the cleaned images that had text."""
    assert rates.any_after <= 0.05, rates


@pytest.mark.slow
def test_no_word_at_all_on_held_out_seeds() -> None:
    _needs_tesseract()
    by_seed = [ocr_rates(120, seed) for seed in (25, 26, 27)]
    pooled = sum(r.any_after for r in by_seed) / len(by_seed)
    assert pooled <= 0.05, by_seed


@pytest.mark.slow
def test_overlay_mask_and_ocr_on_many_phantoms() -> None:
    _needs_tesseract()
    s = pixel_scores(list(iter_phantoms(400, seed=23, size=(480, 640))))
    assert s.recall >= 0.95, s
    r = ocr_rates(300, seed=24)
    assert r.drawn_before >= 0.9 and r.drawn_after <= 0.05, r
    assert r.any_after <= r.any_truth + 0.05, r
