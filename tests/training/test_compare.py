"""The recipe comparison on synthetic run folders: one row per recipe with mean ± std over its seeds, checked
against numbers worked by hand; a single run beside a multi-seed one; the commands from the model cards,
else rebuilt from config.json; the JSON form."""

import json
from pathlib import Path

from training.evaluate.compare import compare, load_recipe, main, markdown


def _metrics(purity: float, nmi: float) -> dict:
    return {"purity": purity, "nmi": nmi, "acc": purity - 0.1, "ari": 0.1, "filled_clusters": 4}


def _quality(fusc, nmi, step, km, raw, probe, nbr, before, after) -> dict:
    q = {
        "heldout_inductive": {
            "phantoms": {
                "n": 30,
                "classes": 4,
                "fusc": _metrics(fusc, nmi),
                "fusc_cluster_step": _metrics(step, nmi),
                "kmeans_embeddings": _metrics(km, 0.3),
                "kmeans_raw_pixels": _metrics(raw, 0.1),
            }
        },
        "linear_probe_heldout": {"phantoms": {"embeddings": probe, "raw_pixels": 0.3}},
        "neighbor_accuracy_train": nbr,
    }
    if before is not None:
        q["confidence_train"] = {
            "cluster_step": {"quantiles": {}, "share_confident": before, "threshold": 0.99},
            "final": {"quantiles": {}, "share_confident": after, "threshold": 0.99},
        }
    return q


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


CONFIG = {"name": "fusc", "version": "0.1.0", "selflabel": {"epochs": 10, "threshold": 0.99}}
COMMAND = "python -m training train --preset cpu-small --phantoms 3000 --seeds 0 1 2 --run-dir runs/a"


def multi_seed_run(root: Path) -> Path:
    """Three seeds; the figures are chosen so that mean ± std (ddof=1) is easy by hand."""
    run = root / "a"
    rows = [  # fusc, nmi, step, km, raw, probe, nbr, before, after, seconds
        (0.6, 0.50, 0.55, 0.65, 0.3, 0.7, 0.6, 0.1, 0.3, 100.0),
        (0.7, 0.55, 0.65, 0.65, 0.3, 0.8, 0.6, 0.2, 0.4, 110.0),
        (0.8, 0.60, 0.75, 0.65, 0.3, 0.9, 0.6, 0.3, 0.5, 120.0),
    ]
    per_seed = {}
    for seed, (*figures, seconds) in enumerate(rows):
        q = _quality(*figures)
        per_seed[str(seed)] = q
        _write(
            run / f"seed-{seed}" / "summary.json", {"seconds": seconds, "resumed_stages": [], "quality": q}
        )
        _write(run / f"seed-{seed}" / "config.json", {**CONFIG, "seed": seed})
        if seed:  # seed 0's card is in the exported repository named by seeds.json
            repo = run / f"seed-{seed}" / "model_repository"
        else:
            repo = root / "exported"
        card = {"provenance": {"command": COMMAND, "seed": seed, "git_commit": "abc1234"}, "quality": q}
        _write(repo / "model_card.json", card)
    _write(run / "config.json", {**CONFIG, "seeds": [0, 1, 2]})
    _write(
        run / "seeds.json",
        {
            "seeds": [0, 1, 2],
            "split_seed": 0,
            "model_repository": str(root / "exported"),
            "per_seed": per_seed,
        },
    )
    return run


def single_run(root: Path) -> Path:
    """An older single run: no confidence fields, no model card beside it."""
    run = root / "b"
    q = _quality(0.5, 0.4, 0.5, 0.45, 0.28, 0.6, 0.55, None, None)
    _write(run / "summary.json", {"seconds": 42.0, "resumed_stages": ["ssl"], "quality": q})
    _write(run / "config.json", {**CONFIG, "seed": 0, "seeds": []})
    return run


def test_rows_are_mean_and_std_over_seeds(tmp_path):
    a, b = multi_seed_run(tmp_path), single_run(tmp_path)
    table = compare([load_recipe("recipe A", a), load_recipe("recipe B", b)])
    assert table["source"] == "phantoms"
    fig = table["recipes"][0]["figures"]
    # purity 0.6 / 0.7 / 0.8: mean 0.7, std sqrt(((-0.1)^2 + 0 + 0.1^2) / 2) = 0.1
    assert abs(fig["fusc_purity"]["mean"] - 0.7) < 1e-12 and abs(fig["fusc_purity"]["std"] - 0.1) < 1e-12
    assert abs(fig["fusc_minus_kmeans_purity"]["mean"] - 0.05) < 1e-12
    assert fig["seconds"] == {"mean": 110.0, "std": 10.0, "n": 3, "values": [100.0, 110.0, 120.0]}

    md = markdown(table)
    # FUSC purity, NMI, ACC (purity - 0.1), cluster step, k-means, FUSC - k-means (-0.05/0.05/0.15), raw
    # pixels, linear probe, neighbours, confident after the cluster step / at the end, seconds.
    assert (
        "| recipe A | 3 | 0.700 ± 0.100 | 0.550 ± 0.050 | 0.600 ± 0.100 | 0.650 ± 0.100 | 0.650 ± 0.000 "
        "| 0.050 ± 0.100 | 0.300 ± 0.000 | 0.800 ± 0.100 | 0.600 ± 0.000 | 0.200 ± 0.100 | 0.400 ± 0.100 "
        "| 110 ± 10 |" in md
    )
    assert (
        "| recipe B | 1 | 0.500 | 0.400 | 0.400 | 0.500 | 0.450 | 0.050 | 0.280 | 0.600 | 0.550 | — | — "
        "| 42 † |" in md
    )
    assert "p ≥ 0.99 after cluster step (train)" in md
    assert "† Resumed runs" in md and "recipe B (seed 0)" in md
    # Commands: the card's (one command for the three seeds), and one rebuilt from config.json.
    assert md.count(COMMAND) == 1 and "Seeds 0, 1, 2: git commit abc1234." in md
    assert f"python -m training train --config {b / 'config.json'} --run-dir {b}" in md
    assert "no model card of this run was found" in md


def test_a_seed_without_a_figure_is_counted(tmp_path):
    a = multi_seed_run(tmp_path)
    summary = json.loads((a / "seed-2" / "summary.json").read_text())
    del summary["quality"]["linear_probe_heldout"]
    (a / "seed-2" / "summary.json").write_text(json.dumps(summary))
    md = markdown(compare([load_recipe("A", a)]))
    assert "| 0.750 ± 0.071 (2 of 3) |" in md  # the probe over seeds 0 and 1 only


def test_cli_writes_markdown_and_json(tmp_path):
    a, b = multi_seed_run(tmp_path), single_run(tmp_path)
    repo = tmp_path / "repo_b"
    card = {"provenance": {"command": "python -m training train --run-dir b", "seed": 0}}
    card["quality"] = json.loads((b / "summary.json").read_text())["quality"]
    _write(repo / "model_card.json", card)
    out, js = tmp_path / "docs" / "comparison.md", tmp_path / "docs" / "comparison.json"
    argv = [f"A={a}", f"B={b}", "--model-repository", f"B={repo}", "--out", str(out), "--json", str(js)]
    assert main(argv) == 0
    md = out.read_text()
    assert "python -m training train --run-dir b" in md and "no model card" not in md
    assert "Table made by `python -m training.evaluate.compare A=" in md
    data = json.loads(js.read_text())
    assert [r["name"] for r in data["recipes"]] == ["A", "B"] and data["recipes"][0]["seeds"] == [
        "0",
        "1",
        "2",
    ]
    assert data["recipes"][1]["figures"]["confident_final"] is None
