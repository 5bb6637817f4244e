"""deploy/k8s: every rendered manifest is valid Kubernetes 1.30 and wired to the real service.

The kustomizations are rendered by ``tests/deploy/kustomize.py`` (no kubectl needed), validated with
kubernetes-validate in strict mode, and then checked for what a schema cannot see: probes on the routes
BentoML really serves, settings that the service's own Settings model accepts, selectors that select,
limits on every container, and a pod that runs as non-root on a read-only root file system.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.settings import ENV_PREFIX, Settings
from tests.deploy.kustomize import Doc, key, pod_containers, pod_spec, render
from tests.deploy.tools import require_module

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30.0"
VARIANTS = {
    "base": K8S / "base",
    "gpu": K8S / "overlays" / "gpu",
    "triton": K8S / "overlays" / "triton",
    "model-pvc": K8S / "overlays" / "model-pvc",
}
# Kinds without a schema in kubernetes-validate; each is checked by hand below.
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
API_LABELS = {"app.kubernetes.io/name": "fusc", "app.kubernetes.io/component": "api"}
TRITON_LABELS = {"app.kubernetes.io/name": "fusc", "app.kubernetes.io/component": "triton"}
# Triton's KServe v2 health routes.
TRITON_LIVE, TRITON_READY = "/v2/health/live", "/v2/health/ready"


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest) -> tuple[str, list[Doc]]:
    return request.param, render(VARIANTS[request.param])


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Doc]]:
    return {name: render(path) for name, path in VARIANTS.items()}


# ---------------------------------------------------------------------------------------------- helpers
def find(docs: list[Doc], kind: str, name: str) -> Doc:
    matches = [d for d in docs if key(d) == (kind, name)]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def container(deployment: Doc, name: str) -> Doc:
    (match,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return match


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def pod_templates(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if pod_spec(d) is not None]


def config_data(docs: list[Doc]) -> dict[str, str]:
    return find(docs, "ConfigMap", "fusc-config")["data"]


_UNITS = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value: Any) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(m|k|M|G|Ki|Mi|Gi|Ti)?", str(value))
    assert match, f"unexpected quantity {value!r}"
    return float(match.group(1)) * _UNITS[match.group(2) or ""]


def bentoml_system_routes() -> set[str]:
    """The health and metrics routes of BentoML's HTTP server, read from BentoML itself."""
    from types import SimpleNamespace

    from bentoml._internal.server.base_app import BaseAppFactory

    async def handler(_: object) -> None:
        return None

    stub = SimpleNamespace(livez=handler, readyz=handler, metrics=handler)
    return {route.path for route in BaseAppFactory.get_system_routes(stub)}  # type: ignore[arg-type]


def project_version() -> str:
    text = (REPO / "pyproject.toml").read_text()
    match = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
    assert match, "no version in pyproject.toml"
    return match.group(1)


# ----------------------------------------------------------------------------------------------- schema
def test_every_overlay_is_tested() -> None:
    overlays = {p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists()}
    assert overlays == set(VARIANTS) - {"base"}


def test_documents_validate_against_kubernetes_schema(variant: tuple[str, list[Doc]]) -> None:
    kubernetes_validate = require_module("kubernetes_validate", "kubernetes-validate")
    name, docs = variant
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']} is invalid: {exc}")


def test_only_known_custom_resources(variant: tuple[str, list[Doc]]) -> None:
    """A custom resource that kubernetes-validate cannot check must have a shape check here."""
    _, docs = variant
    for doc in docs:
        if "." in doc["apiVersion"].split("/")[0] and not doc["apiVersion"].endswith(".k8s.io/v1"):
            assert (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS, doc["apiVersion"]


def test_service_monitors_scrape_metrics_of_a_service_port(variant: tuple[str, list[Doc]]) -> None:
    _, docs = variant
    monitors = of_kind(docs, "ServiceMonitor")
    assert monitors
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
        spec = monitor["spec"]
        assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
        services = [
            s
            for s in of_kind(docs, "Service")
            if selects(spec["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        assert len(services) == 1, f"{monitor['metadata']['name']} selects {len(services)} Services"
        port_names = {p["name"] for p in services[0]["spec"]["ports"]}
        assert spec["endpoints"]
        for endpoint in spec["endpoints"]:
            assert set(endpoint) <= {"port", "path", "scheme", "interval", "scrapeTimeout"}
            assert endpoint["port"] in port_names
            assert endpoint["path"] == "/metrics"
            assert endpoint.get("scheme", "http") in ("http", "https")
            interval = quantity_seconds(endpoint["interval"])
            assert 0 < quantity_seconds(endpoint["scrapeTimeout"]) <= interval


def test_prometheus_rule_carries_the_rules_of_rules_yml(variant: tuple[str, list[Doc]]) -> None:
    _, docs = variant
    rule = find(docs, "PrometheusRule", "fusc")
    assert set(rule) == {"apiVersion", "kind", "metadata", "spec"} and set(rule["spec"]) == {"groups"}
    monitor = find(docs, "ServiceMonitor", "fusc")
    # The operator selects both kinds by the same release label.
    assert rule["metadata"]["labels"]["release"] == monitor["metadata"]["labels"]["release"]
    rules_yml = yaml.safe_load((REPO / "deploy" / "prometheus" / "rules.yml").read_text())
    assert rule["spec"]["groups"] == rules_yml["groups"], (
        "copy the groups of rules.yml into prometheusrule.yaml"
    )


def quantity_seconds(duration: str) -> int:
    match = re.fullmatch(r"(\d+)(s|m|h)", duration)
    assert match, f"unexpected duration {duration!r}"
    return int(match.group(1)) * {"s": 1, "m": 60, "h": 3600}[match.group(2)]


def test_namespaced_resources_land_in_fusc(variant: tuple[str, list[Doc]]) -> None:
    _, docs = variant
    find(docs, "Namespace", "fusc")
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "fusc", key(doc)


# -------------------------------------------------------------------------------------- service wiring
def test_probes_point_at_bentoml_health_routes(variant: tuple[str, list[Doc]]) -> None:
    _, docs = variant
    routes = bentoml_system_routes()
    fusc = container(find(docs, "Deployment", "fusc"), "fusc")
    assert {p["name"]: p["containerPort"] for p in fusc["ports"]} == {"http": 3000}
    expected = {"startupProbe": "/livez", "livenessProbe": "/livez", "readinessProbe": "/readyz"}
    for probe, path in expected.items():
        get = fusc[probe]["httpGet"]
        assert get["path"] == path and get["path"] in routes, (probe, get, sorted(routes))
        assert get["port"] == "http"
    # The startup probe gives the model load its time; liveness must not kill a pod still loading.
    startup = fusc["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60
    assert "/metrics" in routes


def test_service_exposes_port_3000_named_http(variant: tuple[str, list[Doc]]) -> None:
    _, docs = variant
    service = find(docs, "Service", "fusc")
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 3000, "targetPort": "http", "protocol": "TCP"}
    ]
    assert service["spec"]["selector"] == API_LABELS


def test_containers_have_limits_and_a_restricted_security_context(variant: tuple[str, list[Doc]]) -> None:
    name, docs = variant
    for doc in pod_templates(docs):
        spec = pod_spec(doc)
        assert spec is not None
        pod_security = spec.get("securityContext", {})
        assert pod_security.get("seccompProfile", {}).get("type") == "RuntimeDefault", key(doc)
        assert spec.get("automountServiceAccountToken") is False, key(doc)
        for c in pod_containers(doc):
            where = f"{name}: {key(doc)} container {c['name']}"
            resources = c.get("resources", {})
            for resource in ("cpu", "memory"):
                request, limit = resources["requests"][resource], resources["limits"][resource]
                assert 0 < quantity(request) <= quantity(limit), where
            security = c.get("securityContext", {})
            run_as_non_root = security.get("runAsNonRoot", pod_security.get("runAsNonRoot"))
            run_as_user = security.get("runAsUser", pod_security.get("runAsUser"))
            assert run_as_non_root is True, where
            assert run_as_user is not None and run_as_user > 0, where
            assert security.get("readOnlyRootFilesystem") is True, where
            assert security.get("allowPrivilegeEscalation") is False, where
            assert security.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not security.get("privileged", False), where


def test_writable_paths_are_empty_dirs(variant: tuple[str, list[Doc]]) -> None:
    """With a read-only root file system, /tmp and BentoML's metrics directory must be volumes."""
    _, docs = variant
    deployment = find(docs, "Deployment", "fusc")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container(deployment, "fusc")["volumeMounts"]}
    for path in ("/tmp", "/home/bentoml/prometheus_multiproc_dir"):
        assert "emptyDir" in volumes[mounts[path]], path


def test_fusc_pod_is_sized_for_two_cores(variant: tuple[str, list[Doc]]) -> None:
    _, docs = variant
    resources = container(find(docs, "Deployment", "fusc"), "fusc")["resources"]
    assert quantity(resources["requests"]["cpu"]) == quantity(resources["limits"]["cpu"]) == 2
    assert quantity(resources["limits"]["memory"]) >= 2 * 2**30
    # Thread pools sized by the pod's two cores, not the node's: two preprocessing threads, one model thread.
    data = config_data(docs)
    assert data["FUSC_PREPROCESS_THREADS"] == "2"
    assert data["FUSC_ORT_INTRA_OP_THREADS"] == "1"


def test_api_keys_come_from_an_optional_secret(variant: tuple[str, list[Doc]]) -> None:
    _, docs = variant
    assert not any(k == "FUSC_API_KEYS" for k in config_data(docs))
    sources = container(find(docs, "Deployment", "fusc"), "fusc")["envFrom"]
    assert {"secretRef": {"name": "fusc-api-keys", "optional": True}} in sources


def test_configmap_holds_valid_service_settings(variant: tuple[str, list[Doc]]) -> None:
    _, docs = variant
    data = config_data(docs)
    for name in data:
        assert name.startswith(ENV_PREFIX), name
        # Settings.from_env ignores unknown FUSC_* names: a typo would silently keep the default.
        assert name[len(ENV_PREFIX) :].lower() in Settings.model_fields, f"{name} is not a service setting"
    Settings.from_env(data)
    env_from = container(find(docs, "Deployment", "fusc"), "fusc")["envFrom"]
    assert {"configMapRef": {"name": "fusc-config"}} in env_from


def test_selectors_select_the_right_pods(variant: tuple[str, list[Doc]]) -> None:
    _, docs = variant
    pods = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
        for d in of_kind(docs, "Deployment")
    }
    for deployment in of_kind(docs, "Deployment"):
        assert selects(deployment["spec"]["selector"]["matchLabels"], pods[deployment["metadata"]["name"]])
    for service in of_kind(docs, "Service"):
        selected = [n for n, labels in pods.items() if selects(service["spec"]["selector"], labels)]
        assert selected == [service["metadata"]["name"]], (service["metadata"]["name"], selected)
    pdb = find(docs, "PodDisruptionBudget", "fusc")
    assert [n for n, labels in pods.items() if selects(pdb["spec"]["selector"]["matchLabels"], labels)] == [
        "fusc"
    ]
    hpa = find(docs, "HorizontalPodAutoscaler", "fusc")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "fusc"}


def test_autoscaler_scales_on_cpu_above_the_disruption_budget(variant: tuple[str, list[Doc]]) -> None:
    _, docs = variant
    hpa = find(docs, "HorizontalPodAutoscaler", "fusc")["spec"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    pdb = find(docs, "PodDisruptionBudget", "fusc")["spec"]
    assert hpa["minReplicas"] >= 2 and pdb["maxUnavailable"] < hpa["minReplicas"]
    assert find(docs, "Deployment", "fusc")["spec"]["replicas"] == hpa["minReplicas"]


def test_network_policy_admits_only_pacs_integration_and_prometheus(variant: tuple[str, list[Doc]]) -> None:
    _, docs = variant
    policy = find(docs, "NetworkPolicy", "fusc")["spec"]
    assert policy["podSelector"]["matchLabels"] == API_LABELS
    assert policy["policyTypes"] == ["Ingress"]
    sources = [peer for rule in policy["ingress"] for peer in rule["from"]]
    assert sources == [
        {"namespaceSelector": {"matchLabels": {"fusc.io/pacs-integration": "true"}}},
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
        },
    ]
    for rule in policy["ingress"]:
        assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]


def test_image_is_the_project_version(rendered: dict[str, list[Doc]]) -> None:
    version = project_version()
    images = {
        name: container(find(docs, "Deployment", "fusc"), "fusc")["image"] for name, docs in rendered.items()
    }
    assert images == {
        "base": f"fusc:{version}",
        "gpu": f"fusc:{version}-gpu",
        "triton": f"fusc:{version}",
        "model-pvc": f"fusc:{version}",
    }


# --------------------------------------------------------------------------------------------- overlays
def test_gpu_overlay_requests_one_gpu_on_gpu_nodes(rendered: dict[str, list[Doc]]) -> None:
    deployment = find(rendered["gpu"], "Deployment", "fusc")
    spec = deployment["spec"]["template"]["spec"]
    resources = container(deployment, "fusc")["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    # The base is untouched by the overlay.
    base = container(find(rendered["base"], "Deployment", "fusc"), "fusc")["resources"]
    assert "nvidia.com/gpu" not in base["limits"]


def test_gpu_bentofile_differs_from_the_cpu_one_only_in_runtime_and_base_image() -> None:
    cpu = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    gpu = yaml.safe_load((REPO / "deploy" / "bento" / "bentofile.gpu.yaml").read_text())
    swapped = [p.replace("onnxruntime-gpu", "onnxruntime") for p in gpu["python"]["packages"]]
    assert [p.split(">")[0].split("=")[0] for p in swapped] == [
        p.split(">")[0].split("=")[0] for p in cpu["python"]["packages"]
    ]
    assert any(p.startswith("onnxruntime-gpu") for p in gpu["python"]["packages"])
    for field in ("service", "name", "include", "exclude", "envs"):
        assert gpu[field] == cpu[field], field
    assert gpu["docker"]["cuda_version"].startswith("12.")
    assert {k: v for k, v in gpu["docker"].items() if k != "cuda_version"} == cpu["docker"]


def test_triton_overlay_serves_the_bundled_repository_to_the_service(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["triton"]
    triton = find(docs, "Deployment", "fusc-triton")
    spec = triton["spec"]["template"]["spec"]
    server = container(triton, "triton")
    # NGC's Triton plus what fusc_preprocess imports, built from the overlay's Dockerfile, tagged as fusc.
    assert server["image"] == f"fusc-triton:{project_version()}"
    dockerfile = (VARIANTS["triton"] / "Dockerfile").read_text()
    base = re.search(r"^ARG TRITON_IMAGE=(\S+)$", dockerfile, re.M)
    assert base and re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d{2}\.\d{2}-py3", base.group(1)), dockerfile
    assert "service/triton/requirements-preprocess.txt" in dockerfile
    assert {p["name"]: p["containerPort"] for p in server["ports"]} == {
        "http": 8000,
        "grpc": 8001,
        "metrics": 8002,
    }
    args = dict(a.lstrip("-").split("=", 1) for a in server["args"])
    assert (args["http-port"], args["grpc-port"], args["metrics-port"]) == ("8000", "8001", "8002")
    assert args["strict-readiness"] == "true"
    assert server["livenessProbe"]["httpGet"] == {"path": TRITON_LIVE, "port": "http"}
    assert server["startupProbe"]["httpGet"] == {"path": TRITON_LIVE, "port": "http"}
    assert server["readinessProbe"]["httpGet"] == {"path": TRITON_READY, "port": "http"}
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1

    # The init container writes the NGC variant of the fusc image's bundled repository into the volume
    # Triton serves (python -m service.triton repo), with max_batch_size from the service's ConfigMap.
    (init,) = spec["initContainers"]
    fusc_image = container(find(docs, "Deployment", "fusc"), "fusc")["image"]
    assert init["image"] == fusc_image
    repository_mount = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}["models"]
    assert args["model-repository"] == repository_mount
    command = init["command"]
    assert command[:4] == ["python", "-m", "service.triton", "repo"] and "--variant=ngc" in command
    assert command[command.index("--from") + 1] == "/home/bentoml/bento/src/model_repository"
    out = command[command.index("--out") + 1]
    assert out == {m["name"]: m["mountPath"] for m in init["volumeMounts"]}["models"]
    assert init["workingDir"] == "/home/bentoml/bento/src"
    assert {"configMapRef": {"name": "fusc-config"}} in init["envFrom"]

    # The service talks to that Triton over the port of its protocol.
    data = config_data(docs)
    assert data["FUSC_BACKEND"] == "triton"
    assert int(data["FUSC_TRITON_MAX_BATCH_SIZE"]) >= int(data["FUSC_BATCH_MAX_SIZE"])
    host, port = data["FUSC_TRITON_URL"].rsplit(":", 1)
    service = find(docs, "Service", host)
    assert service["spec"]["selector"] == TRITON_LABELS
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        "http": 8000,
        "grpc": 8001,
        "metrics": 8002,
    }
    assert int(port) == {"http": 8000, "grpc": 8001}[data["FUSC_TRITON_PROTOCOL"]]

    # Only the service pods reach inference ports, only Prometheus the metrics port.
    policy = find(docs, "NetworkPolicy", "fusc-triton")["spec"]
    assert policy["podSelector"]["matchLabels"] == TRITON_LABELS
    inference, metrics = policy["ingress"]
    assert inference["from"] == [{"podSelector": {"matchLabels": API_LABELS}}]
    assert {p["port"] for p in inference["ports"]} == {"http", "grpc"}
    assert [p["port"] for p in metrics["ports"]] == ["metrics"]


def test_model_pvc_overlay_points_the_service_at_the_claim(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["model-pvc"]
    claim = find(docs, "PersistentVolumeClaim", "fusc-model-repository")
    deployment = find(docs, "Deployment", "fusc")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    (mount,) = [m for m in container(deployment, "fusc")["volumeMounts"] if m["name"] == "model-repository"]
    source = volumes["model-repository"]["persistentVolumeClaim"]
    assert source == {"claimName": claim["metadata"]["name"], "readOnly": True}
    assert mount["readOnly"] is True
    repository = Path(config_data(docs)["FUSC_MODEL_REPOSITORY"])
    assert repository.is_absolute() and repository.is_relative_to(mount["mountPath"])
    # The base leaves the variable unset: the image's bundled repository is the default.
    assert "FUSC_MODEL_REPOSITORY" not in config_data(rendered["base"])


# ------------------------------------------------------------------------------------- the renderer itself
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_renderer_matches_kubectl_kustomize(name: str) -> None:
    """Where kubectl exists, the renderer above must agree with the real Kustomize (v5) exactly."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; this cross-check is optional (the renderer is tested above)")
    result = subprocess.run(
        [kubectl, "kustomize", str(VARIANTS[name])], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    theirs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert sorted(render(VARIANTS[name]), key=key) == sorted(theirs, key=key)
