"""A kustomize SUBSET renderer: exactly the kustomization features deploy/kubernetes uses, so the
tests can render it where no kustomize or kubectl binary exists (PyPI has no kustomize build).

Supported (with kustomize's semantics for them): ``resources`` (local YAML files), ``namespace``
(set on every namespaced object), ``images`` (``name`` -> ``newName``/``newTag``/``digest`` on
containers and init containers of Pods and pod templates), ``configMapGenerator`` with
``literals`` and ``generatorOptions.disableNameSuffixHash: true``.  Anything else in a
kustomization is refused with an error naming the field, so the subset cannot silently render
something different from ``kubectl apply -k``.

    python3 deploy/tools/kustomize_subset.py deploy/kubernetes     # prints the rendered YAML
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import yaml

SUPPORTED = {"apiVersion", "kind", "namespace", "resources", "images", "configMapGenerator",
             "generatorOptions"}
# kinds without a namespace (the ones a kustomization of a node daemon may hold)
CLUSTER_SCOPED = {"Namespace", "PriorityClass", "ClusterRole", "ClusterRoleBinding",
                  "CustomResourceDefinition", "StorageClass", "PersistentVolume", "Node",
                  "RuntimeClass", "ValidatingWebhookConfiguration",
                  "MutatingWebhookConfiguration"}
POD_TEMPLATE_KINDS = {"Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job"}


class Unsupported(ValueError):
    """The kustomization uses something this subset does not implement."""


def pod_spec(obj: dict) -> dict | None:
    """The pod spec inside a workload object (or a Pod), else None."""
    if obj.get("kind") == "Pod":
        return obj["spec"]
    if obj.get("kind") in POD_TEMPLATE_KINDS:
        return obj["spec"]["template"]["spec"]
    if obj.get("kind") == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return None


def _split_image(image: str) -> tuple[str, str, str]:
    """(name, tag, digest) of an image reference; a ':' after the last '/' starts the tag."""
    digest = ""
    if "@" in image:
        image, digest = image.split("@", 1)
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon + 1:], digest
    return image, "", digest


def _set_images(spec: dict, images: list[dict]) -> None:
    for c in spec.get("initContainers", []) + spec.get("containers", []):
        name, tag, digest = _split_image(c["image"])
        for rule in images:
            if rule["name"] != name:
                continue
            name = rule.get("newName", name)
            if "digest" in rule:
                tag, digest = "", rule["digest"]
            elif "newTag" in rule:
                tag, digest = str(rule["newTag"]), ""
            c["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
            break


def render(directory: str | Path) -> list[dict]:
    """The objects ``kustomize build DIRECTORY`` would print, for the supported subset."""
    d = Path(directory)
    k = yaml.safe_load((d / "kustomization.yaml").read_text())
    unknown = set(k) - SUPPORTED
    if unknown:
        raise Unsupported(f"{d}/kustomization.yaml: {sorted(unknown)} not supported by this "
                          f"kustomize subset (supported: {sorted(SUPPORTED)})")
    objs: list[dict] = []
    for res in k.get("resources", []):
        path = d / res
        if not path.is_file():
            raise Unsupported(f"resource {res!r}: only local files are supported")
        objs += [copy.deepcopy(o) for o in yaml.safe_load_all(path.read_text()) if o]
    gen_opts = k.get("generatorOptions", {})
    for gen in k.get("configMapGenerator", []):
        if not gen_opts.get("disableNameSuffixHash"):
            raise Unsupported("configMapGenerator needs generatorOptions.disableNameSuffixHash: "
                              "true in this subset (name hashes are not implemented)")
        extra = set(gen) - {"name", "literals"}
        if extra:
            raise Unsupported(f"configMapGenerator {gen.get('name')!r}: {sorted(extra)} not "
                              "supported by this subset (literals only)")
        data = dict(lit.split("=", 1) for lit in gen.get("literals", []))
        objs.append({"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": gen["name"]}, "data": data})
    ns = k.get("namespace")
    for o in objs:
        if ns and o["kind"] not in CLUSTER_SCOPED:
            o.setdefault("metadata", {})["namespace"] = ns
        spec = pod_spec(o)
        if spec is not None and k.get("images"):
            _set_images(spec, k["images"])
    return objs


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} DIRECTORY", file=sys.stderr)
        return 2
    try:
        objs = render(argv[1])
    except (OSError, Unsupported, yaml.YAMLError) as exc:
        print(f"kustomize_subset: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(yaml.safe_dump_all(objs, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
