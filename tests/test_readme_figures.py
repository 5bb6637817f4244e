"""The figures the README quotes from committed results are the ones those results hold."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def block(name: str) -> str:
    match = re.search(rf"<!-- {name} -->(.*?)<!-- /{name} -->", README, re.S)
    assert match, f"the README has no {name} block"
    return " ".join(match.group(1).split())


def pct_range(values: list[float]) -> str:
    return f"{min(values) * 100:.1f}-{max(values) * 100:.1f} %"


def test_review_naming_figures_match_the_measurement() -> None:
    data = json.loads((ROOT / "docs" / "results" / "review" / "naming.json").read_text())
    trained = [r for r in data["results"] if "cervix" not in r["views"]]
    unseen = [r for r in data["results"] if "cervix" in r["views"]]
    text = block("review-figures")
    assert f"{len(trained[0]['views'])} views ({data['n_images']} images, {len(trained)} seeds)" in text
    assert f"labelled {pct_range([r['correct'] for r in trained])} of images correctly" in text
    decisions = {r["decisions"] for r in trained}
    assert f"with {max(decisions)} decisions (K + 20 = {trained[0]['budget']})" in text
    assert all(r["decisions"] <= r["budget"] == r["K"] + 20 for r in data["results"])
    assert f"with an unseen view added, {pct_range([r['correct'] for r in unseen])}" in text


def test_archive_figures_match_the_committed_run() -> None:
    summary = json.loads((ROOT / "docs" / "results" / "archive" / "summary.json").read_text())
    text = block("archive-figures")
    assert f"covers {summary['counts']['items']:,} images" in text
    assert f"{summary['counts']['errors']} corrupt" in text
