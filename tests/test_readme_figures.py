"""The figures the README quotes from committed results are the ones those results hold."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def block(name: str, text: str = README) -> str:
    match = re.search(rf"<!-- {name} -->(.*?)<!-- /{name} -->", text, re.S)
    assert match, f"no {name} block"
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


def test_load_and_memory_figures_match_the_committed_benchmarks() -> None:
    load = json.loads((ROOT / "benchmarks" / "results" / "load.json").read_text())
    memory = json.loads((ROOT / "benchmarks" / "results" / "memory.json").read_text())
    text = block("load-figures")
    rss = memory["rss_mib"]
    ok = memory["wave"]["statuses"].get("200", 0) + memory["steady"]["statuses"].get("200", 0)
    shed = memory["wave"]["statuses"].get("503", 0) + memory["steady"]["statuses"].get("503", 0)
    assert f"peaked at {rss['peak_overall']} MiB" in text
    assert f"(limit {rss['limit']:g} MiB; {ok} answered 200, {shed} shed with 503" in text
    assert memory["pass"] and rss["peak_overall"] <= rss["limit"]
    cap, at80, at2 = load["capacity"], load["at_80_percent"], load["at_2x"]
    assert f"Capacity {cap['images_per_s']} images/s" in text
    assert f"(concurrency {cap['concurrency']})" in text
    assert f"({at2['answered_200_per_s']} images/s, p99 {at2['p99_ms']} ms) and 503" in text
    assert at2["only_200_or_503"] and set(at2["statuses"]) <= {"200", "503"}
    assert f"resident memory +{at2['rss_growth'] * 100:.1f} %" in text
    ratio = f"p99 was {at80['p99_over_p50']:.1f}x p50 ({at80['p99_ms']} vs {at80['p50_ms']} ms)"
    assert ratio in text
    assert ("not met" in text) == (at80["p99_over_p50"] > 3.0)


def test_pacs_figures_in_the_docs_match_the_committed_benchmark() -> None:
    data = json.loads((ROOT / "benchmarks" / "results" / "pacs.json").read_text())
    text = block("pacs-figures", (ROOT / "docs" / "pacs.md").read_text())
    n = data["instances"]
    assert f"**{data['end_to_end_instances_per_s']} instances/s** ({n} in {data['seconds_total']} s)" in text
    assert f"| {data['cstore_acknowledged_per_s']} instances/s |" in text
    assert f"p50 {data['latency_s']['p50']} s, p95 {data['latency_s']['p95']} s" in text
    assert f"| {data['bare_pipeline_instances_per_s']} instances/s |" in text
    assert f"| {data['ratio_pacs_to_bare_pipeline']} |" in text


def test_archive_pool_figures_in_the_docs_match_the_committed_benchmark() -> None:
    data = json.loads((ROOT / "benchmarks" / "results" / "archive.json").read_text())
    text = block("archive-pool", (ROOT / "docs" / "archive.md").read_text())
    pool, single = data["pool_steady_images_per_s"], data["single_process_steady_images_per_s"]
    assert f"{pool} against {single} images/s steady = **{data['pool_over_single']}x**" in text
    assert f"= {data['pool_over_single_with_start_up']}x with the pool's start-up" in text
