"""deploy/grafana: the dashboard is importable JSON with the panels on-call needs.

Its queries are checked against service/metrics.py and run on a real Prometheus in test_prometheus.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "fusc-dashboard.json"
GRID_WIDTH = 24


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_identity_and_variables(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "fusc-overview" and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    assert variables["job"]["current"]["value"] == "fusc"


def test_panels_are_well_formed(dashboard: dict[str, Any]) -> None:
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= GRID_WIDTH, panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            # Every fusc_* query is scoped to the selected job (a Prometheus may scrape several deployments).
            if "fusc_" in target["expr"]:
                assert 'job=~"$job"' in target["expr"], (panel["title"], target["expr"])


def test_dashboard_covers_what_on_call_looks_at(dashboard: dict[str, Any]) -> None:
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for needle in (
        "rate(fusc_requests_total",  # request rate
        "sum by (code) (rate(fusc_errors_total",  # errors by code
        "histogram_quantile(0.50, sum by (stage, le) (rate(fusc_stage_latency_seconds_bucket",
        "histogram_quantile(0.95, sum by (stage, le) (rate(fusc_stage_latency_seconds_bucket",
        "fusc_batch_size_bucket",
        "sum by (cluster) (rate(fusc_cluster_assignments_total",
        "sum by (le) (increase(fusc_confidence_bucket",  # the confidence histogram
        "fusc_cluster_mix_divergence",  # drift against the training mix
        'fusc_errors_total{job=~"$job", code="overloaded"}',  # load shedding
        "fusc_inflight_images",
    ):
        assert needle in exprs, needle
