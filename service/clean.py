"""clean: gray frame -> model input, the second arrow of the data path (OCR-free, numpy + OpenCV only).

Training and serving both call :func:`preprocess`, with the :class:`CleanConfig` stored in the model card, so
what the model saw in training is exactly what it sees in service.

Steps of :func:`clean_frame`:

1. find burnt-in overlays (text, calipers, cursor and scale marks) at full resolution, where a one-pixel
   stroke is still sharp (:func:`overlay_mask`), and colour overlays from the chroma map that a colour
   file brings (:func:`colour_mask`);
2. shrink frame and mask to ``work_size``, where the fan search and the inpainting are ~2x cheaper;
3. find the ultrasound fan with the overlays blanked (:func:`fan_mask`); everything outside it (margins,
   side text, gray-scale bar, black anonymisation boxes) becomes black;
4. inpaint the overlays inside the fan (:func:`inpaint`);
5. crop to the fan's bounding box, pad to a square with black, resize to ``size``.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, Field


class CleanConfig(BaseModel):
    """Preprocessing parameters; they travel inside the model card.

    Pixel lengths of the overlay search are at the frame's own resolution (capped at ``mask_max_side``);
    those of the fan search are at ``work_size``.
    """

    size: int = Field(96, ge=16, description="side of the square model input, px")
    mean: float = Field(0.5, description="normalisation: (x / 255 - mean) / std")
    std: float = Field(0.25, gt=0)

    work_size: int = Field(256, ge=32, description="longest side at which the fan search and inpainting run")
    mask_max_side: int = Field(1280, ge=64, description="larger frames shrink to this for the overlay search")

    # Overlays: thin (top-hat), bright, and drawn with pixel-sharp edges. The sharpness test is what tells a
    # 1-2 px text stroke (steps of 100+ gray levels between neighbours) from a thin bright echo, whose
    # profile is smoothed by the beam's point-spread function (steps of a few tens).
    overlay_stroke_px: int = Field(3, ge=1, description="strokes up to 2*this+1 px wide count as thin")
    overlay_min_level: int = Field(90, ge=0, le=255, description="overlay pixels are at least this bright")
    overlay_min_tophat: int = Field(40, ge=0, le=255, description="and this much brighter than around them")
    overlay_min_step: int = Field(70, ge=0, le=255, description="a sharp edge: neighbour step at least this")
    overlay_min_sharp_fraction: float = Field(0.3, ge=0, le=1, description="share of px at a sharp edge")
    overlay_small_area: int = Field(400, ge=1, description="up to this many px: any shape")
    overlay_line_px: float = Field(3.0, gt=0, description="larger ones must be lines: area <= this * length")
    overlay_max_area: float = Field(0.02, gt=0, le=1, description="larger components are anatomy")
    overlay_run_px: int = Field(
        20, ge=3, description="straight runs this long (or 1/16 of the longest side) are judged apart"
    )
    overlay_dilate_px: int = Field(2, ge=0, description="mask grown by this much to cover anti-aliased edges")
    overlay_rim_band: tuple[float, float] = Field(
        (0.3, 0.7), description="share of black 2 px around a component: between these, a fan-rim echo"
    )
    overlay_line_gap_px: int = Field(
        6, ge=0, description="... unless a kept overlay stands this close beside it (a glyph of its line)"
    )

    # Colour overlays (colour Doppler, coloured text, markers and boxes), found from the chroma that
    # decode_image measures before the gray conversion; gray frames have none.
    colour_min_chroma: int = Field(
        40, ge=1, le=255, description="max(R,G,B) - min(R,G,B) from which a pixel is a colour overlay"
    )
    colour_min_area: int = Field(3, ge=1, description="smaller groups of coloured px are noise (e.g. JPEG)")
    colour_dilate_px: int = Field(2, ge=0, description="colour mask grown by this much (chroma bleeds)")

    # Fan: the convex hull of the largest region of echo after blurring, thresholding and opening.
    fan_level: int = Field(2, ge=0, le=255, description="blurred gray level above which a pixel is echo")
    fan_min_fraction: float = Field(0.1, ge=0, le=1, description="a smaller largest region -> whole frame")
    black_level: int = Field(2, ge=0, le=255, description="anonymisation boxes are filled with <= this")
    black_box_px: int = Field(12, ge=3, description="black squares of this side (at work_size) are outside")

    inpaint_method: Literal["telea", "ns"] = "telea"
    inpaint_radius: int = Field(3, ge=1, description="px at work_size")


# ----------------------------------------------------------------------------------------------- masks
def _rect(k: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_RECT, (k, k))


def _sharp_edges(frame: np.ndarray, min_step: int) -> np.ndarray:
    """Pixels with a 4-neighbour whose gray level differs by at least ``min_step`` (bool HxW)."""
    sharp = np.zeros(frame.shape, bool)
    dx = cv2.absdiff(frame[:, 1:], frame[:, :-1]) >= min_step
    dy = cv2.absdiff(frame[1:, :], frame[:-1, :]) >= min_step
    sharp[:, 1:] |= dx
    sharp[:, :-1] |= dx
    sharp[1:, :] |= dy
    sharp[:-1, :] |= dy
    return sharp


def _extent(labels: np.ndarray, coord: np.ndarray, n: int) -> np.ndarray:
    """Per label, max - min + 1 of ``coord`` (a bounding-box side), from sparse pixel lists."""
    lo = np.full(n, np.iinfo(np.int64).max)
    hi = np.full(n, -1)
    np.minimum.at(lo, labels, coord)
    np.maximum.at(hi, labels, coord)
    return np.maximum(hi - lo + 1, 0)


def _on_fan_rim(frame: np.ndarray, labels: np.ndarray, n: int, cfg: CleanConfig) -> np.ndarray:
    """Per label: whether the component lies on the fan's boundary, its surroundings part black margin and
    part image. A bright echo against the black margin shows a pixel-sharp step there, on one side only;
    burnt-in text and graphics lie in the margin (surroundings black but for their own anti-aliased edge)
    or on the image (surroundings echo)."""
    # The ring 2 px out: a glyph's anti-aliased edge (1 px out) is not what surrounds it.
    grown = labels.astype(np.float32)
    near = cv2.dilate(grown, _rect(3)) > 0
    ring_labels = cv2.dilate(grown, _rect(5)).astype(np.int32)
    ring = (ring_labels > 0) & ~near
    ring_px = np.bincount(ring_labels[ring], minlength=n)
    ring_black = np.bincount(ring_labels[ring & (frame <= cfg.black_level)], minlength=n)
    share = ring_black / np.maximum(ring_px, 1)
    lo, hi = cfg.overlay_rim_band
    return (share > lo) & (share < hi)


def _components(cand: np.ndarray, run: int) -> tuple[int, np.ndarray]:
    """Connected components of ``cand`` (uint8 0/1), with straight horizontal and vertical runs of ``run``
    px and more (a depth scale, a box edge) labelled apart from what touches them, so that glyphs written
    against the depth scale are judged as glyphs and the scale as a line. Only components at least ``run``
    px long can hold such a run; only their boxes are searched."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(cand, connectivity=8)  # x, y, w, h, area
    long_ = np.flatnonzero(np.maximum(stats[1:, 2], stats[1:, 3]) >= run) + 1
    v_line = cv2.getStructuringElement(cv2.MORPH_RECT, (1, run))
    h_line = cv2.getStructuringElement(cv2.MORPH_RECT, (run, 1))
    for i in long_:
        x, y, w, h = stats[i, :4]
        box = labels[y : y + h, x : x + w]
        part = (box == i).view(np.uint8)
        runs = cv2.morphologyEx(part, cv2.MORPH_OPEN, v_line) | cv2.morphologyEx(part, cv2.MORPH_OPEN, h_line)
        if not runs.any():
            continue
        rest = part & (1 - runs)
        k, rest_labels = cv2.connectedComponents(rest, connectivity=8)
        k_runs, run_labels = cv2.connectedComponents(runs, connectivity=8)
        # The component keeps its label for its first remaining piece; the others get new ones.
        new = np.zeros_like(box)
        new[rest > 0] = np.where(rest_labels[rest > 0] == 1, i, rest_labels[rest > 0] - 2 + n)
        n += max(0, k - 2)
        new[runs > 0] = run_labels[runs > 0] - 1 + n
        n += k_runs - 1
        box[part > 0] = new[part > 0]
    return n, labels


def overlay_mask(frame: np.ndarray, cfg: CleanConfig | None = None) -> np.ndarray:
    """Burnt-in overlays (text, calipers, markers, dotted lines, tick marks): bool HxW, already dilated.

    A pixel is a candidate when it is bright and clearly brighter than its surroundings at the scale of a
    stroke (white top-hat with a square of side 2*stroke+1: anything thicker, such as skull bone, is left
    alone). A connected group of candidates is kept when much of it lies at a pixel-sharp edge and it is
    small (a glyph, marker, dot) or line-thin (a caliper or cursor line); bright anatomy and colour-Doppler
    blobs are neither.
    """
    cfg = cfg or CleanConfig()
    frame = _as_gray8(frame)
    h, w = frame.shape
    tophat = cv2.morphologyEx(frame, cv2.MORPH_TOPHAT, _rect(2 * cfg.overlay_stroke_px + 1))
    cand = (tophat >= cfg.overlay_min_tophat) & (frame >= cfg.overlay_min_level)
    if not cand.any():
        return np.zeros((h, w), bool)
    # Statistics and the keep decision are gathered on candidate pixels only (they are sparse).
    n, labels = _components(cand.view(np.uint8), max(cfg.overlay_run_px, max(h, w) // 16))
    points = cv2.findNonZero(cand.view(np.uint8)).reshape(-1, 2)  # several times faster than np.nonzero
    xs, ys = points[:, 0], points[:, 1]
    cand_labels = labels[ys, xs]
    area = np.bincount(cand_labels, minlength=n)
    sharp = np.bincount(cand_labels[_sharp_edges(frame, cfg.overlay_min_step)[ys, xs]], minlength=n)
    length = np.maximum(_extent(cand_labels, xs, n), _extent(cand_labels, ys, n))
    # A glyph, marker or dot is small; a line is long but ~1 px thick (area / length). A specular echo can
    # be as thin as 3-5 px and show a sharp step where it meets the black margin, but it is neither small
    # nor line-thin, and only its rim is sharp, not most of its pixels.
    keep = sharp >= cfg.overlay_min_sharp_fraction * area
    keep &= (area <= cfg.overlay_small_area) | (area <= cfg.overlay_line_px * length)
    keep &= area <= cfg.overlay_max_area * h * w
    keep[0] = False
    rim = keep & _on_fan_rim(frame, labels, n, cfg)
    keep &= ~rim
    mask = np.zeros((h, w), np.uint8)
    mask[ys, xs] = keep[cand_labels]
    if rim.any() and keep.any():
        # A glyph of a line that crosses the fan's edge also lies part on black, part on echo; it is kept
        # when its line (glyphs at most ``overlay_line_gap_px`` apart on the same rows) holds a glyph that
        # passed the rim test.
        g = cfg.overlay_line_gap_px
        both = np.zeros((h, w), np.uint8)
        both[ys, xs] = (keep | rim)[cand_labels]
        lines = cv2.dilate(both, cv2.getStructuringElement(cv2.MORPH_RECT, (g + 1, 1)), anchor=(0, 0))
        _, line_labels = cv2.connectedComponents(lines, connectivity=4)
        line_of = line_labels[ys, xs]
        sure = np.zeros(int(line_labels.max()) + 1, bool)
        sure[line_of[keep[cand_labels]]] = True
        rescued = rim[cand_labels] & sure[line_of]
        mask[ys[rescued], xs[rescued]] = 1
    if cfg.overlay_dilate_px > 0:
        mask = cv2.dilate(mask, _rect(2 * cfg.overlay_dilate_px + 1))
    return mask.astype(bool)


def colour_mask(chroma: np.ndarray | None, cfg: CleanConfig | None = None) -> np.ndarray | None:
    """Colour overlays from a chroma map (``ColourFrame.chroma``: max - min of R, G, B): bool HxW, dilated,
    or None without a chroma map.

    Echo is gray on every scanner; what carries colour is drawn on it: the colour-Doppler box and its
    flow map, coloured measurement text, markers and traces. Their gray level after the luma conversion is
    anywhere between black and white, so nothing in the gray frame tells them from tissue; their chroma
    does. Groups smaller than ``colour_min_area`` px are dropped (chroma noise of lossy compression along
    sharp edges).
    """
    if chroma is None:
        return None
    cfg = cfg or CleanConfig()
    coloured = (np.asarray(chroma) >= cfg.colour_min_chroma).view(np.uint8)
    if not coloured.any():
        return np.zeros(coloured.shape, bool)
    h = coloured.shape[0]
    if h <= _COLOUR_STRIPE_ROWS:
        return _colour_rows(coloured, cfg)
    # A large frame goes in stripes of rows, each with enough rows around it that its result is the whole
    # frame's: a component of at least colour_min_area px has that many within colour_min_area - 1 rows
    # of any of its pixels, and the dilation reaches colour_dilate_px rows. The labels (4 bytes a pixel)
    # then exist for one stripe at a time, not for a 50-megapixel frame.
    halo = max(cfg.colour_min_area - 1, 0) + cfg.colour_dilate_px
    out = np.empty(coloured.shape, bool)
    for r0 in range(0, h, _COLOUR_STRIPE_ROWS):
        r1 = min(r0 + _COLOUR_STRIPE_ROWS, h)
        a, b = max(0, r0 - halo), min(h, r1 + halo)
        out[r0:r1] = _colour_rows(coloured[a:b], cfg)[r0 - a : r1 - a]
    return out


_COLOUR_STRIPE_ROWS = 512


def _colour_rows(coloured: np.ndarray, cfg: CleanConfig) -> np.ndarray:
    """colour_mask's area filter and dilation on uint8 0/1 rows."""
    if cfg.colour_min_area > 1:
        n, labels, stats, _ = cv2.connectedComponentsWithStats(coloured, connectivity=8)
        big = stats[:, cv2.CC_STAT_AREA] >= cfg.colour_min_area
        big[0] = False
        coloured = big[labels].view(np.uint8)
    if cfg.colour_dilate_px > 0:
        coloured = cv2.dilate(coloured, _rect(2 * cfg.colour_dilate_px + 1))
    return coloured.astype(bool)


def _large_areas(mask: np.ndarray, cfg: CleanConfig) -> np.ndarray:
    """Components of ``mask`` that are neither small nor line-thin (the overlay test's shape rule)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
    area = stats[:, cv2.CC_STAT_AREA]
    length = np.maximum(stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT])
    large = (area > cfg.overlay_small_area) & (area > cfg.overlay_line_px * length)
    large[0] = False
    return large[labels]


def black_box_mask(frame: np.ndarray, cfg: CleanConfig | None = None) -> np.ndarray:
    """Flat black areas that hold a ``black_box_px`` square: anonymisation boxes and the empty margins.

    Speckle never stays at exact black over such a square, so what remains after the opening is paint, not
    anatomy: it is outside the image and is neither inpainted nor counted as fan.
    """
    cfg = cfg or CleanConfig()
    dark = (_as_gray8(frame) <= cfg.black_level).astype(np.uint8)
    return cv2.morphologyEx(dark, cv2.MORPH_OPEN, _rect(cfg.black_box_px)).astype(bool)


def fan_mask(
    frame: np.ndarray, cfg: CleanConfig | None = None, overlays: np.ndarray | None = None
) -> np.ndarray:
    """The ultrasound sector/fan: bool HxW; the whole frame when no convincing region is found.

    Call it at work resolution (a few hundred px): its kernel sizes are meant for that scale. Pixels in
    ``overlays`` (bool HxW) do not count as echo: text and scale marks that touch the fan would otherwise
    join its region and stretch its hull over the margin where they stand.
    """
    cfg = cfg or CleanConfig()
    frame = _as_gray8(frame)
    h, w = frame.shape
    side = max(h, w)
    echo_src = frame if overlays is None else np.where(overlays, np.uint8(0), frame)
    blur = cv2.blur(echo_src, (5, 5))
    echo = (blur > cfg.fan_level).astype(np.uint8)
    if overlays is not None:
        # A caliper line blanked across the fan must not cut it in two: blanked pixels that a closing of
        # the echo covers (holes and channels a few px wide inside it) are echo again.
        closed = cv2.morphologyEx(echo, cv2.MORPH_CLOSE, _rect(max(9, side // 30 | 1)))
        echo |= closed & overlays.view(np.uint8)
    # Opening detaches thin things that touch the fan (text, the gray-scale bar) so they do not join it.
    k_open = max(3, side // 100 | 1)
    echo = cv2.morphologyEx(echo, cv2.MORPH_OPEN, _rect(k_open))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(echo, connectivity=4)
    if n <= 1:
        return np.ones((h, w), bool)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    if stats[largest, cv2.CC_STAT_AREA] < cfg.fan_min_fraction * h * w:
        return np.ones((h, w), bool)
    # Sectors, linear and curvilinear fields of view are convex (the near-field arc of a curvilinear probe
    # adds only a sliver of black), so the hull fills low-echo parts of the image that thresholding missed.
    region = (labels == largest).astype(np.uint8)
    contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    fan = np.zeros((h, w), np.uint8)
    cv2.fillConvexPoly(fan, cv2.convexHull(np.concatenate(contours)), 1)
    # The hull spans the notches that anonymisation boxes cut into the fan: take them out again.
    fan = fan.astype(bool) & ~black_box_mask(frame, cfg)
    if fan.sum() < cfg.fan_min_fraction * h * w:
        return np.ones((h, w), bool)
    return fan


# --------------------------------------------------------------------------------------------- inpaint
def inpaint(frame: np.ndarray, mask: np.ndarray, cfg: CleanConfig | None = None) -> np.ndarray:
    """Fill ``mask`` from its surroundings.

    Telea's fast-marching method is the default: it fills each masked pixel from a distance-weighted average
    of known pixels nearby, which on 1-5 px strokes cannot be told from Navier-Stokes by eye, and it is
    cheaper. Navier-Stokes propagates isophotes (edges) into the hole; that only pays off on wide masks
    crossing strong edges, which overlays are not. 'ns' stays available for such data.
    """
    cfg = cfg or CleanConfig()
    frame = _as_gray8(frame)
    m = np.ascontiguousarray(mask, dtype=np.uint8)
    if not m.any():
        return frame.copy()
    flag = cv2.INPAINT_TELEA if cfg.inpaint_method == "telea" else cv2.INPAINT_NS
    return cv2.inpaint(frame, m, float(cfg.inpaint_radius), flag)


# ----------------------------------------------------------------------------------------------- clean
def _as_gray8(frame: np.ndarray) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 2:
        raise ValueError("clean expects a uint8 HxW gray frame (as decode_image returns)")
    return np.ascontiguousarray(frame)


def _resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    if (width, height) == (img.shape[1], img.shape[0]):
        return img
    shrink = width <= img.shape[1] and height <= img.shape[0]
    # INTER_AREA averages when shrinking (no aliasing of speckle); it degenerates to nearest when enlarging,
    # so enlarging (a frame smaller than the target) uses bilinear instead.
    return cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _fit(shape: tuple[int, int], side: int) -> tuple[int, int]:
    """(width, height) that fit ``shape`` into ``side`` on its longest edge, never enlarging."""
    h, w = shape
    s = min(1.0, side / max(h, w))
    return max(1, round(w * s)), max(1, round(h * s))


def remove_overlays(
    frame: np.ndarray,
    cfg: CleanConfig | None = None,
    *,
    full_resolution: bool = False,
    chroma: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1-4 of :func:`clean_frame`: (frame with overlays inpainted and black outside the fan, fan).

    At ``work_size`` (what :func:`clean_frame` uses), or at the frame's own resolution with
    ``full_resolution`` (for looking at, and for OCR checks of what cleaning leaves). ``chroma`` defaults
    to the frame's own (a :class:`service.decode.ColourFrame` from a colour file).
    """
    cfg = cfg or CleanConfig()
    if chroma is None:
        chroma = getattr(frame, "chroma", None)
    frame = _as_gray8(frame)
    if chroma is not None and np.shape(chroma) != frame.shape:
        raise ValueError("the chroma map must have the frame's shape")
    size = _fit(frame.shape, cfg.mask_max_side)
    frame = _resize(frame, *size)
    overlays = overlay_mask(frame, cfg)
    not_echo = overlays.copy()  # what the fan search leaves out
    colour = colour_mask(chroma, cfg)
    if colour is not None:
        if colour.shape != frame.shape:
            colour = _resize(colour.view(np.uint8) * 255, *size) > 0
        overlays |= colour
        # A colour-Doppler map lies on the image, often at its edge: it counts as fan. Coloured text,
        # markers and box outlines (small or line-thin) are left out of the search like gray overlays.
        not_echo |= colour & ~_large_areas(colour, cfg)

    ww, wh = _fit(frame.shape, max(cfg.work_size, cfg.size))  # never work below the output size
    work = _resize(frame, ww, wh)
    # Area-shrinking the mask and keeping any coverage keeps every partly covered work pixel masked.
    work_overlays = _resize(overlays.astype(np.uint8) * 255, ww, wh) > 0
    fan = fan_mask(work, cfg, _resize(not_echo.astype(np.uint8) * 255, ww, wh) > 0)
    # A bright echo against the black margin also shows a pixel-sharp step; the fan's outer rim is
    # therefore left alone (inpainting it would only pull black inwards).
    inner = cv2.erode(fan.view(np.uint8), _rect(3)).view(bool)
    if full_resolution and (ww, wh) != (frame.shape[1], frame.shape[0]):
        h, w = frame.shape
        fan = cv2.resize(fan.view(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).view(bool)
        inner = cv2.resize(inner.view(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).view(bool)
        work, work_overlays = frame, overlays
    work = inpaint(work, work_overlays & inner, cfg)
    work[~fan] = 0
    return work, fan


def clean_frame(frame: np.ndarray, cfg: CleanConfig | None = None) -> np.ndarray:
    """Gray frame -> cleaned uint8 (size, size): overlays inpainted, fan cropped, padded square, resized.

    A :class:`service.decode.ColourFrame` brings its chroma map: its colour overlays are inpainted too.
    """
    cfg = cfg or CleanConfig()
    work, fan = remove_overlays(frame, cfg)
    ys, xs = np.nonzero(fan)
    work = work[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = work.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    square = np.zeros((side, side), np.uint8)
    square[top : top + h, left : left + w] = work
    return _resize(square, cfg.size, cfg.size)


def normalize(img: np.ndarray, cfg: CleanConfig | None = None) -> np.ndarray:
    """uint8 (size, size) -> float32 (1, size, size) = (x / 255 - mean) / std."""
    cfg = cfg or CleanConfig()
    x = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    x = (x - np.float32(cfg.mean)) / np.float32(cfg.std)
    return np.ascontiguousarray(x[None, :, :], dtype=np.float32)


def preprocess(frame: np.ndarray, cfg: CleanConfig | None = None) -> np.ndarray:
    """The model input for one decoded frame: float32 (1, size, size). Training and serving both call this."""
    cfg = cfg or CleanConfig()
    return normalize(clean_frame(frame, cfg), cfg)
