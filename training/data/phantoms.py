"""Synthetic fetal-ultrasound phantoms with known views and subjects: multi-view test and experiment data,
with burnt-in overlays (text, calipers, scale bar) and the exact mask of every overlay pixel.

Pure numpy + OpenCV + pydicom, so service-side tests can use it without torch.
"""

from __future__ import annotations

import argparse
import csv
import math
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from service.taxonomy import PHANTOM_VIEWS

# Annotation a sonographer types on each plane; drawn only when the caller asks the text to name the view.
VIEW_ANNOTATION: dict[str, str] = {
    "brain": "HC",
    "abdomen": "AC",
    "femur": "FL",
    "thorax_4ch": "4CH",
    "spine": "SPINE",
    "profile": "PROFILE",
    "kidneys": "KIDNEYS",
    "cervix": "CERVIX",
}
# Bump when the images a seed produces change, so cached phantom sets are regenerated.
GENERATOR_VERSION = 3
# The views drawn, in the order they are planned (service/taxonomy.py).
VIEWS: tuple[str, ...] = PHANTOM_VIEWS
assert tuple(VIEW_ANNOTATION) == VIEWS

# Echo strengths (linear amplitude before log compression). Ratios matter, not units: fluid ~ -54 dB,
# soft tissue ~ -23 dB, interfaces ~ -12 dB, bone ~ 0 dB, as on a real B-mode image.
FLUID = 0.002
BRAIN = 0.035
SOFT = 0.07
ORGAN = 0.1
WALL = 0.25
BONE = 1.0

_SHIFT = 4  # fixed-point bits for OpenCV drawing, so shapes land on sub-pixel positions
_ONE = 1 << _SHIFT
_MACHINES = (
    "SONOVIEW E8",
    "ECHOLINE 7",
    "UltraFan S3",
    "PHANTOM-US 2",
    "Vistara V10",
    "MEDIVUE X",
    "NovaScan",
)
_PROBES = ("C5-1", "C1-6", "RAB6", "C2-9", "CA4", "L12-5", "IC5-9")


@dataclass(frozen=True)
class PhantomConfig:
    """How phantoms are drawn. Probabilities are per image."""

    size: tuple[int, int] = (240, 320)  # (H, W)
    text_names_view: bool = False  # burn the view's annotation ("HC", "4CH", ...) into the image text
    overlays: bool = True
    p_linear: float = 0.15  # rectangular (linear probe) field instead of a sector
    p_calipers: float = 0.6
    p_scale_bar: float = 0.85
    p_logo: float = 0.4
    p_anonymise: float = 0.2  # black box over the header, as de-identification tools leave it

    def __post_init__(self) -> None:
        h, w = self.size
        if h < 64 or w < 64:
            raise ValueError(f"phantom size {self.size} is too small; use at least 64x64")


@dataclass
class Phantom:
    """One synthetic frame: `image` = `clean` with overlays burnt in exactly where `overlay_mask` is set."""

    image: np.ndarray  # uint8 HxW
    overlay_mask: np.ndarray  # bool HxW
    label: str
    subject: str
    text: list[str]  # every string drawn, in drawing order
    clean: np.ndarray = field(repr=False)  # uint8 HxW before overlays: ground truth for inpainting
    fan_mask: np.ndarray = field(repr=False)  # bool HxW, the imaged field


# ---------------------------------------------------------------------------------------------- subject style


@dataclass(frozen=True)
class _Style:
    """What stays fixed for one subject: same machine, same presets, same patient habitus."""

    seed: int
    machine: str
    probe: str
    gain_db: float
    dyn_range: float
    gamma: float
    tissue: float
    tex_amp: float
    tex_cell: int
    speckle_axial: float
    speckle_lateral: float
    attenuation: float
    tgc_db: tuple[float, ...]
    smooth: float
    text_value: int
    graphic_value: int
    antialias: bool
    params_right: bool
    marker: str
    date: str


@lru_cache(maxsize=8192)
def _subject_style(subject: str) -> _Style:
    seed = zlib.crc32(subject.encode())
    r = np.random.default_rng([seed, 17])
    year, month, day = 2019 + int(r.integers(0, 6)), int(r.integers(1, 13)), int(r.integers(1, 29))
    date = (
        f"{day:02d}/{month:02d}/{year}",
        f"{year}-{month:02d}-{day:02d}",
        f"{month:02d}/{day:02d}/{year % 100:02d}",
    )
    return _Style(
        seed=seed,
        machine=str(r.choice(_MACHINES)),
        probe=str(r.choice(_PROBES)),
        gain_db=float(r.uniform(-4, 4)),
        dyn_range=float(r.uniform(48, 66)),
        gamma=float(r.uniform(0.8, 1.25)),
        tissue=float(r.uniform(0.035, 0.075)),
        tex_amp=float(r.uniform(0.15, 0.45)),
        tex_cell=int(r.integers(6, 20)),
        speckle_axial=float(r.uniform(0.6, 1.1)),
        speckle_lateral=float(r.uniform(0.7, 1.4)),
        attenuation=float(r.uniform(0.8, 2.0)),
        tgc_db=tuple(float(v) for v in r.normal(0, 2.5, size=5)),
        smooth=float(r.uniform(0.0, 0.9)),
        text_value=int(r.integers(205, 256)),
        graphic_value=int(r.integers(215, 256)),
        antialias=bool(r.random() < 0.4),
        params_right=bool(r.random() < 0.5),
        marker=str(r.choice(["+", "x"])),
        date=str(r.choice(date)),
    )


@lru_cache(maxsize=2048)
def _subject_texture(subject: str, h: int, w: int) -> np.ndarray:
    """Coarse noise covering twice the frame: each image of a subject crops its own window of it."""
    style = _subject_style(subject)
    c = style.tex_cell
    return np.random.default_rng([style.seed, 29]).standard_normal(
        (2 * h // c + 3, 2 * w // c + 3), np.float32
    )


def _texture_window(rng: np.random.Generator, subject: str, h: int, w: int) -> np.ndarray:
    coarse = _subject_texture(subject, h, w)
    ch, cw = (coarse.shape[0] - 1) // 2, (coarse.shape[1] - 1) // 2
    oy, ox = int(rng.integers(0, coarse.shape[0] - ch)), int(rng.integers(0, coarse.shape[1] - cw))
    return cv2.resize(coarse[oy : oy + ch, ox : ox + cw], (w, h), interpolation=cv2.INTER_CUBIC)


# ---------------------------------------------------------------------------------------------- fan geometry


@dataclass
class _Fan:
    """The imaged field and the two remaps between the beam grid (depth x angle) and the frame."""

    linear: bool
    apex: tuple[float, float]  # (x, y); for a linear field, the top-left corner
    r0: float
    r1: float
    half: float  # half sector angle (rad); for a linear field, half the width in pixels
    beam_x: np.ndarray  # beam grid -> frame x (HxW float32)
    beam_y: np.ndarray
    frame_x: np.ndarray  # frame -> beam-grid column
    frame_y: np.ndarray  # frame -> beam-grid row
    mask: np.ndarray

    def to_frame(self, depth_frac: float, lateral_frac: float) -> tuple[float, float]:
        """Frame point at a fraction of the depth range and of the lateral extent (-1..1)."""
        r = self.r0 + depth_frac * (self.r1 - self.r0)
        if self.linear:
            return self.apex[0] + self.half * (1 + lateral_frac), self.apex[1] + r
        t = lateral_frac * self.half
        return self.apex[0] + r * math.sin(t), self.apex[1] + r * math.cos(t)


def _beams(w: int) -> int:
    """Beam-grid columns: half the frame width, since lateral resolution is coarser than axial, and it halves
    the cost of every step on the beam grid."""
    return max(32, w // 2)


@lru_cache(maxsize=8)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    ii, jj = np.mgrid[0:h, 0:w].astype(np.float32)
    ii.flags.writeable = jj.flags.writeable = False
    return ii, jj


def _make_fan(rng: np.random.Generator, h: int, w: int, linear: bool) -> _Fan:
    top = rng.uniform(0.04, 0.13) * h
    bottom = h - rng.uniform(0.0, 0.07) * h
    nt = _beams(w)
    ys, xs = _grid(h, w)
    rows = np.arange(h, dtype=np.float32)[:, None]
    cols = np.arange(nt, dtype=np.float32)[None, :]
    if linear:
        x0 = rng.uniform(0.1, 0.25) * w
        x1 = w - rng.uniform(0.1, 0.25) * w
        apex, r0, r1, half = (x0, 0.0), top, bottom, (x1 - x0) / 2
        beam_x = np.broadcast_to(x0 + cols * ((x1 - x0) / (nt - 1)), (h, nt))
        beam_y = np.broadcast_to(r0 + rows * ((r1 - r0) / (h - 1)), (h, nt))
        frame_x = (xs - x0) * ((nt - 1) / (x1 - x0))
        frame_y = (ys - r0) * ((h - 1) / (r1 - r0))
    else:
        # A phased array has its apex on the skin line; a convex probe a virtual apex above it.
        depth_apex = rng.uniform(2, 8) if rng.random() < 0.25 else rng.uniform(0.1, 0.6) * h
        ax = w / 2 + rng.uniform(-0.04, 0.04) * w
        ay = top - depth_apex
        r0, r1 = depth_apex, bottom - ay
        room = min(ax, w - ax) - 2
        half = min(math.radians(rng.uniform(28, 44)), math.asin(min(1.0, room / r1)))
        apex = (ax, ay)
        rr = r0 + rows * ((r1 - r0) / (h - 1))
        tt = -half + cols * (2 * half / (nt - 1))
        beam_x = ax + rr * np.sin(tt)
        beam_y = ay + rr * np.cos(tt)
        dx, dy = np.float32(ax) - xs, np.float32(ay) - ys
        # Angle of (-dy, -dx) is the beam angle plus pi: no wrap-around inside the sector, and cv2 is ~20x
        # faster than arctan2 here.
        frame_x = cv2.phase(dy, dx)
        frame_x -= math.pi - half
        frame_x *= (nt - 1) / (2 * half)
        frame_y = cv2.magnitude(dx, dy)
        frame_y -= r0
        frame_y *= (h - 1) / (r1 - r0)
    inside = cv2.bitwise_and(cv2.inRange(frame_y, 0, h - 1), cv2.inRange(frame_x, 0, nt - 1))
    mask = inside > 0
    # Far outside the beam grid, so the final remap writes exact zeros outside the field: no masking pass.
    frame_x = cv2.copyTo(frame_x.astype(np.float32), inside, np.full((h, w), -10.0, np.float32))
    return _Fan(
        linear,
        apex,
        float(r0),
        float(r1),
        float(half),
        beam_x.astype(np.float32),
        beam_y.astype(np.float32),
        frame_x.astype(np.float32),
        frame_y.astype(np.float32),
        mask,
    )


# ---------------------------------------------------------------------------------------------- drawing


@lru_cache(maxsize=512)
def _unit_arc(t0: float, t1: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    t = np.radians(np.linspace(t0, t1, n))
    return np.cos(t), np.sin(t)


def _ellipse(
    cx: float,
    cy: float,
    a: float,
    b: float,
    ang: float = 0.0,
    t0: float = 0.0,
    t1: float = 360.0,
    n: int = 48,
) -> np.ndarray:
    """Points of an ellipse (or an arc of it), angles in degrees, in whatever frame the caller draws in."""
    ct, st = _unit_arc(float(t0), float(t1), n)
    c, s = math.cos(math.radians(ang)), math.sin(math.radians(ang))
    pts = np.empty((n, 2))
    pts[:, 0] = cx + (c * a) * ct - (s * b) * st
    pts[:, 1] = cy + (s * a) * ct + (c * b) * st
    return pts


def _smooth_poly(pts: np.ndarray, iterations: int = 2) -> np.ndarray:
    """Corner cutting, so hand-placed profile points become a soft outline."""
    for _ in range(iterations):
        a, b = pts, np.roll(pts, -1, axis=0)
        pts = np.stack([0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b], axis=1).reshape(-1, 2)
    return pts


class _Painter:
    """Draws shapes given in an anatomy's own frame (unit = body radius) onto the scene.

    The scene has three channels: echo strength, coverage (background tissue shows where nothing was drawn),
    and acoustic opacity (bone casts a shadow along the beam).
    """

    def __init__(
        self,
        scene: np.ndarray,
        rng: np.random.Generator,
        cx: float,
        cy: float,
        scale: float,
        rot: float = 0.0,
        flip: bool = False,
    ) -> None:
        self.scene, self.rng, self.scale = scene, rng, scale
        c, s = math.cos(rot), math.sin(rot)
        f = -1.0 if flip else 1.0
        self.m = np.array([[c * f, -s], [s * f, c]]) * scale
        self.t = np.array([cx, cy])

    def frame(self, pts: np.ndarray) -> np.ndarray:
        return np.asarray(pts, dtype=np.float64) @ self.m.T + self.t

    def _fixed(self, pts: np.ndarray) -> np.ndarray:
        return np.round(self.frame(pts) * _ONE).astype(np.int32)

    def _value(self, v: float, bone: float) -> tuple[float, float, float]:
        # Each structure varies in brightness a little from image to image, as tissue and presets do.
        return (v * math.exp(self.rng.normal(0.0, 0.18)), 1.0, bone)

    def fill(self, pts: np.ndarray, v: float, bone: float = 0.0) -> None:
        cv2.fillPoly(self.scene, [self._fixed(pts)], self._value(v, bone), cv2.LINE_8, _SHIFT)

    def stroke(
        self, pts: np.ndarray, v: float, width: float, bone: float = 0.0, closed: bool = False
    ) -> None:
        thick = max(1, round(width * self.scale))
        cv2.polylines(self.scene, [self._fixed(pts)], closed, self._value(v, bone), thick, cv2.LINE_8, _SHIFT)

    def blob(
        self, cx: float, cy: float, a: float, b: float, v: float, ang: float = 0.0, bone: float = 0.0
    ) -> None:
        self.fill(_ellipse(cx, cy, a, b, ang, n=28), v, bone)

    def u(self, lo: float, hi: float) -> float:
        return float(self.rng.uniform(lo, hi))


def _spine_triad(p: _Painter, x: float, y: float, size: float = 1.0) -> None:
    """Axial vertebra: body and two laminae, the bright triangle behind every transverse fetal section."""
    p.blob(x, y, 0.08 * size, 0.07 * size, BONE, bone=0.9)
    p.blob(x - 0.12 * size, y + 0.14 * size, 0.05 * size, 0.06 * size, BONE, ang=-30, bone=0.9)
    p.blob(x + 0.12 * size, y + 0.14 * size, 0.05 * size, 0.06 * size, BONE, ang=30, bone=0.9)


def _ribs(p: _Painter, a: float, b: float, n: int) -> None:
    for start in p.rng.uniform(0, 360, size=n):
        p.stroke(_ellipse(0, 0, a, b, t0=start, t1=start + p.u(8, 18), n=6), BONE * 0.6, 0.045, bone=0.7)


Landmarks = dict[str, list]  # "pairs": [(p, q), ...], "ellipses": [(cx, cy, a, b, deg)] in the anatomy frame


def _draw_brain(p: _Painter) -> Landmarks:
    a, b = 1.0, p.u(0.76, 0.86)
    p.blob(0, 0, a, b, BRAIN)
    # Skull drawn as arcs so the two bright bone lines look uneven, like real parietal bones.
    for t0 in range(0, 360, 30):
        p.stroke(_ellipse(0, 0, a, b, t0=t0, t1=t0 + 31, n=6), BONE, p.u(0.055, 0.09), bone=0.55)
    p.stroke(np.array([[-0.93 * a, 0.0], [0.2, 0.0]]), WALL * 0.7, 0.018)
    p.stroke(np.array([[0.5, 0.0], [0.93 * a, 0.0]]), WALL * 0.7, 0.018)
    # Cavum septi pellucidi: the small fluid box that interrupts the falx in the front third.
    p.fill(np.array([[0.22, -0.06], [0.48, -0.07], [0.48, 0.07], [0.22, 0.06]]), FLUID * 2)
    for side in (-1, 1):
        p.stroke(np.array([[0.22, side * 0.065], [0.48, side * 0.075]]), WALL * 0.6, 0.015)
        p.blob(-0.45, side * 0.24, 0.24, 0.085, FLUID, ang=side * 12)  # atrium of the lateral ventricle
        p.blob(-0.48, side * 0.24, 0.13, 0.055, WALL * 0.9, ang=side * 12)  # choroid plexus
        p.blob(0.48, side * 0.15, 0.11, 0.04, FLUID * 1.5, ang=-side * 15)  # frontal horn
        p.blob(0.0, side * 0.17, 0.17, 0.11, BRAIN * 1.4)  # thalamus
        p.stroke(_ellipse(0.05, side * 0.62 * b, 0.16, 0.06, t0=0, t1=180, n=10), WALL * 0.5, 0.02)  # insula
    return {"pairs": [((0.0, -b), (0.0, b)), ((-a, 0.0), (a, 0.0))], "ellipses": [(0.0, 0.0, a, b, 0.0)]}


def _draw_abdomen(p: _Painter) -> Landmarks:
    a, b = 1.0, p.u(0.85, 0.97)
    p.blob(0, 0, a, b, ORGAN * 0.9)
    p.stroke(_ellipse(0, 0, a, b), WALL * 0.6, 0.03, closed=True)
    _ribs(p, 0.9 * a, 0.9 * b, int(p.rng.integers(2, 5)))
    p.blob(-0.38, p.u(-0.1, 0.15), p.u(0.2, 0.32), p.u(0.14, 0.22), FLUID, ang=p.u(0, 40))  # stomach bubble
    vein = np.array([[0.14, -0.95 * b], [0.14, -0.6], [0.05, -0.25], [-0.1, -0.05]])
    p.stroke(vein, FLUID * 1.5, p.u(0.06, 0.1))  # umbilical vein, the "hockey stick"
    p.blob(0.1, 0.5 * b, 0.06, 0.06, FLUID)  # aorta
    p.blob(0.32, 0.3, 0.12, 0.05, FLUID * 2, ang=70)  # gall bladder
    _spine_triad(p, 0.0, 0.74 * b)
    return {"pairs": [((0.0, -b), (0.0, b)), ((-a, 0.0), (a, 0.0))], "ellipses": [(0.0, 0.0, a, b, 0.0)]}


def _draw_femur(p: _Painter) -> Landmarks:
    if p.rng.random() < 0.6:  # the hip or lower trunk beside the thigh
        p.blob(-1.6, p.u(-0.2, 0.6), p.u(0.6, 0.9), p.u(0.8, 1.1), SOFT * 1.2)
    p.blob(0.1, 0.0, p.u(1.15, 1.35), p.u(0.35, 0.5), SOFT)
    for off in (-0.2, 0.22):
        p.stroke(np.array([[-0.9, off], [0.9, off + p.u(-0.05, 0.05)]]), WALL * 0.4, 0.02)  # muscle fascia
    bow = p.u(-0.06, 0.06)
    shaft = np.array([[-0.9, 0.0], [0.0, bow], [0.9, 0.0]])
    p.stroke(shaft, BONE * 1.2, p.u(0.07, 0.11), bone=1.0)
    for x in (-0.98, 0.98):
        p.blob(x, 0.0, 0.09, 0.1, BRAIN)  # cartilaginous ends stay dark
    if p.rng.random() < 0.5:  # lower leg folded at the knee
        p.blob(1.35, 0.45, 0.55, 0.22, SOFT, ang=45)
        p.stroke(np.array([[1.08, 0.12], [1.7, 0.75]]), BONE, 0.06, bone=0.9)
    return {"pairs": [((-0.9, 0.0), (0.9, 0.0))], "ellipses": []}


def _draw_thorax_4ch(p: _Painter) -> Landmarks:
    a, b = 1.0, p.u(0.85, 0.97)
    p.blob(0, 0, a, b, ORGAN * 1.1)  # lungs are evenly echogenic
    p.stroke(_ellipse(0, 0, a, b), WALL * 0.6, 0.03, closed=True)
    _ribs(p, 0.92 * a, 0.92 * b, int(p.rng.integers(3, 7)))
    _spine_triad(p, 0.0, 0.74 * b)
    p.blob(-0.14, 0.52 * b, 0.07, 0.07, FLUID)  # descending aorta
    # The heart sits left-anterior with its apex pointing about 45 degrees off the midline.
    hx, hy, hang = p.u(-0.25, -0.05), p.u(-0.3, -0.1), math.radians(p.u(-150, -110))
    size = p.u(0.48, 0.6)
    c, s = math.cos(hang), math.sin(hang)

    def heart(pts: np.ndarray) -> np.ndarray:
        pts = np.asarray(pts, dtype=np.float64) * size
        return np.stack([hx + c * pts[:, 0] - s * pts[:, 1], hy + s * pts[:, 0] + c * pts[:, 1]], axis=1)

    p.fill(heart(_ellipse(0, 0, 1.0, 0.8)), SOFT * 0.7)
    p.stroke(heart(_ellipse(0, 0, 1.0, 0.8)), WALL * 0.8, 0.03, closed=True)  # pericardium
    # Four dark chambers; the myocardium left between them is the cross of the septa and the AV valves.
    for w in (-1, 1):
        p.fill(heart(_ellipse(0.36, w * 0.32, 0.48, p.u(0.22, 0.28), ang=-w * 6, n=28)), FLUID)  # ventricles
        p.fill(heart(_ellipse(-0.52, w * 0.32, 0.34, p.u(0.22, 0.28), n=28)), FLUID)  # atria
        p.stroke(heart(np.array([[-0.15, w * 0.1], [-0.15, w * 0.55]])), WALL * 0.5, 0.012)  # AV valves
    return {
        "pairs": [(tuple(heart([[-0.8, 0.0]])[0]), tuple(heart([[0.9, 0.0]])[0])), ((-a, 0.0), (a, 0.0))],
        "ellipses": [(0.0, 0.0, a, b, 0.0)],
    }


def _draw_spine(p: _Painter) -> Landmarks:
    bend = p.u(-0.12, 0.12)
    xs = np.linspace(-1.5, 1.5, 25)
    ys = bend * xs**2
    back = np.stack([xs, ys - 0.28], axis=1)
    belly = np.stack([xs[::-1], ys[::-1] + p.u(0.7, 1.0)], axis=1)
    p.fill(np.concatenate([back, belly]), SOFT)
    p.stroke(back, WALL * 0.7, 0.03)  # skin over the back
    p.stroke(np.stack([xs, ys], axis=1), FLUID * 2, 0.09)  # spinal canal
    n = int(p.rng.integers(12, 17))
    sacrum = 1 if p.rng.random() < 0.5 else -1
    for k in range(n):
        x = -1.35 + 2.7 * k / (n - 1)
        taper = 1.0 - 0.45 * max(0.0, sacrum * x - 0.6) / 0.75  # the two lines converge at the sacrum
        y = bend * x * x
        for side in (-1, 1):
            p.blob(x, y + side * 0.085 * taper, 0.045, 0.03, BONE, ang=p.u(-10, 10), bone=0.6)
        p.blob(x, y + 0.24 * taper, 0.06, 0.05, WALL * 1.4, bone=0.3)  # vertebral bodies, weaker
    return {"pairs": [((-1.35, bend * 1.82), (1.35, bend * 1.82))], "ellipses": []}


def _draw_profile(p: _Painter) -> Landmarks:
    # Mid-sagittal head facing +x; centred on the whole head-and-face so it fills the frame like the others.
    o = np.array([0.3, 0.55])
    p.blob(1.45 - o[0], 0.75 - o[1], p.u(0.5, 0.8), p.u(0.8, 1.1), FLUID)  # fluid in front of the face
    cranium = _ellipse(0, 0, 0.85, 0.8, t0=10, t1=-230, n=30)
    face = np.array(
        [
            [-0.35, 1.55],
            [0.25, 1.6],
            [0.65, 1.25],
            [0.9, 1.12],
            [0.84, 1.0],
            [0.94, 0.92],
            [0.86, 0.84],
            [0.96, 0.77],
            [0.88, 0.66],
            [1.06 + p.u(-0.04, 0.04), 0.56],
            [0.9, 0.38],
            [0.84, 0.3],
        ]
    )
    outline = _smooth_poly(np.concatenate([cranium, face]), 2)
    p.fill(outline - o, SOFT)
    p.stroke(_smooth_poly(face[1:], 1)[1:-2] - o, WALL * 0.8, 0.025)  # skin of the face against the fluid
    p.blob(-0.05 - o[0], -0.05 - o[1], 0.72, 0.67, BRAIN)
    p.stroke(_ellipse(-o[0], -o[1], 0.82, 0.77, t0=-5, t1=-100, n=12), BONE, 0.06, bone=0.55)  # frontal bone
    p.stroke(_ellipse(-o[0], -o[1], 0.82, 0.77, t0=-110, t1=-215, n=12), BONE, 0.06, bone=0.55)  # parietal
    p.stroke(np.array([[0.84, 0.3], [0.97, 0.47]]) - o, BONE, 0.045, bone=0.6)  # nasal bone
    p.stroke(np.array([[0.82, 0.72], [0.6, 0.7]]) - o, BONE * 0.7, 0.05, bone=0.4)  # maxilla
    p.stroke(np.array([[0.8, 1.06], [0.6, 1.12], [0.4, 1.1]]) - o, BONE * 0.8, 0.05, bone=0.5)  # mandible
    p.stroke(np.array([[0.7, 0.86], [0.35, 0.8]]) - o, WALL * 0.5, 0.03)  # palate and tongue
    return {"pairs": [((0.84 - o[0], 0.25 - o[1]), (0.9 - o[0], 1.12 - o[1]))], "ellipses": []}


def _draw_kidneys(p: _Painter) -> Landmarks:
    a, b = 1.0, p.u(0.85, 0.97)
    p.blob(0, 0, a, b, SOFT * 1.1)
    p.stroke(_ellipse(0, 0, a, b), WALL * 0.6, 0.03, closed=True)
    _spine_triad(p, 0.0, 0.72 * b)
    for _ in range(int(p.rng.integers(2, 6))):  # bowel loops
        p.blob(p.u(-0.5, 0.5), p.u(-0.7, -0.1), p.u(0.06, 0.14), p.u(0.05, 0.1), WALL * 0.6, ang=p.u(0, 180))
    for side in (-1, 1):
        kx, ky, ang = side * p.u(0.36, 0.46), p.u(0.35, 0.5), side * p.u(50, 75)
        ka, kb = p.u(0.22, 0.3), p.u(0.14, 0.19)
        p.blob(kx, ky, ka, kb, BRAIN * 1.2, ang=ang)
        p.stroke(_ellipse(kx, ky, ka, kb, ang), WALL * 0.8, 0.03, closed=True)  # perirenal fat
        p.blob(kx - side * 0.06, ky - 0.02, p.u(0.04, 0.09), 0.04, FLUID, ang=ang)  # renal pelvis
    return {"pairs": [((-0.6, 0.4), (0.6, 0.4)), ((0.0, -b), (0.0, b))], "ellipses": []}


def _draw_cervix(p: _Painter) -> Landmarks:
    p.blob(-1.7, p.u(-0.4, 0.2), p.u(0.5, 0.8), p.u(0.6, 0.9), FLUID)  # amniotic fluid above the internal os
    if p.rng.random() < 0.4:  # the presenting fetal head, a confusing skull arc
        p.stroke(_ellipse(-2.1, 0.0, 0.7, 0.7, t0=-60, t1=60, n=12), BONE, 0.06, bone=0.5)
    if p.rng.random() < 0.6:
        p.blob(p.u(-0.8, 0.2), -p.u(0.9, 1.3), p.u(0.6, 0.9), p.u(0.3, 0.5), FLUID)  # bladder
    p.blob(0, 0, p.u(1.1, 1.3), p.u(0.45, 0.6), SOFT * 1.4)  # cervical stroma
    bend = p.u(-0.15, 0.15)
    xs = np.linspace(-1.0, 1.0, 12)
    canal = np.stack([xs, bend * xs**2], axis=1)
    p.stroke(canal, BRAIN * 0.7, p.u(0.12, 0.2))  # glands around the canal are hypoechoic
    p.stroke(canal, WALL, 0.03)  # mucosa
    for side in (-1, 1):  # vaginal walls
        p.stroke(np.array([[1.0, bend], [1.6, bend + side * p.u(0.2, 0.35)]]), WALL * 0.6, 0.03)
    for _ in range(int(p.rng.integers(0, 3))):
        p.blob(p.u(-0.8, 0.8), p.u(0.2, 0.35) * (1 if p.rng.random() < 0.5 else -1), 0.06, 0.05, FLUID)
    return {"pairs": [((-1.0, bend), (1.0, bend))], "ellipses": []}


_PAINTERS: dict[str, Callable[[_Painter], Landmarks]] = {
    "brain": _draw_brain,
    "abdomen": _draw_abdomen,
    "femur": _draw_femur,
    "thorax_4ch": _draw_thorax_4ch,
    "spine": _draw_spine,
    "profile": _draw_profile,
    "kidneys": _draw_kidneys,
    "cervix": _draw_cervix,
}
assert set(_PAINTERS) == set(VIEWS)


def _draw_background(rng: np.random.Generator, scene: np.ndarray, fan: _Fan, h: int, w: int) -> None:
    """Uterine wall, placenta, fluid pockets and stray interfaces: clutter shared by every view."""
    p = _Painter(scene, rng, 0.0, 0.0, 1.0)
    if rng.random() < 0.45:  # placenta: a thick granular band along a wall
        cx, cy = fan.to_frame(rng.uniform(0.1, 0.9), rng.uniform(-0.8, 0.8))
        a, b, ang = rng.uniform(0.3, 0.6) * w, rng.uniform(0.06, 0.14) * h, rng.uniform(-40, 40)
        p.blob(cx, cy, a, b, ORGAN * 1.1, ang=ang)
        p.stroke(_ellipse(cx, cy, a, b, ang, t0=0, t1=180, n=20), WALL * 0.7, 2.0)
    for _ in range(int(rng.integers(0, 3))):
        cx, cy = fan.to_frame(rng.uniform(0.1, 1.0), rng.uniform(-1, 1))
        p.blob(cx, cy, rng.uniform(0.05, 0.2) * w, rng.uniform(0.05, 0.2) * h, FLUID, ang=rng.uniform(0, 180))
    for _ in range(int(rng.integers(0, 4))):
        cx, cy = fan.to_frame(rng.uniform(0.1, 1.0), rng.uniform(-1, 1))
        a, b, ang = rng.uniform(0.1, 0.4) * w, rng.uniform(0.05, 0.3) * h, rng.uniform(0, 180)
        arc = _ellipse(cx, cy, a, b, ang, t0=rng.uniform(0, 360), t1=rng.uniform(0, 360), n=10)
        p.stroke(arc, WALL * rng.uniform(0.3, 0.9), float(rng.integers(1, 4)))


# ---------------------------------------------------------------------------------------------- imaging


@lru_cache(maxsize=64)
def _gamma_lut(gamma: float) -> np.ndarray:
    return np.clip(255.0 * (np.arange(256) / 255.0) ** gamma + 0.5, 0, 255).astype(np.uint8)


def _render(
    rng: np.random.Generator, style: _Style, subject: str, view: str, h: int, w: int, linear: bool
) -> tuple[np.ndarray, _Fan, list, list, float]:
    """The clean frame, its field, and the caliper landmarks (point pairs, ellipses) in frame pixels."""
    fan = _make_fan(rng, h, w, linear)
    scene = np.zeros((h, w, 3), np.float32)
    _draw_background(rng, scene, fan, h, w)

    cx, cy = fan.to_frame(rng.uniform(0.4, 0.65), rng.uniform(-0.45, 0.45))
    zoom = rng.uniform(0.8, 1.25)  # depth setting: deeper field, smaller anatomy
    # A standard plane is magnified until its structure fills most of the screen (the head or trunk spans
    # about two thirds of the frame's height on average), so the anatomy, not the clutter, dominates.
    scale = 0.34 * min(h, w) * rng.uniform(0.75, 1.25) * zoom
    # Sonographers hold standard planes in roughly standard orientations: tilt within +-40 degrees, and
    # either side of the screen.
    rot, flip = rng.uniform(-1.0, 1.0) * math.radians(40), bool(rng.random() < 0.5)
    if view != "cervix" and rng.random() < 0.75:  # amniotic fluid around the fetus
        fp = _Painter(scene, rng, cx + rng.normal(0, 0.2) * scale, cy + rng.normal(0, 0.2) * scale, scale)
        fp.blob(0, 0, rng.uniform(1.25, 1.9), rng.uniform(1.1, 1.6), FLUID, ang=rng.uniform(0, 180))
    painter = _Painter(scene, rng, cx, cy, scale, rot, flip)
    landmarks = _PAINTERS[view](painter)

    # Everything below happens on the beam grid (rows = depth, columns = beam angle), as a scanner forms it.
    beam = cv2.remap(scene, fan.beam_x, fan.beam_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    echo, cover, opacity = cv2.split(beam)
    depth = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]
    nt = echo.shape[1]

    bg = np.full((h, 1), style.tissue, np.float32)
    for _ in range(int(rng.integers(2, 5))):  # layers of the maternal abdominal wall in the near field
        c, wd = rng.uniform(0.0, 0.2), rng.uniform(0.005, 0.03)
        bg *= 1 + rng.uniform(-0.7, 2.5) * np.exp(-(((depth - c) / wd) ** 2))
    echo = bg * (1.0 - cover) + echo

    tex = _texture_window(rng, subject, h, nt)
    fine = cv2.resize(
        rng.standard_normal((h // 8 + 2, nt // 4 + 2)).astype(np.float32),
        (nt, h),
        interpolation=cv2.INTER_CUBIC,
    )
    echo = echo * cv2.exp(style.tex_amp * tex + 0.15 * fine)
    echo = cv2.GaussianBlur(echo, (0, 0), 1.0)

    # Bone is brightest where the beam meets it head-on, faint where it runs along the beam.
    gy = np.abs(cv2.Sobel(opacity, cv2.CV_32F, 0, 1, ksize=3))
    gx = np.abs(cv2.Sobel(opacity, cv2.CV_32F, 1, 0, ksize=3))
    echo = echo * (1.0 + opacity * (1.2 * gy / (gy + gx + 1e-3) - 0.6))

    # Speckle: the envelope of band-limited complex noise, Rayleigh distributed and elongated laterally.
    # Blurred uniform noise is Gaussian enough by the central limit theorem, and far cheaper to draw.
    z = np.frombuffer(rng.bytes(h * nt * 2), np.uint8).reshape(h, nt, 2).astype(np.float32) - 127.5
    z = cv2.GaussianBlur(z, (0, 0), sigmaX=style.speckle_lateral, sigmaY=style.speckle_axial)
    speckle = cv2.magnitude(z[..., 0], z[..., 1])
    speckle *= 1.0 / math.sqrt(float(cv2.mean(speckle * speckle)[0]) + 1e-12)

    shadow = cv2.exp(-0.22 * (np.cumsum(opacity, axis=0, dtype=np.float32) - opacity))
    tgc_db = np.interp(depth[:, 0], np.linspace(0, 1, 5), np.array(style.tgc_db) + rng.normal(0, 1.5, 5))
    gain_db = style.gain_db + rng.normal(0, 2.5) + tgc_db[:, None]
    gain = 10 ** (gain_db / 20) * np.exp(-style.attenuation * depth) * (1 + 0.6 * style.attenuation * depth)
    # Electronic noise floor, added before the speckle so fluid shows a faint grain rather than flat black.
    amp = (echo * shadow * gain.astype(np.float32) + 0.0006) * speckle

    # Log compression into the displayed dynamic range; the grey map (gamma) is applied as a LUT below.
    dyn = style.dyn_range + rng.uniform(-4, 4)
    db = cv2.log(amp + 1e-7) * np.float32(20.0 / math.log(10))
    gray = (db + np.float32(dyn - 2.0)) * np.float32(255.0 / dyn)  # white at +2 dB, black at 2 - dyn dB

    if style.smooth > 0.3:  # some presets smooth the speckle before scan conversion
        gray = cv2.GaussianBlur(gray, (0, 0), style.smooth)
    frame = cv2.remap(gray, fan.frame_x, fan.frame_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    clean = cv2.LUT(np.clip(frame + 0.5, 0, 255).astype(np.uint8), _gamma_lut(round(style.gamma, 2)))

    pairs = [
        (tuple(painter.frame([pq[0]])[0]), tuple(painter.frame([pq[1]])[0])) for pq in landmarks["pairs"]
    ]
    ellipses = []
    for ex, ey, ea, eb, eang in landmarks["ellipses"]:
        centre = painter.frame([(ex, ey)])[0]
        axis_pt = painter.frame(
            [(ex + ea * math.cos(math.radians(eang)), ey + ea * math.sin(math.radians(eang)))]
        )
        ang = math.degrees(math.atan2(axis_pt[0][1] - centre[1], axis_pt[0][0] - centre[0]))
        ellipses.append((float(centre[0]), float(centre[1]), ea * scale, eb * scale, ang))
    return clean, fan, pairs, ellipses, zoom


# ---------------------------------------------------------------------------------------------- overlays


def _dotted(alpha: np.ndarray, pts: np.ndarray, step: float, dot: int) -> None:
    """Dots every `step` pixels along a polyline, set straight into the alpha layer: the mask stays exact."""
    seg = np.diff(pts, axis=0)
    lengths = np.hypot(seg[:, 0], seg[:, 1])
    total = float(lengths.sum())
    if total < 1:
        return
    s = np.arange(0.0, total, step)
    cum = np.concatenate([[0.0], np.cumsum(lengths)])
    x, y = np.interp(s, cum, pts[:, 0]), np.interp(s, cum, pts[:, 1])
    h, w = alpha.shape
    xi, yi = np.round(x).astype(int), np.round(y).astype(int)
    for dy in range(dot):
        for dx in range(dot):
            ok = (xi + dx >= 0) & (xi + dx < w) & (yi + dy >= 0) & (yi + dy < h)
            alpha[yi[ok] + dy, xi[ok] + dx] = 255


def _marker(alpha: np.ndarray, x: float, y: float, kind: str, arm: int, line: int) -> None:
    xi, yi = round(x), round(y)
    if kind == "+":
        cv2.line(alpha, (xi - arm, yi), (xi + arm, yi), 255, 1, line)
        cv2.line(alpha, (xi, yi - arm), (xi, yi + arm), 255, 1, line)
    else:
        cv2.line(alpha, (xi - arm, yi - arm), (xi + arm, yi + arm), 255, 1, line)
        cv2.line(alpha, (xi - arm, yi + arm), (xi + arm, yi - arm), 255, 1, line)


def _overlays(
    rng: np.random.Generator,
    style: _Style,
    cfg: PhantomConfig,
    clean: np.ndarray,
    fan: _Fan,
    view: str,
    pairs: list,
    ellipses: list,
    zoom: float,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    h, w = clean.shape
    text_alpha = np.zeros((h, w), np.uint8)
    graphic_alpha = np.zeros((h, w), np.uint8)
    line = cv2.LINE_AA if style.antialias else cv2.LINE_8
    font = cv2.FONT_HERSHEY_SIMPLEX
    fs = max(0.25, 0.33 * min(h, w) / 240)
    step = cv2.getTextSize("Ag", font, fs, 1)[0][1] + max(3, round(5 * fs))
    drawn: list[str] = []
    placed: list[tuple[int, int, int, int]] = []  # text boxes, to keep the anonymisation box off them

    def put(s: str, x: int, y: int, right: bool = False) -> None:
        (tw, th), base = cv2.getTextSize(s, font, fs, 1)
        if right:
            x = x - tw
        x = int(min(max(x, 1), w - tw - 1))
        y = int(min(max(y, th + 1), h - base - 1))
        cv2.putText(text_alpha, s, (x, y), font, fs, 255, 1, line)
        drawn.append(s)
        placed.append((x, y - th, x + tw, y + base))

    depth_cm = round(float(14.0 / zoom * rng.uniform(0.9, 1.1)), 1)
    px_per_cm = (fan.r1 - fan.r0) / depth_cm
    hour, minute, sec = int(rng.integers(8, 19)), int(rng.integers(0, 60)), int(rng.integers(0, 60))
    top_y = step - 2
    put(style.machine, 3, top_y)
    put(f"{style.date} {hour:02d}:{minute:02d}:{sec:02d}", w - 3, top_y, right=True)

    params = [
        f"{style.probe}",
        f"Gn {int(rng.integers(30, 75))}",
        f"D {depth_cm:.1f}cm",
        f"FR {int(rng.integers(12, 45))}Hz",
        f"DR {int(style.dyn_range)}",
        f"MI {rng.uniform(0.4, 1.4):.1f}",
        f"TIs {rng.uniform(0.1, 0.9):.1f}",
        f"PRC {int(rng.integers(1, 6))}/{int(rng.integers(0, 4))}",
    ]
    chosen = sorted(rng.choice(len(params), size=int(rng.integers(3, 7)), replace=False))
    x_col = w - 3 if style.params_right else 3
    y = top_y + int(rng.uniform(1.5, 3.0) * step)
    for k in chosen:
        put(params[k], x_col, y, right=style.params_right)
        y += step

    # Calipers: markers on the anatomy joined by a dotted line, and their reading in a results box.
    readings: list[str] = []
    if rng.random() < cfg.p_calipers and pairs:
        arm = max(2, round(3 * fs / 0.33))
        names = {"brain": ("BPD", "OFD"), "abdomen": ("APD", "TAD"), "femur": ("FL",), "cervix": ("CL",)}
        use = pairs[: int(rng.integers(1, len(pairs) + 1))]
        for k, (p0, q0) in enumerate(use):
            jitter = rng.normal(0, 1.5, size=4)
            p_, q_ = (p0[0] + jitter[0], p0[1] + jitter[1]), (q0[0] + jitter[2], q0[1] + jitter[3])
            _marker(graphic_alpha, *p_, style.marker, arm, line)
            _marker(graphic_alpha, *q_, style.marker, arm, line)
            _dotted(graphic_alpha, np.array([p_, q_]), step=float(rng.uniform(3.5, 6.0)), dot=1)
            cm = math.hypot(q_[0] - p_[0], q_[1] - p_[1]) / px_per_cm
            name = (
                names.get(view, ())[k]
                if cfg.text_names_view and k < len(names.get(view, ()))
                else f"D{k + 1}"
            )
            readings.append(f"{name} {cm:.2f}cm" if rng.random() < 0.5 else f"{name} {10 * cm:.1f}mm")
        if ellipses and rng.random() < 0.5:
            ex, ey, ea, eb, eang = ellipses[0]
            trace = _ellipse(ex, ey, ea * rng.uniform(0.97, 1.03), eb * rng.uniform(0.97, 1.03), eang, n=90)
            _dotted(graphic_alpha, trace, step=float(rng.uniform(3.5, 6.0)), dot=1)
            circ = math.pi * (3 * (ea + eb) - math.sqrt((3 * ea + eb) * (ea + 3 * eb))) / px_per_cm
            name = {"brain": "HC", "abdomen": "AC"}.get(view, "TC") if cfg.text_names_view else "C1"
            readings.append(f"{name} {circ:.2f}cm")
    by = h - 4 - step * (len(readings) + (1 if cfg.text_names_view else 0))
    bx = 3 if rng.random() < 0.5 else w - 3
    if cfg.text_names_view:
        put(VIEW_ANNOTATION[view], bx, by, right=bx > w // 2)
        by += step
    for s in readings:
        put(s, bx, by, right=bx > w // 2)
        by += step

    # Depth scale: tick marks every centimetre beside the field, longer every fifth.
    if rng.random() < cfg.p_scale_bar:
        x_edge = fan.to_frame(0.0, 1.0)[0] if fan.linear else fan.apex[0] + fan.r1 * math.sin(fan.half)
        at_edge = style.params_right or rng.random() < 0.7  # beside the field, unless the image edge is free
        x = int(min(w - 8, x_edge + rng.uniform(3, 10))) if at_edge else int(w - rng.uniform(6, 14))
        y0 = fan.r0 + fan.apex[1]
        ticks = np.arange(y0, min(h - 2, fan.r1 + fan.apex[1]), px_per_cm)
        if rng.random() < 0.5:
            cv2.line(graphic_alpha, (x, round(y0)), (x, round(ticks[-1])), 255, 1, cv2.LINE_8)
        for k, ty in enumerate(ticks):
            length = 5 if k % 5 == 0 else 2
            cv2.line(graphic_alpha, (x, round(ty)), (x + length, round(ty)), 255, 1, cv2.LINE_8)

    if rng.random() < 0.6:  # probe orientation mark at the top corner of the field
        mx, my = fan.to_frame(0.02, -1.0)
        cv2.circle(graphic_alpha, (int(max(4, mx - 8)), int(max(4, my))), 3, 255, -1, line)
    if rng.random() < cfg.p_logo:  # body-mark pictogram: torso outline and probe position
        bw, bh = round(0.09 * w), round(0.1 * h)
        x0 = 3 if bx > w // 2 else w - bw - 4
        y0 = h - bh - 4
        cv2.rectangle(graphic_alpha, (x0, y0), (x0 + bw, y0 + bh), 255, 1, cv2.LINE_8)
        cv2.ellipse(graphic_alpha, (x0 + bw // 2, y0 + bh // 2), (bw // 3, bh // 3), 0, 0, 360, 255, 1, line)
        px = x0 + int(rng.integers(bw // 4, 3 * bw // 4))
        cv2.line(graphic_alpha, (px - 3, y0 + 3), (px + 3, y0 + 3), 255, 2, cv2.LINE_8)

    # Burn in: alpha-blend each layer in its own brightness (antialiased edges give partial alpha).
    img = clean.astype(np.float32)
    for layer, value in ((graphic_alpha, style.graphic_value), (text_alpha, style.text_value)):
        a = layer.astype(np.float32) * (1.0 / 255.0)
        img = img * (1.0 - a) + value * a
    mask = (graphic_alpha > 0) | (text_alpha > 0)
    image = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    image[~mask] = clean[~mask]

    if rng.random() < cfg.p_anonymise:  # black box left where a de-identification tool blanked the header
        left = max([b[2] for b in placed if b[1] < step + 4 and b[0] < w // 2] + [0]) + 3
        right = min([b[0] for b in placed if b[1] < step + 4 and b[0] >= w // 2] + [w]) - 3
        if right - left > 20:
            x0 = int(rng.integers(left, left + (right - left) // 3 + 1))
            x1 = int(rng.integers(x0 + (right - x0) // 2, right + 1))
            y1 = int(rng.integers(step, 2 * step + 1))
            image[:y1, x0:x1] = 0
            mask[:y1, x0:x1] = True
    return image, mask, drawn


# ---------------------------------------------------------------------------------------------- public API


def generate(
    rng: np.random.Generator | int, view: str, subject: str = "P0000", cfg: PhantomConfig | None = None
) -> Phantom:
    """One phantom of `view` for `subject`; an int `rng` is a seed: `generate(7, "brain")` is reproducible."""
    if view not in _PAINTERS:
        raise ValueError(f"unknown view {view!r}; choose from {', '.join(VIEWS)}")
    cfg = cfg or PhantomConfig()
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(int(rng))
    h, w = cfg.size
    style = _subject_style(subject)
    linear = bool(rng.random() < cfg.p_linear)
    clean, fan, pairs, ellipses, zoom = _render(rng, style, subject, view, h, w, linear)
    if cfg.overlays:
        image, mask, text = _overlays(rng, style, cfg, clean, fan, view, pairs, ellipses, zoom)
    else:
        image, mask, text = clean.copy(), np.zeros_like(fan.mask), []
    return Phantom(
        image=image,
        overlay_mask=mask,
        label=view,
        subject=subject,
        text=text,
        clean=clean,
        fan_mask=fan.mask.copy(),
    )


def plan(
    n: int, seed: int = 0, views: Sequence[str] = VIEWS, n_subjects: int | None = None
) -> list[tuple[str, str]]:
    """(view, subject) for each image: views balanced, about six images of mixed views per subject."""
    if n < 1:
        raise ValueError("n must be at least 1")
    unknown = [v for v in views if v not in _PAINTERS]
    if unknown or not views:
        raise ValueError(f"unknown views {unknown}; choose from {', '.join(VIEWS)}")
    n_subjects = n_subjects or max(1, round(n / 6))
    r = np.random.default_rng([seed, 1])
    labels = [views[i % len(views)] for i in range(n)]
    subjects = [f"P{i % n_subjects:04d}" for i in range(n)]
    order_v, order_s = r.permutation(n), r.permutation(n)
    return [(labels[order_v[i]], subjects[order_s[i]]) for i in range(n)]


def iter_phantoms(
    n: int,
    seed: int = 0,
    *,
    views: Sequence[str] = VIEWS,
    size: tuple[int, int] = (240, 320),
    text_names_view: bool = False,
    n_subjects: int | None = None,
    cfg: PhantomConfig | None = None,
) -> Iterator[Phantom]:
    """`n` phantoms in memory; phantom i depends only on (seed, i) and its planned view and subject.
    A `cfg`, when given, replaces `size` and `text_names_view`."""
    cfg = cfg or PhantomConfig(size=tuple(size), text_names_view=text_names_view)
    for i, (view, subject) in enumerate(plan(n, seed, views, n_subjects)):
        yield generate(np.random.default_rng([seed, i, 2]), view, subject, cfg)


def _write_dicom(path: Path, ph: Phantom, index: int, seed: int) -> None:
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    us_storage = "1.2.840.10008.5.1.4.1.1.6.1"  # Ultrasound Image Storage
    sop_uid = generate_uid(entropy_srcs=["fusc-phantom", str(seed), str(index)])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = us_storage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    number = ph.subject.lstrip("P")
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = us_storage, sop_uid, "US"
    ds.PatientName = f"PHANTOM^{number}"
    ds.PatientID = f"PH{number}"
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["fusc-phantom-study", str(seed), ph.subject])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["fusc-phantom-series", str(seed), ph.subject])
    ds.StudyDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.ContentTime = "120000"
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, index + 1
    ds.Manufacturer = "fusc phantom"
    ds.BurnedInAnnotation = "YES" if ph.overlay_mask.any() else "NO"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = ph.image.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(ph.image).tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def generate_dataset(
    out_dir: str | Path,
    n: int,
    *,
    views: Sequence[str] = VIEWS,
    seed: int = 0,
    size: tuple[int, int] = (240, 320),
    text_names_view: bool = False,
    dicom: bool = False,
    n_subjects: int | None = None,
    progress: bool = True,
) -> Path:
    """Write images/<name>.png, masks/<name>.png (overlay pixels 255), labels.csv (filename,label,subject)
    and, with `dicom`, dicom/<name>.dcm (Ultrasound Image Storage, MONOCHROME2, 8 bit). Returns `out_dir`."""
    from tqdm import tqdm

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    if dicom:
        (out / "dicom").mkdir(exist_ok=True)
    rows = []
    stream = iter_phantoms(
        n, seed, views=views, size=size, text_names_view=text_names_view, n_subjects=n_subjects
    )
    for i, ph in enumerate(tqdm(stream, total=n, desc="phantoms", unit="img", disable=not progress)):
        name = f"img_{i:06d}"  # names carry no label, so nothing downstream can peek at it
        cv2.imwrite(str(out / "images" / f"{name}.png"), ph.image)
        cv2.imwrite(str(out / "masks" / f"{name}.png"), ph.overlay_mask.astype(np.uint8) * 255)
        if dicom:
            _write_dicom(out / "dicom" / f"{name}.dcm", ph, i, seed)
        rows.append((f"{name}.png", ph.label, ph.subject))
    with open(out / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "label", "subject"])
        writer.writerows(rows)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.data.phantoms", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument("--n", type=int, default=3000, help="number of images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, nargs=2, default=(240, 320), metavar=("H", "W"))
    ap.add_argument("--views", nargs="+", default=list(VIEWS), choices=VIEWS)
    ap.add_argument("--n-subjects", type=int, default=None, help="default: about one per six images")
    ap.add_argument("--dicom", action="store_true", help="also write dicom/<name>.dcm")
    ap.add_argument("--text-names-view", action="store_true", help="burn the view annotation into the image")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    out = generate_dataset(
        args.out,
        args.n,
        views=args.views,
        seed=args.seed,
        size=tuple(args.size),
        text_names_view=args.text_names_view,
        dicom=args.dicom,
        n_subjects=args.n_subjects,
        progress=not args.no_progress,
    )
    with open(out / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    counts = Counter(r["label"] for r in rows)
    print(f"wrote {len(rows)} phantoms from {len({r['subject'] for r in rows})} subjects to {out}")
    for view in args.views:
        print(f"  {view:<12} {counts[view]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
