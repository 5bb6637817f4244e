"""Phantom generator: determinism, exact overlay masks, dataset layout, DICOM, and views that raw pixels or
mean brightness do not separate."""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from training.data.phantoms import (
    VIEWS,
    Phantom,
    PhantomConfig,
    generate,
    generate_dataset,
    iter_phantoms,
    main,
)


@pytest.fixture(scope="module")
def sample() -> list[Phantom]:
    # Shared by the statistics tests: big enough for stable purity, small enough to stay fast (~6 s).
    return list(iter_phantoms(600, seed=3, size=(96, 128)))


def _digest(ph: Phantom) -> str:
    return hashlib.sha256(ph.image.tobytes() + ph.overlay_mask.tobytes()).hexdigest()


def test_same_seed_same_bytes_and_different_seed_differs():
    a = [_digest(p) for p in iter_phantoms(12, seed=5)]
    b = [_digest(p) for p in iter_phantoms(12, seed=5)]
    c = [_digest(p) for p in iter_phantoms(12, seed=6)]
    assert a == b
    assert not set(a) & set(c)
    assert _digest(generate(9, "femur", "P0001")) == _digest(generate(9, "femur", "P0001"))


def test_phantom_fields_and_fan():
    ph = generate(0, "brain", "P0007")
    assert ph.image.dtype == np.uint8 and ph.image.shape == (240, 320)
    assert ph.overlay_mask.dtype == bool and ph.overlay_mask.shape == ph.image.shape
    assert ph.label == "brain" and ph.subject == "P0007" and ph.text
    assert 0.3 < ph.fan_mask.mean() < 0.95
    assert (ph.clean[~ph.fan_mask] == 0).all(), "outside the field the frame is black"
    inside = ph.clean[ph.fan_mask]
    assert inside.std() > 20, "speckle, fluid and bone give a wide grey range"
    small = generate(0, "spine", cfg=PhantomConfig(size=(100, 150)))
    assert small.image.shape == (100, 150)


def test_unknown_view_is_refused():
    with pytest.raises(ValueError, match="unknown view"):
        generate(0, "elbow")


def test_overlay_mask_is_exact(sample: list[Phantom]):
    for ph in sample[:200]:
        changed = ph.image != ph.clean
        # Nothing outside the mask was touched...
        assert not (changed & ~ph.overlay_mask).any()
        # ...and the masked pixels did change, except where the pixel already had the overlay's value
        # (black box over black border, bright text over saturated bone, faint antialiased edges).
        unchanged = ph.overlay_mask & ~changed
        assert unchanged.sum() <= 0.1 * ph.overlay_mask.sum() + (ph.clean[unchanged] == 0).sum()
    covered = np.mean([ph.overlay_mask.mean() for ph in sample])
    assert 0.005 < covered < 0.15
    assert any(ph.overlay_mask.any() and ((ph.image == 0) & ph.overlay_mask).sum() > 100 for ph in sample), (
        "some frames carry an anonymisation box"
    )


def test_text_names_view_only_when_asked():
    def annotated(ph: Phantom) -> bool:
        return any(s in {"HC", "AC", "FL", "4CH", "SPINE", "PROFILE", "KIDNEYS", "CERVIX"} for s in ph.text)

    named = list(iter_phantoms(16, seed=1, text_names_view=True))
    assert all(annotated(ph) for ph in named)
    plain = list(iter_phantoms(16, seed=1))
    assert not any(annotated(ph) for ph in plain)
    assert {ph.label for ph in plain} == set(VIEWS)
    assert all(not any(v in " ".join(ph.text) for v in VIEWS) for ph in plain)
    bare = generate(3, "abdomen", cfg=PhantomConfig(overlays=False))
    assert not bare.overlay_mask.any() and bare.text == [] and (bare.image == bare.clean).all()


def test_subjects_hold_several_views(sample: list[Phantom]):
    counts = Counter(ph.label for ph in sample)
    assert set(counts) == set(VIEWS) and max(counts.values()) - min(counts.values()) <= 1
    by_subject: dict[str, set[str]] = {}
    for ph in sample:
        by_subject.setdefault(ph.subject, set()).add(ph.label)
    assert 50 <= len(by_subject) <= 150
    assert np.mean([len(v) >= 3 for v in by_subject.values()]) > 0.8


def _purity(assign: np.ndarray, labels: np.ndarray) -> float:
    return sum(Counter(labels[assign == c]).most_common(1)[0][1] for c in np.unique(assign)) / len(labels)


def test_kmeans_on_raw_pixels_does_not_recover_views(sample: list[Phantom]):
    cv2 = pytest.importorskip("cv2")
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    x = np.stack([cv2.resize(ph.image, (32, 32), interpolation=cv2.INTER_AREA).ravel() for ph in sample])
    labels = np.array([ph.label for ph in sample])
    km = sklearn_cluster.KMeans(n_clusters=len(VIEWS), n_init=2, random_state=0).fit(
        x.astype(np.float32) / 255
    )
    purity = _purity(km.labels_, labels)
    assert purity <= 0.6, f"raw-pixel k-means purity {purity:.2f}: views are trivially separable"


def test_mean_brightness_does_not_tell_views_apart(sample: list[Phantom]):
    means = np.array([ph.image[ph.fan_mask].mean() for ph in sample])
    labels = np.array([ph.label for ph in sample])
    per_view = {v: means[labels == v] for v in VIEWS}
    # Every view's interquartile range overlaps every other view's.
    q = {v: np.percentile(m, [25, 75]) for v, m in per_view.items()}
    for a in VIEWS:
        for b in VIEWS:
            assert q[a][0] <= q[b][1] and q[b][0] <= q[a][1], (a, b, q[a], q[b])
    # The best nearest-class-mean rule on brightness alone stays near chance (1/8).
    centres = np.array([per_view[v].mean() for v in VIEWS])
    guess = np.array(VIEWS)[np.abs(means[:, None] - centres[None, :]).argmin(axis=1)]
    assert (guess == labels).mean() < 0.3


def test_dataset_layout_labels_and_dicom(tmp_path: Path):
    pydicom = pytest.importorskip("pydicom")
    out = generate_dataset(tmp_path / "ds", 10, seed=2, size=(120, 160), dicom=True, progress=False)
    with open(out / "labels.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["filename", "label", "subject"]
        rows = list(reader)
    assert len(rows) == 10 and {r["label"] for r in rows} <= set(VIEWS)
    import cv2

    for r in rows:
        img = cv2.imread(str(out / "images" / r["filename"]), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(out / "masks" / r["filename"]), cv2.IMREAD_UNCHANGED)
        assert img.shape == (120, 160) and img.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}
        ds = pydicom.dcmread(out / "dicom" / r["filename"].replace(".png", ".dcm"))
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.6.1" and ds.Modality == "US"
        assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsStored == 8
        assert str(ds.PatientName).startswith("PHANTOM^")
        assert (ds.pixel_array == img).all()
    again = generate_dataset(tmp_path / "again", 10, seed=2, size=(120, 160), dicom=True, progress=False)
    for sub in ("images", "masks", "dicom"):
        for f in sorted((out / sub).iterdir()):
            assert f.read_bytes() == (again / sub / f.name).read_bytes(), (
                f"{sub}/{f.name} is not reproducible"
            )
    assert (out / "labels.csv").read_bytes() == (again / "labels.csv").read_bytes()


def test_cli_prints_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["--out", str(tmp_path / "cli"), "--n", "8", "--size", "80", "100", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 8 phantoms" in printed and all(v in printed for v in VIEWS)
    assert len(list((tmp_path / "cli" / "images").glob("*.png"))) == 8
