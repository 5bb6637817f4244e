"""The evaluation tables on cases worked by hand: merged coarse views (paper Table 2), over-clustering
(Table 3), mean ± std over seeds, and the HTML form of the report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from training.evaluate.metrics import COARSE_VIEWS, coarse_map, flatten_numbers, mean_std, to_coarse

pytest.importorskip("sklearn")


def test_coarse_map_defaults_and_overrides(tmp_path):
    m = coarse_map()
    assert m["Trans-thalamic"] == m["Trans-cerebellum"] == m["Trans-ventricular"] == "Fetal brain"
    assert m["brain"] == m["profile"] == "head" and m["kidneys"] == "abdomen"
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"profile": "face", "Fetal femur": "limb"}))
    m = coarse_map(path)
    assert m["profile"] == "face" and m["Fetal femur"] == "limb" and m["brain"] == "head"
    assert COARSE_VIEWS["profile"] == "head"  # the defaults themselves are untouched
    path.write_text(json.dumps(["not", "a", "map"]))
    with pytest.raises(ValueError, match="JSON object"):
        coarse_map(path)
    labels = to_coarse(["Trans-thalamic", "Fetal femur", "", "Other"], coarse_map())
    assert labels.tolist() == ["Fetal brain", "Fetal femur", "", "Other"]


def test_evaluate_scores_coarse_views_and_overclustering():
    from training.evaluate.quality import evaluate

    # Two brain sub-planes, each found as its own cluster, and femurs in one cluster.
    labels = [
        "Trans-thalamic",
        "Trans-thalamic",
        "Trans-cerebellum",
        "Trans-cerebellum",
        "Fetal femur",
        "Fetal femur",
    ]
    fusc = np.array([0, 0, 1, 1, 2, 2])
    over = np.array([0, 1, 2, 3, 4, 4])
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(6, 4)).astype(np.float32)
    frames = rng.integers(0, 255, (6, 32, 32), dtype=np.uint8)
    sources = ["fpdb"] * 4 + ["fpdb"] * 2
    res = evaluate({"fusc": fusc, "fusc_overcluster": over}, emb, frames, labels, sources, 3, 0, coarse_map())
    r = res["fpdb"]
    assert r["n"] == 6 and r["classes"] == 3
    assert r["fusc"]["purity"] == 1.0 and r["fusc"]["acc"] == 1.0
    # Over-clustering: 5 filled clusters, every one pure; Hungarian ACC matches 3 of them (1 + 1 + 2 images).
    assert r["fusc_overcluster"]["filled_clusters"] == 5
    assert r["fusc_overcluster"]["purity"] == 1.0
    assert r["fusc_overcluster"]["acc"] == pytest.approx(4 / 6)
    # Coarse: brain (4 images, split over clusters 0 and 1) and femur; purity stays 1, ACC matches one brain
    # cluster only: (2 + 2) / 6.
    c = r["coarse"]
    assert c["classes"] == 2
    assert c["fusc"]["purity"] == 1.0 and c["fusc"]["acc"] == pytest.approx(4 / 6)
    assert set(c) >= {"fusc", "fusc_overcluster", "kmeans_embeddings", "kmeans_raw_pixels"}
    # A source that no mapping merges gets no coarse table.
    res = evaluate({"fusc": fusc}, emb, frames, ["a", "a", "b", "b", "c", "c"], sources, 3, 0, coarse_map())
    assert "coarse" not in res["fpdb"]


def test_mean_std_over_runs():
    runs = [
        {"split": {"src": {"fusc": {"purity": 0.5, "filled_clusters": 4}}}, "flag": True, "sizes": [1, 2]},
        {"split": {"src": {"fusc": {"purity": 0.7, "filled_clusters": 6}}}, "flag": False, "sizes": [3]},
        {"split": {"src": {"fusc": {"purity": 0.9, "filled_clusters": 5}, "only_here": 1.0}}},
    ]
    assert flatten_numbers(runs[0]) == {"split/src/fusc/purity": 0.5, "split/src/fusc/filled_clusters": 4.0}
    agg = mean_std(runs)
    assert set(agg) == {"split/src/fusc/purity", "split/src/fusc/filled_clusters"}
    assert agg["split/src/fusc/purity"]["mean"] == pytest.approx(0.7)
    assert agg["split/src/fusc/purity"]["std"] == pytest.approx(0.2)  # sample std of 0.5, 0.7, 0.9
    assert agg["split/src/fusc/filled_clusters"] == {"mean": 5.0, "std": 1.0, "n": 3}
    assert mean_std(runs[:1])["split/src/fusc/purity"]["std"] == 0.0
    assert mean_std([]) == {}


def test_markdown_to_html_keeps_the_content():
    from training.evaluate.report import markdown_to_html

    md = "\n".join(
        [
            "# Report <x>",
            "",
            "Some **bold** text with `code`",
            "continued on a second line.",
            "",
            "| method | purity |",
            "|---|---|",
            "| fusc | 0.912 |",
            "",
            "![t-SNE by label](tsne_labels.png) ![gallery](gallery.png)",
            "",
            "- seed 0: [report](seed-0/report.html)",
        ]
    )
    page = markdown_to_html(md, "title")
    assert page.startswith("<!DOCTYPE html>") and "<title>title</title>" in page
    assert "<h1>Report &lt;x&gt;</h1>" in page
    assert "<p>Some <strong>bold</strong> text with <code>code</code> continued on a second line.</p>" in page
    assert (
        "<tr><th>method</th><th>purity</th></tr>" in page and "<tr><td>fusc</td><td>0.912</td></tr>" in page
    )
    assert "---" not in page
    assert '<img src="tsne_labels.png" alt="t-SNE by label">' in page and '<img src="gallery.png"' in page
    assert '<a href="seed-0/report.html">report</a>' in page


def test_seeds_report_shows_mean_and_std(tmp_path):
    from training.config import build_config
    from training.evaluate.report import write_seeds_report

    per_seed = {
        str(s): {
            "train_transductive": {
                "phantoms": {
                    "n": 10,
                    "classes": 3,
                    "fusc": {"purity": p, "nmi": 0.5, "acc": p, "ari": 0.1, "filled_clusters": 3},
                    "coarse": {"classes": 2, "fusc": {"purity": 1.0, "nmi": 1.0, "acc": 1.0, "ari": 1.0}},
                }
            },
            "linear_probe_heldout": {"phantoms": {"embeddings": 0.8, "raw_pixels": 0.4}},
        }
        for s, p in ((0, 0.8), (1, 1.0))
    }
    seeds = {
        "seeds": [0, 1],
        "split_seed": 0,
        "quality": mean_std(list(per_seed.values())),
        "per_seed": per_seed,
    }
    (tmp_path / "seeds.json").write_text(json.dumps(seeds))
    (tmp_path / "config.json").write_text(build_config("smoke").model_dump_json())
    md = write_seeds_report(tmp_path).read_text()
    assert "| fusc | 0.900 ± 0.141 | 0.500 ± 0.000 | 0.900 ± 0.141 | 0.100 ± 0.000 | 3.0 ± 0.0 |" in md
    assert "**phantoms**, merged coarse views" in md
    assert "| phantoms | 0.800 ± 0.000 | 0.400 ± 0.000 |" in md
    assert "[report](seed-1/report.html)" in md
    page = (tmp_path / "report.html").read_text()
    assert "<td>0.900 ± 0.141</td>" in page and 'href="seed-0/report.html"' in page


def test_evaluate_scores_the_ssl_embeddings_too_when_the_backbone_was_fine_tuned():
    from training.evaluate.quality import evaluate

    labels = ["a", "a", "a", "b", "b", "b"]
    # Fine-tuned embeddings separate the two labels; the SSL embeddings before fine-tuning split across them.
    tuned = np.array([[1, 0], [1, 0.1], [0.9, 0], [0, 1], [0.1, 1], [0, 0.9]], np.float32)
    ssl = np.array([[1, 0], [0, 1], [1, 0.1], [0.1, 1], [0.9, 0], [0, 0.9]], np.float32)
    frames = np.random.default_rng(0).integers(0, 255, (6, 32, 32), dtype=np.uint8)
    pred = np.array([0, 0, 0, 1, 1, 1])
    r = evaluate({"fusc": pred}, tuned, frames, labels, ["s"] * 6, 2, 0, ssl_embeddings=ssl)["s"]
    assert r["kmeans_embeddings"]["purity"] == 1.0
    assert r["kmeans_ssl_embeddings"]["purity"] == pytest.approx(4 / 6)
    assert (
        "kmeans_ssl_embeddings" not in evaluate({"fusc": pred}, tuned, frames, labels, ["s"] * 6, 2, 0)["s"]
    )
