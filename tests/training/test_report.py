"""The run report's sections on synthetic run folders: FUSC against k-means on the same embeddings, the mined
neighbours, cluster sizes, confidence before/after self-labeling (table, per-epoch shares, histogram), what
self-labeling changed, the backbone start; the seeds report's key figures; and the committed older
summaries (fewer fields, no outputs.npz) still render."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from training.evaluate.report import (  # noqa: E402
    key_figures,
    pretrained_start,
    versus_kmeans,
    write_report,
    write_seeds_report,
)

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"


def _metrics(purity: float, nmi: float = 0.5) -> dict:
    return {"purity": purity, "nmi": nmi, "acc": purity, "ari": 0.2, "filled_clusters": 3}


def quality(fusc: float = 0.7, step: float = 0.6, km: float = 0.6, confident=(0.25, 0.5)) -> dict:
    res = {
        "n": 20,
        "classes": 3,
        "fusc_cluster_step": _metrics(step, 0.4),
        "fusc": _metrics(fusc, 0.6),
        "kmeans_embeddings": _metrics(km, 0.45),
        "kmeans_raw_pixels": _metrics(0.3, 0.1),
    }

    def conf(share: float) -> dict:
        qs = dict(zip(("0.05", "0.25", "0.5", "0.75", "0.95"), (0.4, 0.6, 0.8, 0.95, 0.999), strict=True))
        return {"quantiles": qs, "share_confident": share, "threshold": 0.99}

    return {
        "train_transductive": {"phantoms": {**res, "n": 40}},
        "heldout_inductive": {"phantoms": res},
        "linear_probe_heldout": {"phantoms": {"embeddings": 0.9, "raw_pixels": 0.4}},
        "neighbor_accuracy_train": 0.8125,
        "cluster_sizes_train": [20, 0, 15, 5],
        "confidence_train": {"cluster_step": conf(confident[0]), "final": conf(confident[1])},
        "selflabel_changed": {
            "share_reassigned": 0.125,
            "confident_before": confident[0],
            "confident_after": confident[1],
        },
        "ssl_loss_per_epoch": [4.0, 3.5],
        "ssl_health": {"mean_pair_cosine": 0.3, "effective_rank": 20.0, "collapsed": False, "reasons": []},
        "cluster_loss_history": [[-1.0, -1.1], [-1.2, -1.3]],
        "selflabel": {
            "history": [{"confident_share": 0.25, "loss": 0.5}, {"confident_share": 0.375, "loss": 0.25}]
        },
        "overcluster": None,
        "skipped_files": {},
    }


def config(init: str = "imagenet", ssl_epochs: int = 10, selflabel_epochs: int = 2) -> dict:
    return {
        "name": "fusc",
        "version": "0.1.0",
        "seed": 0,
        "clean": {"size": 96},
        "ssl": {"method": "simclr", "backbone": "efficientnet-lite0", "init": init, "epochs": ssl_epochs},
        "cluster": {
            "num_clusters": 4,
            "neighbors": 5,
            "entropy_weight": 5.0,
            "views": 4,
            "standardize": True,
        },
        "selflabel": {"epochs": selflabel_epochs, "threshold": 0.99},
    }


def write_run(folder: Path, q: dict, cfg: dict, seconds: float = 12.5, outputs: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(
        json.dumps({"seconds": seconds, "resumed_stages": [], "card_version": "0.1.0", "quality": q})
    )
    (folder / "config.json").write_text(json.dumps(cfg))
    if outputs:
        rng = np.random.default_rng(0)
        n, k = 24, 4
        probs = rng.dirichlet(np.ones(k) * 0.3, n)
        np.savez_compressed(
            folder / "outputs.npz",
            embeddings=rng.normal(size=(n, 8)),
            probs=probs,
            probs_cluster_step=rng.dirichlet(np.ones(k), n),
            frames=rng.integers(0, 255, (n, 16, 16), dtype=np.uint8),
            paths=np.array([f"img{i}.png" for i in range(n)]),
            labels=np.array(["a", "b", "c"] * (n // 3)),
            sources=np.array(["phantoms"] * n),
            subjects=np.array([str(i // 2) for i in range(n)]),
            held_out=np.arange(n) >= 18,
        )
    return folder


def test_single_report_states_the_issue_sections(tmp_path):
    run = write_run(tmp_path / "run", quality(), config(), outputs=True)
    md = write_report(run).read_text()
    assert "Backbone start: ImageNet EfficientNet-Lite0 weights, adapted by 10 epochs of SimCLR" in md
    assert "cluster step on 4 augmented-view embeddings per image and standardised inputs" in md
    # FUSC against k-means on the same embeddings, in words.
    assert "FUSC beats k-means on the same (served) embeddings by 0.100 purity (0.700 vs 0.600)" in md
    # Mined neighbours, cluster sizes.
    assert "## Mined neighbours" in md and "(training subjects; share of an image's neighbours" in md
    assert ": 0.812." in md
    assert "| images | 20 | 0 | 15 | 5 |" in md and "| share | 50.0% | 0.0% | 37.5% | 12.5% |" in md
    assert "3 of 4 clusters hold training images; largest / smallest of them 20 / 5." in md
    # Confidence after the cluster step and after self-labeling: quantiles, shares, histogram, epochs.
    assert "| cluster step | 0.400 | 0.600 | 0.800 | 0.950 | 0.999 | 0.250 |" in md
    assert "| self-labeling (served) | 0.400 | 0.600 | 0.800 | 0.950 | 0.999 | 0.500 |" in md
    assert "![confidence histogram](confidence.png)" in md and (run / "confidence.png").stat().st_size > 0
    assert "| epoch | share at p ≥ 0.99 | loss |" in md
    assert "| 1 | 0.250 | 0.5000 |" in md and "| 2 | 0.375 | 0.2500 |" in md
    # What self-labeling changed.
    assert "Self-labeling moved 12.5% of the training images to another cluster." in md
    assert (
        "Held-out purity before → after self-labeling: phantoms 0.600 → 0.700 (+0.100; NMI 0.400 → 0.600)."
        in md
    )
    assert "Share of the training images at p ≥ 0.99: 0.250 → 0.500." in md
    page = (run / "report.html").read_text()
    assert '<img src="confidence.png"' in page and "<td>0.250</td>" in page


def test_report_without_selflabeling_or_outputs(tmp_path):
    q = quality(fusc=0.6, step=0.6, km=0.603)
    q["selflabel"] = {"history": []}
    q["selflabel_changed"] = None
    q["neighbor_accuracy_train"] = None  # some images unlabelled
    run = write_run(tmp_path / "run", q, config(ssl_epochs=0, selflabel_epochs=0))
    md = write_report(run).read_text()
    assert "ImageNet EfficientNet-Lite0 weights, pretrained features only" in md
    assert "FUSC ties with k-means on the same (served) embeddings (purity difference -0.003)" in md
    assert "Not measured: some training images have no label." in md
    assert "No self-labeling in this run: the served clusters are the cluster step's." in md
    assert "confidence.png" not in md and "tsne" not in md and "gallery" not in md


def test_phrases():
    assert versus_kmeans(-0.05, 0.55, 0.6).startswith(
        "FUSC loses to k-means on the same (served) embeddings by 0.050"
    )
    assert "within seed noise" in versus_kmeans(0.02, noise=0.03)
    assert "within seed noise" not in versus_kmeans(0.04, noise=0.03)
    assert pretrained_start(config(init="scratch")).startswith(
        "efficientnet-lite0 from a random initialisation"
    )
    assert pretrained_start({}) == ""
    cfg = config()
    cfg["ssl"]["freeze_blocks"] = 5
    assert pretrained_start(cfg).endswith("(stem and first 5 blocks kept fixed)")


def test_key_figures_fall_back_for_older_summaries():
    q = quality()
    f = key_figures(q, "phantoms", 3.0)
    assert f["fusc_minus_kmeans_purity"] == pytest.approx(0.1) and f[
        "selflabel_gain_purity"
    ] == pytest.approx(0.1)
    assert (f["confident_cluster_step"], f["confident_final"], f["seconds"]) == (0.25, 0.5, 3.0)
    del q["confidence_train"], q["selflabel_changed"], q["linear_probe_heldout"]
    f = key_figures(q, "phantoms")
    assert f["confident_cluster_step"] is None and f["share_reassigned"] is None and f["linear_probe"] is None
    assert key_figures({}, None)["fusc_purity"] is None


@pytest.mark.parametrize(
    "folder",
    sorted(
        p.parent.relative_to(RESULTS).as_posix()
        for p in RESULTS.glob("**/summary.json")
        if not (p.parent / "run.json").exists()  # an archive run's summary, not a training run's
    ),
)
def test_committed_summaries_still_render(tmp_path, folder):
    """Every committed summary renders with its report alone (no outputs.npz): older ones say what they do not
    record, newer ones show it."""
    for name in ("summary.json", "config.json"):
        if (RESULTS / folder / name).exists():
            shutil.copy(RESULTS / folder / name, tmp_path / name)
    md = write_report(tmp_path).read_text()
    assert "## Mined neighbours" in md and "## Cluster sizes" in md and "## What self-labeling changed" in md
    recorded = "confidence_train" in json.loads((tmp_path / "summary.json").read_text())["quality"]
    missing = "The confidence distribution is not recorded in this run's summary." in md
    assert missing != recorded


def test_seeds_report_carries_the_key_figures(tmp_path):
    per_seed = {}
    for seed, (fusc, km, seconds) in enumerate(((0.6, 0.65, 100.0), (0.8, 0.65, 120.0))):
        q = quality(fusc=fusc, step=0.6, km=km, confident=(0.1 * (seed + 1), 0.5))
        cfg = {**config(), "seed": seed}
        write_run(tmp_path / f"seed-{seed}", q, cfg, seconds=seconds)
        per_seed[str(seed)] = q
    (tmp_path / "config.json").write_text(json.dumps({**config(), "seeds": [0, 1]}))
    (tmp_path / "seeds.json").write_text(
        json.dumps({"seeds": [0, 1], "split_seed": 0, "quality": {}, "per_seed": per_seed})
    )
    md = write_seeds_report(tmp_path).read_text()
    assert "Backbone start: ImageNet EfficientNet-Lite0 weights, adapted by 10 epochs of SimCLR." in md
    assert "Held-out figures on phantoms." in md
    assert "| FUSC purity (held out) | 0.700 ± 0.141 | 0.600, 0.800 |" in md
    assert (
        "| FUSC − k-means on the same embeddings, purity (held out) | 0.050 ± 0.141 | -0.050, 0.150 |" in md
    )
    assert "| share at p ≥ 0.99 after the cluster step (train) | 0.150 ± 0.071 | 0.100, 0.200 |" in md
    assert "| wall time per seed, s | 110 ± 14 | 100, 120 |" in md
    assert (
        "FUSC beats k-means on the same (served) embeddings by 0.050 purity (0.700 vs 0.650), within seed "
        "noise (std of the difference 0.141)" in md
    )
    assert (
        "Self-labeling moved 0.125 ± 0.000 of the training images to another cluster; changed held-out " in md
    )
