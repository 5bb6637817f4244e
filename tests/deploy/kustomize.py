"""A small Kustomize renderer for the manifests under ``deploy/k8s``, so the tests need no kubectl.

It understands exactly what those kustomizations use: ``resources`` (files and directories), ``patches``
given by ``path`` as strategic-merge patches, ``images`` and ``namespace``. Anything else is refused, so a
kustomization that grows a new feature fails here loudly instead of rendering differently from kubectl.
Where kubectl exists, ``test_manifests`` compares this output with ``kubectl kustomize``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

Doc = dict[str, Any]

SUPPORTED_FIELDS = {"apiVersion", "kind", "namespace", "resources", "patches", "images"}
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PriorityClass",
}
# Strategic-merge keys of the Kubernetes types used here (patchMergeKey in the API); other lists replace.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "env": "name",
    "imagePullSecrets": "name",
    "volumeMounts": "mountPath",
}


class KustomizeError(ValueError):
    pass


def load_yaml_docs(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def key(doc: Doc) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def render(directory: Path) -> list[Doc]:
    """The documents ``kubectl kustomize directory`` would print, in resource order."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - SUPPORTED_FIELDS
    if unsupported:
        raise KustomizeError(f"{directory}: fields not understood by this renderer: {sorted(unsupported)}")

    docs: list[Doc] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        docs.extend(render(path) if path.is_dir() else load_yaml_docs(path))

    for patch_ref in kustomization.get("patches", []):
        if set(patch_ref) != {"path"}:
            raise KustomizeError(f"{directory}: only file patches ({{path: ...}}) are supported: {patch_ref}")
        for patch in load_yaml_docs(directory / patch_ref["path"]):
            targets = [d for d in docs if key(d) == key(patch) and d["apiVersion"] == patch["apiVersion"]]
            if len(targets) != 1:
                raise KustomizeError(f"{directory}: patch {key(patch)} matches {len(targets)} resources")
            strategic_merge(targets[0], patch)

    for image in kustomization.get("images", []):
        for doc in docs:
            for container in pod_containers(doc):
                container["image"] = retag(container["image"], image)

    namespace = kustomization.get("namespace")
    if namespace:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = namespace

    seen: set[tuple[str, str]] = set()
    for doc in docs:
        if key(doc) in seen:
            raise KustomizeError(f"{directory}: {key(doc)} defined twice")
        seen.add(key(doc))
    return docs


def strategic_merge(target: Doc, patch: Doc) -> None:
    for name, value in patch.items():
        if value is None:
            target.pop(name, None)
        elif isinstance(value, dict) and isinstance(target.get(name), dict):
            strategic_merge(target[name], value)
        elif isinstance(value, list) and name in MERGE_KEYS and isinstance(target.get(name), list):
            merge_key = MERGE_KEYS[name]
            by_key = {item[merge_key]: item for item in target[name]}
            added = []
            for item in value:
                if item[merge_key] in by_key:
                    strategic_merge(by_key[item[merge_key]], item)
                else:
                    added.append(copy.deepcopy(item))
            # Like kustomize (kyaml), items new to the list come first; the order has no meaning here.
            target[name][:0] = added
        else:
            target[name] = copy.deepcopy(value)


def pod_spec(doc: Doc) -> Doc | None:
    if doc["kind"] == "Pod":
        return doc["spec"]
    template = doc.get("spec", {}).get("template")
    return template["spec"] if template and "spec" in template else None


def pod_containers(doc: Doc) -> list[Doc]:
    spec = pod_spec(doc)
    if spec is None:
        return []
    return [*spec.get("initContainers", []), *spec["containers"]]


def image_name(image: str) -> str:
    """``registry/repo:tag`` or ``repo@sha256:...`` -> ``registry/repo`` (a registry port is kept)."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def retag(image: str, rule: Doc) -> str:
    if image_name(image) != rule["name"]:
        return image
    name = rule.get("newName", rule["name"])
    if "digest" in rule:
        return f"{name}@{rule['digest']}"
    if "newTag" in rule:
        return f"{name}:{rule['newTag']}"
    tag = image[len(image_name(image)) :]
    return name + tag
