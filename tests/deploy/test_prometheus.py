"""deploy/prometheus: the configs and rules pass promtool, the rule tests pass, the queries use only the
metrics and labels that service/metrics.py exports, and a real Prometheus scrapes and evaluates them.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.metrics import MetricWrapperBase

from service import metrics
from tests.deploy.tools import free_port, require_executable, stop

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "rules.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "fusc-dashboard.json"
SERVICE_API = REPO / "service" / "api.py"
# Labels Prometheus itself adds (job, instance), the relabelled Kubernetes object names, histogram bounds.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "le"}
# Every label a fusc_* metric may carry. None of them can hold a value that comes from an image or a
# caller: no patient name or ID, accession number, file name or DICOM UID may ever become a label.
PATIENT_FREE_LABELS = {
    "stage",
    "cluster",
    "code",
    "endpoint",
    "status",
    "name",
    "version",
    "backend",
    "reason",
}
PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
}
READY_TIMEOUT_S = 10.0
SERIES_TIMEOUT_S = 30.0


def promtool() -> str:
    return require_executable("promtool", "prometheus")


def run_promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


# ------------------------------------------------------------------------------- what the service exports
def exported_metrics() -> dict[str, tuple[str, ...]]:
    """Every series name service/metrics.py exposes, with the labels it carries."""
    series: dict[str, tuple[str, ...]] = {}
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        # prometheus_client has no public accessor for a metric's label names before a child exists.
        name, labels, kind = value._name, tuple(value._labelnames), value._type
        if kind == "counter":
            series[f"{name}_total"] = labels
        elif kind == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                series[name + suffix] = labels
        else:
            series[name] = labels
    return series


def promql_expressions() -> dict[str, str]:
    """Every PromQL expression of rules.yml and of the dashboard, by where it is."""
    exprs: dict[str, str] = {}
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            exprs[f"rules.yml {rule.get('record') or rule.get('alert')}"] = rule["expr"]
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel["targets"]:
            exprs[f"dashboard '{panel['title']}' {target['refId']}"] = target["expr"]
    return exprs


def test_metric_labels_are_patient_free() -> None:
    for name, labels in exported_metrics().items():
        assert set(labels) <= PATIENT_FREE_LABELS, f"{name} has labels {labels}"


def test_queries_use_only_exported_metrics_and_labels() -> None:
    exported = exported_metrics()
    allowed_labels = TARGET_LABELS | {label for labels in exported.values() for label in labels}
    for where, expr in promql_expressions().items():
        names = set(re.findall(r"(?<![\w:])fusc_[a-z_]+", expr))
        unknown = names - set(exported)
        assert not unknown, f"{where} uses {unknown}, not in service/metrics.py"
        grouped = {
            label.strip()
            for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr)
            for label in group.split(",")
            if label.strip()
        }
        matched = set(re.findall(r"[{,]\s*([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", expr))
        assert (grouped | matched) - PROMQL_KEYWORDS <= allowed_labels, f"{where} uses unknown labels"


def test_low_confidence_threshold_is_a_bucket_bound() -> None:
    """le="0.5" only matches if 0.5 is a bound of fusc_confidence, formatted as prometheus_client does."""
    bounds = {prometheus_client.utils.floatToGoString(b) for b in metrics.CONFIDENCE._upper_bounds}
    for where, expr in promql_expressions().items():
        if "fusc_confidence_bucket" in expr:
            for bound in re.findall(r'fusc_confidence_bucket\{[^}]*le="([^"]+)"', expr):
                assert bound in bounds, f"{where}: le={bound} is not a bucket bound of fusc_confidence"


def test_endpoint_names_match_the_service() -> None:
    served = set(re.findall(r'_endpoint\("(\w+)"', SERVICE_API.read_text()))
    assert {"cluster", "cluster_batch"} <= served, f"service/api.py counts requests as {sorted(served)}"
    for where, expr in promql_expressions().items():
        for pattern in re.findall(r'endpoint=~?"([^"]+)"', expr):
            for name in pattern.split("|"):
                assert name in served, f"{where}: endpoint {name!r} is not one the service counts"


# --------------------------------------------------------------------------------------------------- promtool
def test_rules_pass_promtool_check() -> None:
    result = run_promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass() -> None:
    result = run_promtool("test", "rules", "rules_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    alerts = {
        r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r
    }
    assert alerts == {
        "FuscHighErrorRate",
        "FuscHighLatency",
        "FuscNoTraffic",
        "FuscLowConfidence",
        "FuscDown",
        "FuscClusterMixDrift",
    }
    firing: set[str] = set()
    quiet: set[str] = set()
    for test in yaml.safe_load((PROMETHEUS_DIR / "rules_test.yml").read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            (firing if case["exp_alerts"] else quiet).add(case["alertname"])
    assert firing == alerts and quiet == alerts


def test_local_config_passes_promtool_check() -> None:
    result = run_promtool("check", "config", "prometheus.local.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_config_passes_promtool_check(tmp_path: Path) -> None:
    result = run_promtool("check", "config", "prometheus.yml")
    if result.returncode == 0:
        return
    output = result.stdout + result.stderr
    # Debian builds Prometheus without Kubernetes service discovery (its client library is not packaged).
    # Then check the discovery blocks' shape here and the rest of the file with static targets in their place.
    assert "field kubernetes_sd_configs not found" in output, output
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    for job in config["scrape_configs"]:
        for sd in job.pop("kubernetes_sd_configs"):
            assert set(sd) == {"role", "namespaces"} and sd["role"] == "endpoints"
            assert sd["namespaces"] == {"names": ["fusc"]}
        job["static_configs"] = [{"targets": ["127.0.0.1:3000"]}]
    (tmp_path / "rules.yml").write_text(RULES.read_text())
    (tmp_path / "pacs-rules.yml").write_text((PROMETHEUS_DIR / "pacs-rules.yml").read_text())
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = run_promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_scrape_jobs_match_the_alerts() -> None:
    """The alerts select job="fusc"; both configs must name the service's job so."""
    for name in ("prometheus.yml", "prometheus.local.yml"):
        jobs = [j["job_name"] for j in yaml.safe_load((PROMETHEUS_DIR / name).read_text())["scrape_configs"]]
        assert jobs[0] == "fusc", name
    assert 'job="fusc"' in RULES.read_text()


# -------------------------------------------------------------------------------------- a real Prometheus
def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def query(base: str, expr: str) -> dict[str, Any]:
    return get_json(f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")


def wait_for(what: str, check: Any, timeout_s: float, log: Path) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except OSError as exc:
            last = exc
        time.sleep(0.25)
    pytest.fail(f"{what} not seen within {timeout_s:.0f} s (last: {last!r})\n{log.read_text()[-3000:]}")


@pytest.fixture()
def exporter() -> Iterator[int]:
    """A tiny /metrics endpoint on 127.0.0.1 standing in for the service: one fusc_requests_total counter."""
    registry = CollectorRegistry()
    requests = Counter("fusc_requests_total", "HTTP requests", ["endpoint", "status"], registry=registry)
    requests.labels(endpoint="cluster", status="200").inc(3)
    port = free_port()
    server, thread = prometheus_client.start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        yield port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture()
def prometheus(exporter: int, tmp_path: Path) -> Iterator[str]:
    """The real Prometheus with prometheus.local.yml and rules.yml, pointed at the exporter."""
    binary = require_executable("prometheus", "prometheus")
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.local.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(RULES)]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{exporter}"]}]
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            "Prometheus ready",
            lambda: urllib.request.urlopen(f"{base}/-/ready", timeout=2).status == 200,
            READY_TIMEOUT_S,
            log,
        )
        yield base
    finally:
        stop(process, timeout=10)


@pytest.mark.integration
def test_prometheus_scrapes_the_counter_and_loads_the_rules(prometheus: str, tmp_path: Path) -> None:
    log = tmp_path / "prometheus.log"
    result = wait_for(
        "fusc_requests_total scraped",
        lambda: query(prometheus, 'fusc_requests_total{job="fusc"}')["data"]["result"],
        SERIES_TIMEOUT_S,
        log,
    )
    (sample,) = result
    assert sample["metric"]["endpoint"] == "cluster" and sample["metric"]["status"] == "200"
    assert float(sample["value"][1]) == 3.0
    assert query(prometheus, 'up{job="fusc"}')["data"]["result"][0]["value"][1] == "1"

    def groups_evaluated() -> list[dict[str, Any]] | None:
        groups = get_json(f"{prometheus}/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return groups if rules and all(r["health"] == "ok" for r in rules) else None

    groups = wait_for("every rule evaluated without error", groups_evaluated, SERIES_TIMEOUT_S, log)
    assert {g["name"] for g in groups} == {"fusc.recording", "fusc.alerts"}
    # Against a live target, FuscDown's condition is false (its alert may still show as pending from the
    # evaluation before the first scrape, hence the expression rather than /api/v1/alerts).
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert query(prometheus, rules["FuscDown"]["query"])["data"]["result"] == []


@pytest.mark.integration
def test_dashboard_queries_run_on_prometheus(prometheus: str) -> None:
    """Every dashboard query, with Grafana's variables filled in, is valid PromQL for this Prometheus."""
    substitutions = {"$__rate_interval": "1m", "$__range": "1h", "$job": "fusc"}
    for where, expr in promql_expressions().items():
        for variable, value in substitutions.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"{where}: unknown variable in {expr}"
        assert query(prometheus, expr)["status"] == "success", where
