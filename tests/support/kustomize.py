"""The part of `kustomize build` that deploy/kubernetes uses, so the rendered overlays can be
validated offline (kustomize itself is a Go binary, not on PyPI): `resources` (files and
directories with their own kustomization.yaml), `namespace`, `images`, and `patches` given by
path as strategic-merge patches (maps merge; lists of named maps, such as containers, merge by
name; other lists are replaced; null deletes a key). Anything else fails loudly, so a manifest
never silently relies on a feature this renderer skips."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

Resource = dict[str, Any]
SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume"}


def build(directory: Path) -> list[Resource]:
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(spec) - SUPPORTED
    assert not unsupported, f"{directory}: kustomization keys not rendered here: {unsupported}"
    resources: list[Resource] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        if path.is_dir():
            resources += build(path)
        else:
            resources += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for patch in spec.get("patches", []):
        assert set(patch) == {"path"}, f"{directory}: only patches by path are rendered: {patch}"
        _apply_patch(resources, yaml.safe_load((directory / patch["path"]).read_text()))
    for image in spec.get("images", []):
        _set_image(resources, image)
    if "namespace" in spec:
        for resource in resources:
            if resource["kind"] not in CLUSTER_SCOPED:
                resource["metadata"]["namespace"] = spec["namespace"]
    return resources


def _apply_patch(resources: list[Resource], patch: Resource) -> None:
    key = (patch["kind"], patch["metadata"]["name"])
    targets = [r for r in resources if (r["kind"], r["metadata"]["name"]) == key]
    assert len(targets) == 1, f"patch {key} matches {len(targets)} resources"
    merged = merge(targets[0], patch)
    targets[0].clear()
    targets[0].update(merged)


def merge(base: Any, patch: Any) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = merge(out[key], value) if key in out else copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and _named(base) and _named(patch):
        out = copy.deepcopy(base)
        by_name = {item["name"]: i for i, item in enumerate(out)}
        for item in patch:
            if item["name"] in by_name:
                out[by_name[item["name"]]] = merge(out[by_name[item["name"]]], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def _named(items: list[Any]) -> bool:
    return bool(items) and all(isinstance(i, dict) and "name" in i for i in items)


def _set_image(resources: list[Resource], image: dict[str, str]) -> None:
    for resource in resources:
        pod = resource.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            name = container["image"].split(":")[0]
            if name == image["name"]:
                new = image.get("newName", name)
                tag = image.get("newTag") or container["image"].partition(":")[2] or "latest"
                container["image"] = f"{new}:{tag}"
