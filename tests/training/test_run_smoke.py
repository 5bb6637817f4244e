"""A whole training run at toy scale: phantoms -> SimCLR -> kNN -> FUSC heads -> ONNX repository."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from service.card import load_card  # noqa: E402
from service.clean import preprocess  # noqa: E402
from training.cli import main  # noqa: E402
from training.phantoms import generate_dataset  # noqa: E402


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    generate_dataset(root, 96, seed=3, progress=False)
    return root


def test_cli_train_writes_a_valid_repository(phantom_dir, tmp_path):
    out, run_dir = tmp_path / "repo", tmp_path / "run"
    rc = main(
        [
            "train",
            "--preset",
            "smoke",
            "--data",
            f"csv:{phantom_dir}",
            "--test-fraction",
            "0.25",
            "--out",
            str(out),
            "--run-dir",
            str(run_dir),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--name-clusters-from-labels",
            "--version",
            "9.9.9",
        ]
    )
    assert rc == 0
    card = load_card(out, verify=True)
    assert card.version == "9.9.9"
    assert card.num_clusters == 4 and card.preprocess.size == 32
    assert card.provenance.command.startswith("python -m training train --preset smoke")
    assert (out / "fusc_ensemble" / "config.pbtxt").exists()

    # The exported pair reproduces the training-time predictions written into the card's quality.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["quality"]["heldout_inductive"], "held-out subjects must be evaluated"
    assert sum(summary["quality"]["cluster_sizes_train"]) > 0
    (probe,) = summary["quality"]["linear_probe_heldout"].values()
    assert 0.0 <= probe["embeddings"] <= 1.0 and 0.0 <= probe["raw_pixels"] <= 1.0
    report = (run_dir / "report.md").read_text()
    assert "Supervised bound" in report
    assert "Held-out subjects (inductive)" in report and "kmeans_raw_pixels" in report
    for png in ("losses.png", "tsne_labels.png", "tsne_clusters.png", "gallery.png"):
        assert (run_dir / png).stat().st_size > 1000

    bb = ort.InferenceSession(str(card.backbone.path(out)))
    head = ort.InferenceSession(str(card.head.path(out)))
    import cv2

    frames = [
        cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in sorted((phantom_dir / "images").glob("*.png"))[:5]
    ]
    x = np.stack([preprocess(f, card.preprocess) for f in frames]).astype(np.float32)
    emb = bb.run(None, {"image": x})[0]
    probs = head.run(None, {"embedding": emb})[0]
    assert emb.shape == (5, card.embedding_dim)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert probs.shape == (5, 4)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_checksum_mismatch_is_refused(phantom_dir, tmp_path):
    out = tmp_path / "repo"
    main(
        [
            "train",
            "--preset",
            "smoke",
            "--data",
            f"csv:{phantom_dir}",
            "--out",
            str(out),
            "--run-dir",
            str(tmp_path / "run"),
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    with open(load_card(out).head.path(out), "ab") as f:
        f.write(b"\0")
    from service.errors import ModelRepositoryError

    with pytest.raises(ModelRepositoryError, match="SHA-256"):
        load_card(out, verify=True)
