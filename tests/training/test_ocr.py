"""OCR pseudo-labels: the text -> view table on hand-worked cases, the noise report, the EasyOCR guard, and
tesseract on phantoms whose burnt-in text names the view.

Needs the tesseract binary for the reading tests (CI: apt-get install -y tesseract-ocr tesseract-ocr-eng;
pip install pytesseract); they skip without it. The rest runs anywhere.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from training.data import ocr
from training.data.phantoms import VIEW_ANNOTATION, generate_dataset, iter_phantoms

needs_tesseract = pytest.mark.skipif(
    not ocr.tesseract_available(),
    reason="tesseract binary or pytesseract missing (apt-get install -y tesseract-ocr tesseract-ocr-eng; "
    "pip install pytesseract)",
)


# ------------------------------------------------------------------------------------- the table
@pytest.mark.parametrize(
    ("text", "view"),
    [
        ("4CH", "thorax_4ch"),
        ("4-CH", "thorax_4ch"),
        ("4 ch", "thorax_4ch"),
        ("FOUR CHAMBER", "thorax_4ch"),
        ("Four-chamber", "thorax_4ch"),
        ("|4CH", "thorax_4ch"),  # edge junk from the OCR
        ("LVOT", "thorax_lvot"),
        ("LV0T", "thorax_lvot"),  # O read as zero
        ("RVOT", "thorax_rvot"),
        ("3VV", "thorax_3vv"),
        ("3VT", "thorax_3vv"),
        ("TT", "brain_tt"),
        ("TV", "brain_tv"),
        ("TC", "brain_tc"),  # alone, TC is the trans-cerebellar plane ...
        ("4CH\nTC 22.84cm", "thorax_4ch"),  # ... followed by a length, the thoracic circumference
        ("TC 22.84cm", "thorax_4ch"),
        ("HC", "brain"),
        ("hc 17.2 cm", "brain"),
        ("HC25.47cm", "brain"),  # the reading glued to its label
        ("BPD 5.1cm", "brain"),
        ("TT\nBPD 5.1cm\nHC 18.2cm", "brain_tt"),  # a named sub-plane takes the generic evidence
        ("AC", "abdomen"),
        ("AG", "abdomen"),  # alone on its line, a C crossed by a tick mark misread
        ("He", "brain"),
        ("ae", None),  # lower case all through: speckle read as a word, not a misread "AC"
        ("AG 12.1cm", None),  # not alone on its line
        ("APD 7.87cm\nTAD 8.58cm", "abdomen"),
        ("FL", "femur"),
        ("F L 65.7mm", "femur"),  # a space the OCR put inside a word
        ("FLOW 12cm/s", None),  # a word that merely starts like a short name
        ("FL 65.7mm", "femur"),
        ("SPINE", "spine"),
        ("SP1NE", "spine"),  # I read as one
        ("SPIRE", "spine"),  # one wrong letter in a long word
        ("PROFILE", "profile"),
        ("PR0FILE", "profile"),
        ("PORFILE", "profile"),  # two letters swapped
        ("FACE", "profile"),
        ("LIPS", "lips"),
        ("lips", "lips"),
        ("LlPS", "lips"),  # lower-case l for I
        ("NOSE/LIPS", "lips"),
        ("KIDNEYS", "kidneys"),
        ("KIDNEY", "kidneys"),
        ("CERVIX", "cervix"),
        ("CL 3.4cm", "cervix"),
        ("C1 17.2cm", None),  # a numbered caliper, not the cervical length
        ("D1 5.56cm\nTIs 0.8\nMI 1.1\nGn 45\nFR 30Hz", None),  # machine parameters name no view
        ("4CH\nSPINE", None),  # two plane names: no label
        ("", None),
    ],
)
def test_view_from_text(text: str, view: str | None) -> None:
    assert ocr.view_from_text(text) == view


def test_taxonomy_has_15_views_and_covers_the_phantom_views() -> None:
    assert len(ocr.TAXONOMY) == 15
    assert set(ocr.VIEWS) == {v.name for v in ocr.TAXONOMY} | {"other"}
    for view, annotation in VIEW_ANNOTATION.items():
        assert view in ocr.VIEWS
        assert ocr.view_from_text(annotation) == view


def test_plane_names_outweigh_measurements() -> None:
    scores = ocr.view_scores("SPINE\nTC 12.1cm")
    assert scores == {"spine": ocr.PLANE_WEIGHT, "thorax_4ch": ocr.MEASURE_WEIGHT}
    assert ocr.view_from_text("SPINE\nTC 12.1cm") == "spine"


# ------------------------------------------------------------------------------------- the report
def test_noise_report_counts_worked_by_hand() -> None:
    views = ["brain", "brain_tt", None, "abdomen", "femur"]
    labels = ["Fetal brain", "Fetal brain", "Fetal brain", "Fetal thorax", None]
    planes = ["Trans-thalamic", "Trans-thalamic", None, None, None]
    r = ocr.noise_report(views, labels, planes)
    assert r["images"] == 5 and r["labelled_by_ocr"] == 4 and r["coverage"] == 0.8
    assert r["per_view"] == {"abdomen": 1, "brain": 1, "brain_tt": 1, "femur": 1, "none": 1}
    # coarse: 4 comparable (the unlabelled femur is not); brain, brain, none, abdomen-vs-heart
    assert r["coarse"]["comparable"] == 4
    assert r["coarse"]["accuracy_all"] == 0.5
    assert r["coarse"]["accuracy_labelled"] == round(2 / 3, 4)
    assert r["coarse"]["confusion"] == {"brain": {"brain": 2, "none": 1}, "heart": {"abdomen": 1}}
    # fine: only the two images whose label names a sub-plane
    assert r["fine"]["comparable"] == 2
    assert r["fine"]["accuracy_all"] == 0.5


def test_noise_report_reads_labels_through_the_taxonomy() -> None:
    # A sub-plane label (fpdb-fine data) names the plane; "Other" names nothing text on screen can name;
    # a phantom label is the view itself.
    views = ["brain_tc", "brain_tt", "cervix", "kidneys"]
    labels = ["Trans-cerebellum", "Other", "Maternal cervix", "kidneys"]
    r = ocr.noise_report(views, labels)
    assert r["fine"]["comparable"] == 2 and r["fine"]["accuracy_all"] == 1.0
    assert r["coarse"]["comparable"] == 3 and r["coarse"]["accuracy_all"] == 1.0


# ------------------------------------------------------------------------------------- EasyOCR guard
def test_easyocr_reader_refuses_without_easyocr_or_with_a_wrong_pin(tmp_path, monkeypatch) -> None:
    import importlib.util

    if importlib.util.find_spec("easyocr") is None:
        with pytest.raises(ocr.OcrUnavailableError, match="easyocr is not installed"):
            ocr.EasyOCRReader(tmp_path, {"craft_mlt_25k.pth": "0" * 64})
    # Pretend it is installed: the weights are checked before easyocr is imported.
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "easyocr" else real(name, *a)
    )
    (tmp_path / "craft_mlt_25k.pth").write_bytes(b"not the pinned weights")
    with pytest.raises(ocr.OcrUnavailableError, match="refusing to load"):
        ocr.EasyOCRReader(tmp_path, {"craft_mlt_25k.pth": "0" * 64})
    with pytest.raises(ocr.OcrUnavailableError, match="missing"):
        ocr.EasyOCRReader(tmp_path, {"english_g2.pth": "0" * 64})
    with pytest.raises(ocr.OcrUnavailableError, match="no SHA-256 pins"):
        ocr.EasyOCRReader(tmp_path, {})


# ------------------------------------------------------------------------------------- finding lines
def test_text_lines_finds_the_lines_and_skips_markers() -> None:
    frame = np.zeros((240, 320), np.uint8)
    cv2.ellipse(frame, (160, 0), (220, 220), 0, 45, 135, 90, -1)  # a dim sector
    cv2.putText(frame, "KIDNEYS", (4, 200), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 230, 1, cv2.LINE_8)
    cv2.putText(frame, "D1 5.56cm", (4, 216), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 230, 1, cv2.LINE_8)
    cv2.drawMarker(frame, (160, 100), 255, cv2.MARKER_CROSS, 7, 1)  # a lone caliper marker
    cv2.line(frame, (300, 20), (300, 220), 255, 1)  # a depth scale
    lines = ocr.text_lines(frame)
    assert len(lines) == 2
    for crop in lines:
        assert crop.shape[0] == ocr.LineConfig().target_height
        assert crop.shape[1] > 2 * crop.shape[0]  # a line, wider than tall
        assert crop.min() < 80 and np.median(crop) > 200  # dark text on white paper


def test_a_bar_through_a_line_is_taken_out_of_the_crop_on_request() -> None:
    frame = np.zeros((240, 320), np.uint8)
    cv2.ellipse(frame, (160, 0), (220, 220), 0, 45, 135, 90, -1)
    cv2.putText(frame, "KIDNEYS", (200, 200), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 230, 1, cv2.LINE_8)
    cv2.line(frame, (204, 20), (204, 230), 230, 1)  # a depth scale through the K's upright

    def full_height_columns(crop: np.ndarray) -> int:
        return int(((crop < 128).mean(axis=0) > 0.9).sum())

    (kept,) = ocr.text_lines(frame)
    (dropped,) = ocr.text_lines(frame, cfg=ocr.LineConfig(drop_bars=True))
    assert full_height_columns(kept) >= 1  # the bar crosses the whole crop
    assert full_height_columns(dropped) == 0
    assert (dropped < 128).sum() >= 0.6 * (kept < 128).sum()  # the letters themselves stay


# ------------------------------------------------------------------------------------- tesseract
def _accuracy(n: int, seed: int) -> float:
    phantoms = list(iter_phantoms(n, seed, text_names_view=True))
    labelled = ocr.pseudo_label_many([p.image for p in phantoms])
    return sum(view == p.label for (view, _), p in zip(labelled, phantoms, strict=True)) / n


@needs_tesseract
def test_pseudo_label_reads_a_clear_line() -> None:
    frame = np.zeros((200, 400), np.uint8)
    cv2.putText(frame, "4CH", (10, 180), cv2.FONT_HERSHEY_SIMPLEX, 0.6, 255, 1, cv2.LINE_AA)
    cv2.putText(frame, "TC 22.84cm", (10, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.6, 255, 1, cv2.LINE_AA)
    view, raw = ocr.pseudo_label(frame)
    assert view == "thorax_4ch", raw


@needs_tesseract
def test_pseudo_labels_on_phantoms_that_name_their_view() -> None:
    # Measured 0.975 on this seed (120 images, ~25 s), held out while the reading was tuned on seeds 0 and
    # 7 (0.958, 0.950); 0.958 on seed 12. What is still missed: a view name lying on bright tissue or
    # across the fan's edge where the overlay mask loses most of its glyphs; see docs/cleaning.md.
    assert _accuracy(120, seed=11) >= 0.95


@needs_tesseract
@pytest.mark.slow
def test_pseudo_labels_on_many_phantoms() -> None:
    assert _accuracy(400, seed=5) >= 0.95  # measured 0.963


@needs_tesseract
def test_cli_writes_a_noise_report(tmp_path) -> None:
    data = generate_dataset(tmp_path / "ph", 8, seed=3, text_names_view=True, progress=False)
    out = tmp_path / "report.json"
    assert ocr.main(["--data", f"csv:{data}", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    entry = report["datasets"][f"csv:{data}"]
    assert entry["images"] == 8 and 0.0 <= entry["coverage"] <= 1.0
    assert sum(entry["per_view"].values()) == 8
    assert entry["fine"]["comparable"] == 8 and "confusion" in entry["coarse"]
    assert "text" not in json.dumps(report).lower().replace("text_", "")  # no raw OCR text in the report
