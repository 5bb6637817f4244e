"""A whole training run at toy scale: phantoms -> SimCLR -> kNN -> FUSC heads -> ONNX repository; and one
over a DICOM folder with two seeds, over-clustering and the HTML report."""

import json
import re
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from service.card import load_card  # noqa: E402
from service.clean import preprocess  # noqa: E402
from training.cli import main  # noqa: E402
from training.data.phantoms import generate_dataset  # noqa: E402


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    generate_dataset(root, 96, seed=3, progress=False)
    return root


@pytest.fixture(scope="module")
def trained(phantom_dir, tmp_path_factory):
    """One smoke run shared by the tests below: (rc, model repository, run folder)."""
    tmp = tmp_path_factory.mktemp("trained")
    out, run_dir = tmp / "repo", tmp / "run"
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
            str(tmp / "cache"),
            "--name-clusters-from-labels",
            "--version",
            "9.9.9",
            "--threads",
            "1",
        ]
    )
    return rc, out, run_dir


def test_cli_train_writes_a_valid_repository(trained, phantom_dir):
    rc, out, run_dir = trained
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
    for png in ("losses.png", "tsne_labels.png", "tsne_clusters.png", "gallery.png", "confidence.png"):
        assert (run_dir / png).stat().st_size > 1000
    # The HTML report says the same and shows the same images, by relative path.
    page = (run_dir / "report.html").read_text()
    assert "Supervised bound" in page and "<td>kmeans_raw_pixels</td>" in page
    assert sorted(re.findall(r'<img src="([^"]+)"', page)) == [
        "confidence.png",
        "gallery.png",
        "losses.png",
        "tsne_clusters.png",
        "tsne_labels.png",
    ]
    # Phantom views merge by region in the coarse table (paper Table 2).
    assert "Merged coarse views" in report
    assert all("coarse" in res for res in summary["quality"]["train_transductive"].values())
    # Every stage left its checkpoint.
    assert sorted(p.stem for p in (run_dir / "checkpoints").glob("*.pt")) == ["cluster", "selflabel", "ssl"]

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


def test_service_answers_an_image_file_as_training_scored_it(trained):
    """No train/serve skew: a training image's file, sent as bytes through the service's pipeline (embedded
    ONNX Runtime), gets the probabilities the run itself wrote for it into outputs.npz."""
    from pathlib import Path

    from service.pipeline import load_pipeline
    from service.settings import Settings

    rc, out, run_dir = trained
    assert rc == 0
    outputs = np.load(run_dir / "outputs.npz")
    paths, probs, held = outputs["paths"], outputs["probs"], outputs["held_out"]
    assert len(paths) == len(probs) == len(held)
    # A few training and a few held-out images, by their row of outputs.npz.
    rows = [*np.flatnonzero(~held)[:4], *np.flatnonzero(held)[:2]]
    assert len(rows) == 6
    data = [Path(str(paths[i])).read_bytes() for i in rows]

    pipeline = load_pipeline(Settings(model_repository=out, ort_intra_op_threads=1))
    x = np.stack([pipeline.prepare(b).tensor for b in data])
    np.testing.assert_allclose(pipeline.infer(x).probs, probs[rows], atol=1e-4, rtol=0)
    # A smoke model's probabilities are nearly uniform, so a skew moves them little (one gray level on the
    # input: ~4e-4); its embeddings move ~30x more, and must agree as well.
    emb = pipeline.backend.embed(x)
    np.testing.assert_allclose(emb, outputs["embeddings"][rows], atol=1e-4, rtol=0)
    # The answers of a cluster call carry the same numbers (the top clusters of each row).
    for row, result in zip(rows, pipeline.cluster(data), strict=True):
        assert not isinstance(result, Exception), result
        assert probs[row, result.cluster] >= probs[row].max() - 1e-4  # the top cluster (up to a near tie)
        for top in result.top:
            assert abs(top.probability - probs[row, top.cluster]) <= 1e-4


def test_checksum_mismatch_is_refused(trained, tmp_path):
    out = tmp_path / "repo"
    shutil.copytree(trained[1], out)
    with open(load_card(out).head.path(out), "ab") as f:
        f.write(b"\0")
    from service.errors import ModelRepositoryError

    with pytest.raises(ModelRepositoryError, match="SHA-256"):
        load_card(out, verify=True)


IDENTIFIERS = re.compile(rb"PHANTOM\^|PH\d{4}")


def test_dicom_folder_two_seeds_overclustering_and_report(tmp_path):
    """DICOM phantoms (patient ids PH0000...), with a truncated file and a text file among them."""
    gen = generate_dataset(tmp_path / "gen", 40, seed=4, dicom=True, progress=False)
    archive = tmp_path / "archive"
    (gen / "dicom").rename(archive)
    rows = (gen / "labels.csv").read_text().splitlines()
    (archive / "labels.csv").write_text(
        "filename,label\n"
        + "\n".join(f"{r.split(',')[0][:-4]}.dcm,{r.split(',')[1]}" for r in rows[1:])
        + "\n"
    )
    first = sorted(archive.glob("*.dcm"))[0].read_bytes()
    (archive / "broken.dcm").write_bytes(first[: len(first) // 3])
    (archive / "README.txt").write_text("exported from the archive")
    out, run_dir, cache = tmp_path / "repo", tmp_path / "run", tmp_path / "cache"
    argv = ["train", "--preset", "smoke", "--data", f"dicom:{archive}", "--test-fraction", "0.25"]
    argv += ["--seeds", "0", "1", "--overcluster", "8", "--threads", "1"]
    argv += ["--out", str(out), "--run-dir", str(run_dir), "--cache-dir", str(cache)]
    assert main(argv) == 0

    # Mean ± std of every metric over the two seeds, from the seeds' own summaries.
    agg = json.loads((run_dir / "seeds.json").read_text())
    assert agg["seeds"] == [0, 1] and set(agg["per_seed"]) == {"0", "1"}
    per = [json.loads((run_dir / f"seed-{s}" / "summary.json").read_text())["quality"] for s in (0, 1)]
    key = "heldout_inductive/archive/fusc/purity"
    values = [q["heldout_inductive"]["archive"]["fusc"]["purity"] for q in per]
    assert agg["quality"][key]["mean"] == pytest.approx(np.mean(values))
    assert agg["quality"][key]["std"] == pytest.approx(np.std(values, ddof=1))
    assert "heldout_inductive/archive/fusc_overcluster/nmi" in agg["quality"]
    # Both seeds evaluate the same held-out subjects; --out holds seed 0's model, seed 1 has its own.
    held = [np.load(run_dir / f"seed-{s}" / "outputs.npz")["held_out"] for s in (0, 1)]
    np.testing.assert_array_equal(held[0], held[1])
    assert load_card(out).provenance.seed == 0
    assert load_card(run_dir / "seed-1" / "model_repository").provenance.seed == 1

    # The undecodable file is skipped and counted by its error code; the text file is not an image.
    assert per[0]["skipped_files"] == {"corrupt_image": 1}
    seed_report = (run_dir / "seed-0" / "report.md").read_text()
    assert "`corrupt_image` 1" in seed_report and "## Over-clustering (K = 8)" in seed_report
    assert "Merged coarse views" in seed_report
    assert per[0]["overcluster"]["k"] == 8
    for name in ("report.md", "report.html"):
        assert "0." in (run_dir / name).read_text() and "±" in (run_dir / name).read_text()
    page = (run_dir / "seed-0" / "report.html").read_text()
    for src in re.findall(r'<img src="([^"]+)"', page):
        assert (run_dir / "seed-0" / src).stat().st_size > 1000

    # No patient identifier anywhere the run wrote (subjects are keyed hashes).
    subjects = np.load(run_dir / "seed-0" / "outputs.npz")["subjects"]
    assert all(s.startswith("dcm-") for s in subjects) and len(set(subjects)) > 1
    for folder in (run_dir, out, cache):
        for f in folder.rglob("*"):
            if f.is_file() and f.suffix in {".json", ".md", ".html", ".csv", ".txt", ".pbtxt", ".npz"}:
                data = f.read_bytes()
                if f.suffix == ".npz":
                    arrays = np.load(f)
                    data = b" ".join(arrays[k].tobytes() for k in arrays.files if arrays[k].dtype.kind == "U")
                    data = data.decode("utf-32-le", "ignore").encode()
                assert not IDENTIFIERS.search(data), f


def test_split_seed_flag_reaches_the_run_config(phantom_dir, tmp_path):
    run_dir = tmp_path / "run"
    argv = ["train", "--preset", "smoke", "--data", f"csv:{phantom_dir}", "--test-fraction", "0.25"]
    argv += ["--seed", "3", "--split-seed", "7", "--stop-after", "ssl:1", "--threads", "1"]
    argv += ["--out", str(tmp_path / "repo"), "--run-dir", str(run_dir), "--cache-dir", str(tmp_path / "c")]
    assert main(argv) == 3  # stopped as asked, after the config was written
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["seed"] == 3 and cfg["split_seed"] == 7
