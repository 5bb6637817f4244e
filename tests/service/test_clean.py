"""clean: overlay and fan masks against drawn ground truth, inpainting, and the model-input contract."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from service.clean import (
    CleanConfig,
    black_box_mask,
    clean_frame,
    fan_mask,
    inpaint,
    normalize,
    overlay_mask,
    preprocess,
)

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
NO_DATA = "real images live in ../shared/data (absent in a fresh clone)"


def _dilate(mask: np.ndarray, px: int) -> np.ndarray:
    k = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * px + 1, 2 * px + 1))
    return cv2.dilate(mask.astype(np.uint8), k).astype(bool)


def _phantom(seed: int = 0, *, overlays: bool = True, box: bool = False):
    """A 480x640 frame: speckled sector with a thick bright 'skull', optional text/calipers drawn on it.

    Returns (frame, fan, overlay, skull) with the true masks of what was drawn.
    """
    rng = np.random.default_rng(seed)
    h, w = 480, 640
    fan = np.zeros((h, w), np.uint8)
    cv2.ellipse(fan, (320, 20), (440, 440), 0, 40, 140, 1, -1)  # a sector opening downwards
    cv2.circle(fan, (320, 20), 60, 0, -1)  # the near-field arc of a curvilinear probe
    speckle = rng.gamma(2.0, 30.0, (h, w)).astype(np.float32)
    tissue = cv2.GaussianBlur(speckle, (0, 0), 1.5) + 20
    skull = np.zeros((h, w), np.uint8)
    cv2.ellipse(skull, (320, 260), (120, 90), 10, 0, 360, 1, 14)
    tissue = np.where(skull > 0, 235.0, tissue)
    tissue = cv2.GaussianBlur(tissue, (0, 0), 1.2)  # the beam blurs bone edges; burnt-in text is added after
    frame = np.clip(tissue, 0, 200 + 35 * (skull > 0)).astype(np.uint8) * fan

    over = np.zeros((h, w), np.uint8)
    if overlays:
        for canvas, value in ((frame, 255), (over, 1)):
            cv2.putText(
                canvas, "GA 22w3d HC 21.4cm", (200, 120), cv2.FONT_HERSHEY_SIMPLEX, 0.5, value, 1, cv2.LINE_8
            )
            cv2.putText(canvas, "Gn -2 C6/M7", (370, 420), cv2.FONT_HERSHEY_PLAIN, 1.0, value, 1, cv2.LINE_8)
            for x, y in ((215, 260), (425, 260)):
                cv2.drawMarker(canvas, (x, y), value, cv2.MARKER_CROSS, 11, 1, cv2.LINE_8)
            cv2.drawMarker(canvas, (320, 330), value, cv2.MARKER_TILTED_CROSS, 9, 1, cv2.LINE_8)
            for x in range(225, 420, 8):  # dotted caliper line
                cv2.rectangle(canvas, (x, 259), (x + 1, 260), value, -1)
            for y in range(150, 440, 25):  # depth tick marks
                cv2.line(canvas, (150, y), (156, y), value, 1, cv2.LINE_8)
        over &= fan
    if box:
        cv2.rectangle(frame, (470, 330), (639, 479), 0, -1)  # anonymisation box over the fan's corner
        fan[330:, 470:] = 0
        over[330:, 470:] = 0
    return frame, fan.astype(bool), over.astype(bool), (skull > 0) & (fan > 0)


# ----------------------------------------------------------------------------------------- overlay mask
def test_overlay_mask_recall_and_precision_on_drawn_overlays():
    frame, _, truth, skull = _phantom()
    pred = overlay_mask(frame, CleanConfig(overlay_dilate_px=0))
    recall = (truth & _dilate(pred, 2)).sum() / truth.sum()
    precision = (pred & _dilate(truth, 2)).sum() / pred.sum()
    assert recall >= 0.9, recall
    assert precision >= 0.9, precision
    # The thick bright skull is not taken for an overlay.
    assert (pred & skull & ~_dilate(truth, 2)).sum() <= 0.01 * skull.sum()


@pytest.mark.parametrize("line_type", [cv2.LINE_8, cv2.LINE_AA])
@pytest.mark.parametrize("value", [255, 220, 180])
def test_overlay_mask_finds_grey_and_antialiased_text(value, line_type):
    frame, *_ = _phantom(overlays=False)
    truth = np.zeros(frame.shape, np.uint8)
    for canvas, v in ((frame, value), (truth, 1)):
        cv2.putText(canvas, "GA 22w3d HC 21.4cm", (200, 120), cv2.FONT_HERSHEY_SIMPLEX, 0.5, v, 1, line_type)
        cv2.putText(canvas, "AC 18.2", (260, 250), cv2.FONT_HERSHEY_SIMPLEX, 0.6, v, 1, line_type)  # on bone
    truth = truth.astype(bool)
    pred = overlay_mask(frame, CleanConfig(overlay_dilate_px=0))
    assert (truth & _dilate(pred, 2)).sum() >= 0.9 * truth.sum()
    assert (pred & _dilate(truth, 2)).sum() >= 0.9 * pred.sum()


def test_overlay_mask_is_empty_without_overlays():
    frame, *_ = _phantom(overlays=False)
    assert overlay_mask(frame, CleanConfig(overlay_dilate_px=0)).sum() <= 0.0005 * frame.size


def test_overlay_mask_is_dilated_by_config():
    frame, *_ = _phantom()
    thin = overlay_mask(frame, CleanConfig(overlay_dilate_px=0))
    wide = overlay_mask(frame, CleanConfig(overlay_dilate_px=2))
    assert (wide | _dilate(thin, 2)).sum() == _dilate(thin, 2).sum() and wide.sum() > thin.sum()


@pytest.mark.parametrize("method", ["telea", "ns"])
def test_inpaint_removes_bright_text(method):
    frame, _, truth, _ = _phantom()
    cfg = CleanConfig(inpaint_method=method)
    out = inpaint(frame, overlay_mask(frame, cfg), cfg)
    text = np.zeros_like(truth)
    text[105:125, 195:360] = True
    text &= truth
    assert frame[text].max() == 255
    assert out[text].max() < 200
    assert out.dtype == np.uint8 and out.shape == frame.shape
    clean, *_ = _phantom(overlays=False)
    assert np.abs(out[text].astype(int) - clean[text]).mean() < 40


# ----------------------------------------------------------------------------------------------- fan
def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_fan_mask_matches_drawn_sector():
    frame, fan, _, _ = _phantom()
    assert _iou(fan_mask(frame), fan) >= 0.95


def test_fan_mask_leaves_out_black_box():
    frame, fan, _, _ = _phantom(box=True)
    pred = fan_mask(frame)
    assert pred[340:, 480:].sum() == 0
    assert _iou(pred, fan) >= 0.93


def test_black_box_mask_finds_box_not_dark_speckle():
    frame, *_ = _phantom(box=True)
    boxes = black_box_mask(frame)
    assert boxes[340:470, 480:630].all()
    assert not boxes[200:300, 250:400].any()


def test_fan_mask_falls_back_to_whole_frame():
    assert fan_mask(np.zeros((100, 120), np.uint8)).all()
    tiny = np.zeros((100, 120), np.uint8)
    tiny[10:20, 10:20] = 200  # nothing convincing: a 1% speck
    assert fan_mask(tiny).all()


# ------------------------------------------------------------------------------------------- clean_frame
def test_clean_frame_shape_dtype_determinism():
    frame, *_ = _phantom(box=True)
    cfg = CleanConfig(size=64)
    a = clean_frame(frame, cfg)
    assert a.shape == (64, 64) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, clean_frame(frame, cfg))


def test_clean_frame_output_barely_depends_on_overlays():
    cfg = CleanConfig(size=128)
    with_text = clean_frame(_phantom()[0], cfg).astype(int)
    without = clean_frame(_phantom(overlays=False)[0], cfg).astype(int)
    diff = np.abs(with_text - without)
    assert diff.mean() < 1.5 and np.percentile(diff, 99.9) < 40


def test_clean_frame_crops_to_fan_and_pads_square():
    frame = np.zeros((200, 600), np.uint8)
    frame[50:150, 100:500] = 120  # a 100x400 echo region in a wide black frame
    out = clean_frame(frame, CleanConfig(size=100))
    # 400 wide -> fills the width; 100 tall -> a 25-px band centred vertically, black above and below.
    assert out[:, 5:95][40:60].min() >= 110
    assert out[:30].max() == 0 and out[70:].max() == 0


def test_clean_frame_small_and_large_frames():
    cfg = CleanConfig(size=96)
    rng = np.random.default_rng(3)
    small = rng.integers(30, 200, (40, 50), dtype=np.uint8)
    assert clean_frame(small, cfg).shape == (96, 96)
    large = rng.integers(30, 200, (1500, 2000), dtype=np.uint8)
    assert clean_frame(large, cfg).shape == (96, 96)


def test_clean_frame_rejects_non_gray8():
    with pytest.raises(ValueError):
        clean_frame(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError):
        clean_frame(np.zeros((64, 64), np.float32))


# --------------------------------------------------------------------------------- normalize / preprocess
def test_normalize_exact():
    img = np.array([[0, 255], [51, 128]], np.uint8)
    x = normalize(img, CleanConfig(mean=0.5, std=0.25))
    assert x.dtype == np.float32 and x.shape == (1, 2, 2) and x.flags.c_contiguous
    np.testing.assert_allclose(x[0], [[-2.0, 2.0], [-1.2, (128 / 255 - 0.5) / 0.25]], atol=1e-6)


def test_preprocess_is_normalize_of_clean_frame():
    frame, *_ = _phantom()
    cfg = CleanConfig(size=80, mean=0.4, std=0.3)
    np.testing.assert_array_equal(preprocess(frame, cfg), normalize(clean_frame(frame, cfg), cfg))
    assert preprocess(frame, cfg).shape == (1, 80, 80)


def test_config_travels_as_json():
    cfg = CleanConfig(size=112, inpaint_method="ns", work_size=300)
    assert CleanConfig.model_validate_json(cfg.model_dump_json()) == cfg
    assert CleanConfig().size == 96 and CleanConfig().mean == 0.5 and CleanConfig().std == 0.25


# ------------------------------------------------------------------------------------------ real images
def _sample(folder: str, step: int) -> list[Path]:
    return sorted((DATA / folder / "images").glob("*.png"))[::step]


@pytest.mark.skipif(not (DATA / "hc18" / "images").is_dir(), reason=NO_DATA)
def test_clean_runs_on_real_hc18_sample():
    from service.decode import decode_image

    cfg = CleanConfig(size=96)
    paths = _sample("hc18", 20)
    assert len(paths) >= 40
    for path in paths:
        frame = decode_image(path.read_bytes())
        out = clean_frame(frame, cfg)
        assert out.shape == (96, 96) and out.dtype == np.uint8
        assert out.mean() > 10  # the fan was found, not an empty crop
        fan = fan_mask(cv2.resize(frame, (256, 173), interpolation=cv2.INTER_AREA), cfg)
        assert 0.3 <= fan.mean() <= 0.98  # HC18 frames: the fan less the margins and anonymisation box


@pytest.mark.skipif(not (DATA / "fetal_planes_db" / "images").is_dir(), reason=NO_DATA)
def test_clean_runs_on_real_fetal_planes_sample():
    from service.decode import decode_image

    cfg = CleanConfig(size=64)
    for path in _sample("fetal_planes_db", 3):
        x = preprocess(decode_image(path.read_bytes()), cfg)
        assert x.shape == (1, 64, 64) and x.dtype == np.float32 and np.isfinite(x).all()
