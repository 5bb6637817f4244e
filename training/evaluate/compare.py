"""One table across training recipes: for each run folder (a run over several seeds, ``seeds.json`` and
``seed-N/``, or a single run), the held-out figures on one labelled source as mean ± std over its seeds:
FUSC purity / NMI / ACC, the cluster step before self-labeling, k-means on the served embeddings, k-means on
raw pixels, the linear probe, the mined neighbours' label agreement, the confident shares after the cluster
step and at the end, and the wall time per seed; the exact commands are listed under the table.

``python -m training.evaluate.compare NAME=RUN_DIR ... --out comparison.md [--json comparison.json]``"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from training.evaluate.report import (
    _dig,
    _read_json,
    common_source,
    fmt_mean_std,
    key_figures,
    mean_std_n,
    pretrained_start,
    run_summaries,
    threshold_of,
)

# (key of training.evaluate.report.key_figures, column header, digits); "{thr}" is the self-labeling
# threshold.
COLUMNS = (
    ("fusc_purity", "FUSC purity", 3),
    ("fusc_nmi", "FUSC NMI", 3),
    ("fusc_acc", "FUSC ACC", 3),
    ("cluster_step_purity", "FUSC cluster step purity", 3),
    ("kmeans_purity", "k-means (served embeddings) purity", 3),
    ("fusc_minus_kmeans_purity", "FUSC − k-means purity", 3),
    ("raw_pixels_purity", "raw-pixel k-means purity", 3),
    ("linear_probe", "linear probe", 3),
    ("neighbour_agreement", "neighbour agreement (train)", 3),
    ("confident_cluster_step", "p ≥ {thr} after cluster step (train)", 3),
    ("confident_final", "p ≥ {thr} at the end (train)", 3),
    ("seconds", "seconds per seed", 0),
)


def _card_for(folder: Path, seed: str, summary: dict, extra: Path | None = None) -> dict | None:
    """The model card a seed's run wrote, when it can be found and belongs to that run (same seed, same
    held-out figures): ``folder/model_repository`` or ``extra`` (the repository a multi-seed run exported)."""
    for repo in (folder / "model_repository", extra):
        if repo is None:
            continue
        card = _read_json(Path(repo) / "model_card.json")
        if not card:
            continue
        prov = card.get("provenance") or {}
        if seed and str(prov.get("seed", seed)) != seed:
            continue
        if _dig(card, "quality", "heldout_inductive") != _dig(summary, "quality", "heldout_inductive"):
            continue
        return card
    return None


def load_recipe(name: str, run_dir: Path, model_repository: Path | None = None) -> dict:
    """One recipe: each seed's summary and configuration, and the commands that made them (from the model
    cards: each seed's ``model_repository/``, the first seed's in ``model_repository`` when given, else
    where the run exported it)."""
    run_dir = Path(run_dir)
    runs = run_summaries(run_dir)
    agg = _read_json(run_dir / "seeds.json")
    exported = Path(agg["model_repository"]) if agg and agg.get("model_repository") else None
    exported = model_repository or exported
    commands: dict[str, dict] = {}
    for i, (seed, summary, _, folder) in enumerate(runs):
        card = _card_for(folder, seed, summary, exported if i == 0 else None)
        command = _dig(card, "provenance", "command") if card else None
        if command:
            entry = commands.setdefault(
                command, {"command": command, "seeds": [], "git_commit": set(), "reconstructed": False}
            )
            entry["git_commit"].add(_dig(card, "provenance", "git_commit") or "")
        else:
            config_file = run_dir / "config.json" if agg else folder / "config.json"
            command = shlex.join(
                [
                    "python",
                    "-m",
                    "training",
                    "train",
                    "--config",
                    str(config_file),
                    "--run-dir",
                    str(run_dir),
                ]
            )
            entry = commands.setdefault(
                command, {"command": command, "seeds": [], "git_commit": set(), "reconstructed": True}
            )
        entry["seeds"].append(seed)
    return {
        "name": name,
        "run_dir": str(run_dir),
        "runs": runs,
        "config": runs[0][2] if runs else {},
        "commands": [{**c, "git_commit": sorted(x for x in c["git_commit"] if x)} for c in commands.values()],
    }


def compare(recipes: list[dict], source: str | None = None) -> dict:
    """Mean ± std (ddof=1) of each key figure per recipe on the held-out images of ``source`` (default:
    the labelled source every run has, "phantoms" when it is one)."""
    if source is None:
        source = common_source([s.get("quality") or {} for r in recipes for _, s, _, _ in r["runs"]])
    out = {"source": source, "recipes": []}
    for r in recipes:
        figures = [key_figures(s.get("quality") or {}, source, s.get("seconds")) for _, s, _, _ in r["runs"]]
        stats = {}
        for key, _, _ in COLUMNS:
            values = [f[key] for f in figures]
            stat = mean_std_n(values)
            stats[key] = (
                None if stat is None else {"mean": stat[0], "std": stat[1], "n": stat[2], "values": values}
            )
        thresholds = {threshold_of(s.get("quality") or {}, c) for _, s, c, _ in r["runs"]} - {None}
        out["recipes"].append(
            {
                "name": r["name"],
                "run_dir": r["run_dir"],
                "seeds": [seed for seed, _, _, _ in r["runs"]],
                "threshold": thresholds.pop() if len(thresholds) == 1 else None,
                "start": pretrained_start(r["config"]),
                "figures": stats,
                "commands": r["commands"],
                "resumed": [seed for seed, s, _, _ in r["runs"] if s.get("resumed_stages")],
            }
        )
    return out


def _seeds(seeds: list[str]) -> str:
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(seeds)


def markdown(table: dict, invocation: str = "") -> str:
    """The comparison as Markdown: the table, what its columns are, and each recipe's commands."""
    recipes = table["recipes"]
    thresholds = {r["threshold"] for r in recipes}
    common_thr = thresholds.pop() if len(thresholds) == 1 else None
    thr_head = f"{common_thr:g}" if common_thr is not None else "threshold"
    head = ["recipe", "seeds"] + [label.format(thr=thr_head) for _, label, _ in COLUMNS]
    lines = [
        f"# Recipes compared on held-out {table['source'] or '(no labelled source)'}",
        "",
        "Each row is one recipe (one run folder); each figure is the mean ± sample standard deviation "
        'over its seeds (a single value for one seed; "(n of N)" where only n seeds recorded it). '
        f"Held-out subjects of {table['source']}, except the columns marked train (the training "
        "subjects' images). FUSC: the served clusters, after self-labeling; FUSC cluster step: the same "
        "model before self-labeling; k-means: the same K on the embeddings the model serves, or on raw "
        "pixels; FUSC − k-means: per seed, then averaged; linear probe: accuracy of logistic regression on "
        "the served embeddings, fitted on the training subjects (the supervised bound); neighbour "
        "agreement: share of the mined neighbours that carry the image's label; p ≥ threshold: share of "
        "the training images whose top cluster probability reaches the self-labeling threshold; seconds: "
        "wall time of one seed's whole run.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in recipes:
        cells = [r["name"], str(len(r["seeds"]))]
        for key, _, digits in COLUMNS:
            s = r["figures"][key]
            cell = fmt_mean_std(
                None if s is None else (s["mean"], s["std"], s["n"]), digits, of=len(r["seeds"])
            )
            if key.startswith("confident") and common_thr is None and r["threshold"] is not None and s:
                cell += f" (p ≥ {r['threshold']:g})"
            if key == "seconds" and r["resumed"] and s:
                cell += " †"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    resumed = [f"{r['name']} ({_seeds(r['resumed'])})" for r in recipes if r["resumed"]]
    if resumed:
        lines += [
            "",
            "† Resumed runs, where the seconds cover only the last invocation (stages loaded from "
            "checkpoints are not counted): " + ", ".join(resumed) + ".",
        ]
    lines += ["", "## Commands", ""]
    for r in recipes:
        lines += [
            f"**{r['name']}** (`{r['run_dir']}`, {_seeds(r['seeds'])})"
            + (f"; backbone start: {r['start']}" if r["start"] else "")
            + ":",
            "",
            "```bash",
        ]
        notes = []
        for c in r["commands"]:
            lines.append(c["command"])
            if c["reconstructed"]:
                notes.append(
                    f"{_seeds(c['seeds'])}: no model card of this run was found, so the command "
                    "is rebuilt from its config.json (the same settings)"
                )
            elif c["git_commit"]:
                notes.append(f"{_seeds(c['seeds'])}: git commit {', '.join(c['git_commit'])}")
        lines += ["```", ""]
        if notes:
            text = "; ".join(notes)
            lines += [text[:1].upper() + text[1:] + ".", ""]
    if invocation:
        lines += [f"Table made by `{invocation}`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.evaluate.compare", description=__doc__)
    ap.add_argument("recipes", nargs="+", metavar="NAME=RUN_DIR", help="a row name and its run folder")
    ap.add_argument("--out", type=Path, required=True, help="the Markdown table")
    ap.add_argument("--json", type=Path, help="the same figures as JSON")
    ap.add_argument(
        "--model-repository",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="where a row's (first seed's) model repository is, for its command; a single run does not "
        "record where it exported",
    )
    ap.add_argument("--source", help="the labelled source (default: the one every run has; phantoms first)")
    args = ap.parse_args(argv)

    def pair(item: str) -> tuple[str, str]:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            ap.error(f"expected NAME=PATH, got {item!r}")
        return name, path

    repos = {name: Path(path) for name, path in map(pair, args.model_repository)}
    rows = [pair(item) for item in args.recipes]
    if unknown := sorted(set(repos) - {name for name, _ in rows}):
        ap.error(f"--model-repository for unknown rows: {', '.join(unknown)}")
    recipes = [load_recipe(name, Path(run_dir), repos.get(name)) for name, run_dir in rows]
    table = compare(recipes, args.source)
    invocation = "python -m training.evaluate.compare " + shlex.join(
        sys.argv[1:] if argv is None else list(argv)
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(table, invocation))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(table, indent=2, ensure_ascii=False) + "\n")
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
