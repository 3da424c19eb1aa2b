"""Offline checks of deploy/kubernetes as kustomize renders it (deploy/tools/kustomize_subset.py,
the subset of kustomize the manifests use): schema validation with kubernetes-validate --strict
(no cluster needed; it bundles the OpenAPI schemas) and the properties shimmy depends on.  The
pod specs are run for real, translated to `docker run`, in tests/containers/test_k8s_pods.py."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml is not installed (pip install pyyaml)")

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "kubernetes"
K8S_VERSION = "1.32.0"
sys.path.insert(0, str(REPO / "deploy" / "tools"))
import kustomize_subset  # noqa: E402


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def resource_files() -> list[Path]:
    return [K8S / name for name in kustomization()["resources"]]


def docs() -> list[dict]:
    return kustomize_subset.render(K8S)


def by_kind(kind: str) -> list[dict]:
    return [d for d in docs() if d["kind"] == kind]


def pod_specs() -> dict[str, dict]:
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"]
            for d in docs() if d["kind"] in ("DaemonSet", "Deployment")}


def kubernetes_validate() -> list[str]:
    exe = shutil.which("kubernetes-validate")
    if exe:
        return [exe]
    try:
        import kubernetes_validate  # noqa: F401
    except ImportError:
        pytest.skip("kubernetes-validate is not installed (pip install kubernetes-validate)")
    return [sys.executable, "-m", "kubernetes_validate"]


def _containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def _mounts(container: dict, volumes: dict) -> dict[str, dict]:
    return {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}


def test_every_manifest_is_in_the_kustomization():
    listed = {p.name for p in resource_files()}
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_rendered_manifests_pass_kubernetes_validate_strict(tmp_path):
    files = []
    for i, d in enumerate(docs()):
        f = tmp_path / f"{i:02d}-{d['kind']}.yaml"
        f.write_text(yaml.safe_dump(d))
        files.append(str(f))
    r = subprocess.run([*kubernetes_validate(), "--strict", "-k", K8S_VERSION, *files],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("passed") == len(files), r.stdout


def test_strict_validation_catches_a_typo(tmp_path):
    # the validator really is strict: a misspelt field (hostIpc) in a copy of the DaemonSet fails
    ds = by_kind("DaemonSet")[0]
    ds["spec"]["template"]["spec"]["hostIpc"] = False
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(ds))
    r = subprocess.run([*kubernetes_validate(), "--strict", "-k", K8S_VERSION, str(bad)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "hostIpc" in r.stdout + r.stderr


def test_the_subset_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text(
        "resources: []\npatches:\n  - path: p.yaml\n")
    with pytest.raises(kustomize_subset.Unsupported, match="patches"):
        kustomize_subset.render(tmp_path)


def test_images_are_set_in_one_place_with_a_version_and_no_always_pull():
    m = re.search(r'^version\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert m, "no version in pyproject.toml"
    version = m.group(1)
    rules = {i["name"]: i for i in kustomization()["images"]}
    # the manifests name bare images; only the kustomization says registry and tag
    for f in resource_files():
        for m in re.finditer(r"image:\s*(\S+)", f.read_text()):
            assert m.group(1) in rules, (f.name, m.group(1))
    for name, spec in pod_specs().items():
        for c in _containers(spec):
            image = c["image"]
            assert not image.endswith(":latest") and ":" in image, (name, c["name"], image)
            assert image.split(":")[-1] == version, (image, version)
            assert c["imagePullPolicy"] == "IfNotPresent", (name, c["name"])
    # the compose file's defaults name the same images and version
    compose = (REPO / "deploy" / "compose" / "compose.yaml").read_text()
    assert f"shimmy-daemon:{version}" in compose and f"shimmy-app:{version}" in compose


@pytest.mark.parametrize("name", ["shimmyd", "shimmy-example"])
def test_shm_and_control_dir_come_from_the_node_at_the_contract_paths(name):
    spec = pod_specs()[name]
    volumes = {v["name"]: v for v in spec["volumes"]}
    for c in spec["containers"]:
        mounts = _mounts(c, volumes)
        shm = mounts.get("/dev/shm")
        assert shm is not None and "hostPath" in shm, f"{name}/{c['name']}: /dev/shm not hostPath"
        # a directory on the node's tmpfs, not the node's own /dev/shm
        assert shm["hostPath"]["path"].startswith("/dev/shm/")
        # the socket directory at the same path in every pod (the socket path contract)
        run = mounts.get("/run/shimmy")
        assert run is not None and run["hostPath"]["path"] == "/run/shimmy"


def test_daemon_and_app_share_the_same_host_paths():
    paths = {}
    for name, spec in pod_specs().items():
        paths[name] = sorted(v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v)
    assert paths["shimmyd"] == paths["shimmy-example"]


def test_no_host_ipc_network_or_privileged():
    for name, spec in pod_specs().items():
        assert not spec.get("hostIPC"), name
        assert not spec.get("hostNetwork"), name
        assert spec.get("automountServiceAccountToken") is False, name
        for c in _containers(spec):
            sc = c.get("securityContext", {})
            assert not sc.get("privileged"), (name, c["name"])
            assert sc.get("allowPrivilegeEscalation") is False, (name, c["name"])
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], (name, c["name"])
            assert sc.get("readOnlyRootFilesystem") is True, (name, c["name"])


def _identity(spec: dict, c: dict) -> tuple[int, set[int]]:
    """(uid, every gid) the kubelet gives a container: runAsUser/runAsGroup (container over
    pod), plus supplementalGroups and fsGroup."""
    psc, csc = spec.get("securityContext", {}), c.get("securityContext", {})
    uid = csc.get("runAsUser", psc.get("runAsUser"))
    gid = csc.get("runAsGroup", psc.get("runAsGroup"))
    groups = {gid, *psc.get("supplementalGroups", [])}
    if "fsGroup" in psc:
        groups.add(psc["fsGroup"])
    return uid, groups


def daemon_settings() -> dict:
    conf = next(d for d in by_kind("ConfigMap")
                if d["metadata"]["name"] == "shimmyd-config")["data"]["shimmyd.toml"]
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads(conf)


def test_daemon_shares_channels_with_its_group_under_the_owner_policy():
    """The settings the daemon runs with pass its own validation (docs/security.md): the owner
    policy (no access = "open"), every channel and the sockets given to the daemon's group,
    sockets 0660 (nobody outside the group connects)."""
    from shimmy.daemon import config
    settings = config.Settings(**daemon_settings())   # an unknown key is a TypeError
    config._check_types(settings)
    for name in ("object_mode", "shared_object_mode", "socket_mode"):
        config.parse_mode(name, getattr(settings, name))
    ds = pod_specs()["shimmyd"]
    daemon_gid = str(ds["securityContext"]["runAsGroup"])
    assert settings.access == "owner"
    assert settings.channel_group == daemon_gid and settings.socket_group == daemon_gid
    assert settings.socket_mode == "0660"
    assert settings.object_mode == "0600" and settings.shared_object_mode == "0660"


def test_apps_run_with_the_daemons_group_as_primary_not_its_uid():
    """The daemon has no hostPID: it learns a client's groups from the socket's peer
    credentials, whose gid is the PRIMARY group, so app containers run with runAsGroup =
    channel_group; and the example's two containers are two uids sharing one channel."""
    ds = pod_specs()["shimmyd"]
    assert not ds.get("hostPID")
    daemon_uid, daemon_groups = _identity(ds, ds["containers"][0])
    daemon_gid = ds["securityContext"]["runAsGroup"]
    assert daemon_uid == 10001 and daemon_gid == 10001
    assert int(daemon_settings()["channel_group"]) == daemon_gid
    app = pod_specs()["shimmy-example"]
    assert app["securityContext"]["runAsNonRoot"] is True
    uids = set()
    for c in _containers(app):
        uid, groups = _identity(app, c)
        primary = c.get("securityContext", {}).get(
            "runAsGroup", app["securityContext"].get("runAsGroup"))
        assert uid not in (0, daemon_uid), c["name"]       # a uid of its own ...
        assert primary == daemon_gid, c["name"]             # ... and the daemon's group, primary
        uids.add(uid)
    assert len({_identity(app, c)[0] for c in app["containers"]}) == 2, uids


def test_long_running_containers_run_as_non_root():
    for name, spec in pod_specs().items():
        assert spec["securityContext"]["runAsNonRoot"] is True
        for c in spec["containers"]:
            assert _identity(spec, c)[0] != 0, (name, c["name"])


def test_peering_secret_is_readable_by_the_daemon():
    """Kubelet semantics for a Secret volume: files root-owned with the item mode or
    defaultMode; with fsGroup the group becomes fsGroup and 0440 is added (read-only volume)."""
    ds = pod_specs()["shimmyd"]
    (vol,) = [v for v in ds["volumes"] if "secret" in v]
    mode = vol["secret"].get("defaultMode", 0o644)
    fs_group = ds["securityContext"].get("fsGroup")
    gid = 0
    if fs_group is not None:
        gid, mode = fs_group, mode | 0o440
    uid, groups = _identity(ds, ds["containers"][0])
    readable = (mode & 0o004) or (gid in groups and mode & 0o040) or (uid == 0)
    assert readable, (oct(mode), gid, groups)
    assert not mode & 0o007, f"the cluster key must not be world-readable: {oct(mode)}"


def _quantity(q) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    s = str(q)
    for u, f in units.items():
        if s.endswith(u):
            return float(s[: -len(u)]) * f
    return float(s)


def test_every_container_is_guaranteed_qos():
    for name, spec in pod_specs().items():
        for c in _containers(spec):
            res = c.get("resources", {})
            for r in ("cpu", "memory"):
                assert r in res.get("limits", {}), (name, c["name"], r)
                assert _quantity(res["requests"][r]) == _quantity(res["limits"][r]), \
                    (name, c["name"], r)


def test_daemon_memory_covers_ring_budget():
    daemon = pod_specs()["shimmyd"]["containers"][0]
    limit = _quantity(daemon["resources"]["limits"]["memory"])
    budget = daemon_settings()["shm_budget"]
    assert budget > 0 and limit >= budget + (64 << 20), (limit, budget)


def test_daemon_is_scheduled_everywhere_and_not_evicted_first():
    ds = pod_specs()["shimmyd"]
    assert {"operator": "Exists"} in ds["tolerations"]
    pc = ds["priorityClassName"]
    shipped = {p["metadata"]["name"]: p for p in by_kind("PriorityClass")}
    assert pc == "system-node-critical" or pc in shipped
    if pc in shipped:
        assert shipped[pc]["value"] >= 1_000_000_000 and "namespace" not in shipped[pc]["metadata"]
    ru = by_kind("DaemonSet")[0]["spec"]["updateStrategy"]["rollingUpdate"]
    assert ru == {"maxUnavailable": 1, "maxSurge": 0}


def test_cluster_domain_is_a_setting_not_a_literal():
    ds = pod_specs()["shimmyd"]
    env = {e["name"]: e for e in ds["containers"][0]["env"]}
    assert "cluster.local" not in env["SHIMMY_PEER_DNS"]["value"]
    assert env["SHIMMY_PEER_DNS"]["value"].endswith(".svc.$(CLUSTER_DOMAIN)")
    ref = env["CLUSTER_DOMAIN"]["valueFrom"]["configMapKeyRef"]
    (cm,) = [d for d in by_kind("ConfigMap") if d["metadata"]["name"] == ref["name"]]
    assert cm["data"][ref["key"]] == "cluster.local"
    # $(VAR) expansion only sees variables defined earlier in the list
    names = list(env)
    assert names.index("CLUSTER_DOMAIN") < names.index("SHIMMY_PEER_DNS")
    assert names.index("POD_NAMESPACE") < names.index("SHIMMY_PEER_DNS")


def test_example_workload_runs_continuously():
    app = pod_specs()["shimmy-example"]
    for c in app["containers"]:
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert env.get("SHIMMY_COUNT") == "0", c["name"]   # 0 = for ever (examples/compose_*.py)


def test_daemon_probes_use_shimmy_health():
    daemon = pod_specs()["shimmyd"]["containers"][0]
    for probe in ("readinessProbe", "livenessProbe"):
        assert daemon[probe]["exec"]["command"][:2] == ["shimmy", "health"]


def test_headless_service_selects_the_daemon_and_no_rbac_is_needed():
    (svc,) = by_kind("Service")
    assert svc["spec"]["clusterIP"] == "None"
    ds = by_kind("DaemonSet")[0]
    assert svc["spec"]["selector"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    port_names = {p["name"] for p in ds["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names
    assert not [d for d in docs() if d["kind"] in ("Role", "ClusterRole", "RoleBinding",
                                                    "ClusterRoleBinding", "ServiceAccount")]


def test_the_subset_renderer_sets_images_as_kustomize_does(tmp_path):
    """newName/newTag/digest on containers and init containers, a registry port not taken for a
    tag, namespace on namespaced objects only, literals generated as a ConfigMap."""
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "namespace": "ns", "resources": ["r.yaml"],
        "images": [{"name": "reg:5000/a", "newTag": "2"},
                   {"name": "b", "newName": "reg.example/b", "digest": "sha256:00"}],
        "configMapGenerator": [{"name": "c", "literals": ["k=v=w"]}],
        "generatorOptions": {"disableNameSuffixHash": True}}))
    pod = {"initContainers": [{"name": "i", "image": "b:1"}],
           "containers": [{"name": "x", "image": "reg:5000/a:1"}, {"name": "y", "image": "c:3"}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump_all([
        {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "d"},
         "spec": {"template": {"spec": pod}}},
        {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
         "metadata": {"name": "p"}, "value": 1}]))
    ds, pc, cm = kustomize_subset.render(tmp_path)
    spec = ds["spec"]["template"]["spec"]
    assert [c["image"] for c in spec["initContainers"] + spec["containers"]] == \
        ["reg.example/b@sha256:00", "reg:5000/a:2", "c:3"]
    assert ds["metadata"]["namespace"] == "ns" and "namespace" not in pc["metadata"]
    assert cm["kind"] == "ConfigMap" and cm["data"] == {"k": "v=w"}
    assert cm["metadata"] == {"name": "c", "namespace": "ns"}
