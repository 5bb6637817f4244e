"""deploy/k8s/pacs and deploy/prometheus/pacs-rules.yml: the PACS worker's manifests are valid Kubernetes
1.30, wired to what the worker really reads and serves, consistent with the Orthanc example config, and its
alerts pass promtool and use only the metrics service/pacs/metrics.py exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from service.pacs import metrics as pacs_metrics
from service.pacs.settings import ENV_PREFIX as PACS_PREFIX
from service.pacs.settings import PacsSettings
from service.pacs.writeback import METADATA_KEYS
from service.settings import ENV_PREFIX, Settings
from tests.deploy.kustomize import Doc, key, pod_spec, render
from tests.deploy.tools import require_executable, require_module

REPO = Path(__file__).resolve().parents[2]
PACS = REPO / "deploy" / "k8s" / "pacs"
RULES = REPO / "deploy" / "prometheus" / "pacs-rules.yml"
ORTHANC = REPO / "deploy" / "orthanc" / "orthanc.json"
LABELS = {"app.kubernetes.io/name": "fusc", "app.kubernetes.io/component": "pacs"}


@pytest.fixture(scope="module")
def docs() -> list[Doc]:
    return render(PACS)


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    (doc,) = [d for d in docs if key(d) == (kind, name)]
    return doc


def config(docs: list[Doc]) -> dict[str, str]:
    return find(docs, "ConfigMap", "fusc-pacs-config")["data"]


def container(docs: list[Doc]) -> Doc:
    (c,) = find(docs, "StatefulSet", "fusc-pacs")["spec"]["template"]["spec"]["containers"]
    return c


def test_renders_like_kubectl(docs: list[Doc]) -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (apt-get install -y kubectl); the renderer alone was used")
    out = subprocess.run(
        ["kubectl", "kustomize", str(PACS)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    rendered = [d for d in yaml.safe_load_all(out) if d]
    assert sorted(map(key, rendered)) == sorted(map(key, docs))
    for doc in rendered:
        assert doc == find(docs, *key(doc)), key(doc)


def test_documents_validate_against_kubernetes_schema(docs: list[Doc]) -> None:
    kubernetes_validate = require_module("kubernetes_validate", "kubernetes-validate")
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
        assert doc["metadata"]["namespace"] == "fusc"


def test_configmap_holds_valid_settings(docs: list[Doc]) -> None:
    data = config(docs)
    for name in data:
        if name.startswith(PACS_PREFIX):
            assert name[len(PACS_PREFIX) :].lower() in PacsSettings.model_fields, name
        else:
            assert name.startswith(ENV_PREFIX) and name[len(ENV_PREFIX) :].lower() in Settings.model_fields, (
                name
            )
    PacsSettings.from_env(data)  # raises on a typo or an inconsistent combination
    Settings.from_env(data)
    assert {"configMapRef": {"name": "fusc-pacs-config"}} in container(docs)["envFrom"]


def test_one_pod_owns_the_queue_on_its_volume(docs: list[Doc]) -> None:
    settings = PacsSettings.from_env(config(docs))
    sts = find(docs, "StatefulSet", "fusc-pacs")
    assert sts["spec"]["replicas"] == 1
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    mounts = {m["name"]: m["mountPath"] for m in container(docs)["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == str(settings.data_dir)
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["tmp"] and mounts["tmp"] == "/tmp"
    assert sts["spec"]["selector"]["matchLabels"] == LABELS
    assert sts["spec"]["template"]["metadata"]["labels"].items() >= LABELS.items()
    assert sts["spec"]["serviceName"] == "fusc-pacs"


def test_ports_probes_and_command_match_the_worker(docs: list[Doc]) -> None:
    settings = PacsSettings.from_env(config(docs))
    c = container(docs)
    assert c["command"] == ["python", "-m", "service.pacs", "run"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
        "dicom": settings.port,
        "http": settings.http_port,
    }
    # The routes PacsApp serves (tests/integration/test_pacs.py waits on /readyz of the real worker).
    source = (REPO / "service" / "pacs" / "app.py").read_text()
    for probe, path in {
        "startupProbe": "/livez",
        "livenessProbe": "/livez",
        "readinessProbe": "/readyz",
    }.items():
        assert c[probe]["httpGet"] == {"path": path, "port": "http"}
        assert f'"{path}"' in source
    service = find(docs, "Service", "fusc-pacs")
    assert service["spec"]["selector"] == LABELS
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {
        "dicom": "dicom",
        "http": "http",
    }
    monitor = find(docs, "ServiceMonitor", "fusc-pacs")
    assert monitor["spec"]["selector"]["matchLabels"] == LABELS
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["http"]
    policy = find(docs, "NetworkPolicy", "fusc-pacs")["spec"]
    assert policy["podSelector"]["matchLabels"] == LABELS
    assert [r["ports"][0]["port"] for r in policy["ingress"]] == ["dicom", "http"]


def test_the_same_image_as_the_service_and_a_restricted_pod(docs: list[Doc]) -> None:
    base = render(REPO / "deploy" / "k8s" / "base")
    (api,) = pod_spec(find(base, "Deployment", "fusc"))["containers"]  # type: ignore[index]
    c = container(docs)
    assert c["image"] == api["image"]
    spec = pod_spec(find(docs, "StatefulSet", "fusc-pacs"))
    assert spec is not None and spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] > 0
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = c["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    for resource in ("cpu", "memory"):
        assert c["resources"]["requests"][resource] == c["resources"]["limits"][resource]


def test_orthanc_example_config_routes_to_this_worker(docs: list[Doc]) -> None:
    settings = PacsSettings.from_env(config(docs))
    orthanc = json.loads(ORTHANC.read_text())
    modality = orthanc["DicomModalities"]["fusc-integration"]
    assert modality["AET"] == settings.ae_title and modality["Port"] == settings.port
    assert modality["AllowStore"] is True  # the SR written back by C-STORE
    assert orthanc["DicomAet"] == settings.pacs_ae_title and orthanc["DicomPort"] == settings.pacs_port
    assert orthanc["DicomAet"] in settings.allowed_calling_aets  # Orthanc forwarding to the receiver
    assert orthanc["UserMetadata"] == METADATA_KEYS
    assert all(1024 <= index <= 65535 for index in METADATA_KEYS.values())
    lua = (REPO / "deploy" / "orthanc" / "fusc-routing.lua").read_text()
    assert "SendToModality(instanceId, FUSC_MODALITY)" in lua and "'fusc-integration'" in lua


# ------------------------------------------------------------------------------------------- alerts
def exported() -> dict[str, tuple[str, ...]]:
    series: dict[str, tuple[str, ...]] = {
        "fusc_pacs_queue_jobs": ("state",),
        "fusc_pacs_oldest_job_age_seconds": (),
    }
    for value in vars(pacs_metrics).values():
        if isinstance(value, MetricWrapperBase):
            name, labels, kind = value._name, tuple(value._labelnames), value._type
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(kind, ("",))
            for suffix in suffixes:
                series[name + suffix] = labels
    return series


def test_pacs_metric_labels_are_patient_free() -> None:
    for name, labels in exported().items():
        assert set(labels) <= {"source", "reason", "code", "form", "state"}, (name, labels)


def test_alerts_use_exported_metrics_and_match_the_prometheus_rule(docs: list[Doc]) -> None:
    rules = yaml.safe_load(RULES.read_text())
    series = exported()
    for group in rules["groups"]:
        for rule in group["rules"]:
            names = set(re.findall(r"(?<![\w:])fusc_[a-z_]+", rule["expr"]))
            assert names <= set(series), (rule["alert"], names - set(series))
            for name in names:
                used = set(re.findall(rf"{name}{{([^}}]*)}}", rule["expr"]))
                for matcher in used:
                    labels = {m.split("=")[0].strip() for m in matcher.split(",")}
                    assert labels <= set(series[name]) | {"job"}, (rule["alert"], labels)
    assert find(docs, "PrometheusRule", "fusc-pacs")["spec"]["groups"] == rules["groups"]


def test_alerts_pass_promtool() -> None:
    promtool = require_executable("promtool", "prometheus")
    cwd = RULES.parent
    for args in (["check", "rules", RULES.name], ["test", "rules", "pacs-rules_test.yml"]):
        result = subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
    tested = {
        case["alertname"]
        for test in yaml.safe_load((cwd / "pacs-rules_test.yml").read_text())["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert tested == alerts
