"""Offline checks of deploy/kubernetes: schema validation with kubernetes-validate --strict (no
cluster needed; it bundles the OpenAPI schemas) and the properties shimmy depends on."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml is not installed (pip install pyyaml)")

K8S = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
K8S_VERSION = "1.32.0"


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def resource_files() -> list[Path]:
    return [K8S / name for name in kustomization()["resources"]]


def docs() -> list[dict]:
    out = []
    for f in resource_files():
        out += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return out


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


def test_every_manifest_is_in_the_kustomization():
    listed = {p.name for p in resource_files()}
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_manifests_pass_kubernetes_validate_strict():
    files = [str(f) for f in resource_files()]
    r = subprocess.run([*kubernetes_validate(), "--strict", "-k", K8S_VERSION, *files],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("passed") == len(files), r.stdout


def test_strict_validation_catches_a_typo(tmp_path):
    # the validator really is strict: a misspelt field (hostIpc) in a copy of the DaemonSet fails
    ds = yaml.safe_load((K8S / "daemonset.yaml").read_text())
    ds["spec"]["template"]["spec"]["hostIpc"] = False
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(ds))
    r = subprocess.run([*kubernetes_validate(), "--strict", "-k", K8S_VERSION, str(bad)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "hostIpc" in r.stdout + r.stderr


def _mounts(container: dict, volumes: dict) -> dict[str, dict]:
    return {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}


def _containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


@pytest.mark.parametrize("name", ["shimmyd", "shimmy-example"])
def test_shm_and_control_dir_come_from_the_node(name):
    spec = pod_specs()[name]
    volumes = {v["name"]: v for v in spec["volumes"]}
    for c in spec["containers"]:
        mounts = _mounts(c, volumes)
        shm = mounts.get("/dev/shm")
        assert shm is not None and "hostPath" in shm, f"{name}/{c['name']}: /dev/shm not hostPath"
        # a directory on the node's tmpfs, not the node's own /dev/shm
        assert shm["hostPath"]["path"].startswith("/dev/shm/")
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


def test_long_running_containers_run_as_non_root():
    for name, spec in pod_specs().items():
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == 10001
        for c in spec["containers"]:
            assert c.get("securityContext", {}).get("runAsUser", 10001) != 0


def _mebibytes(q: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    for u, f in units.items():
        if q.endswith(u):
            return float(q[:-2]) * f
    return float(q) / (1 << 20)


def test_resource_limits_present_and_daemon_memory_covers_ring_budget():
    for name, spec in pod_specs().items():
        for c in _containers(spec):
            res = c.get("resources", {})
            assert "memory" in res.get("limits", {}), (name, c["name"])
            assert "cpu" in res.get("requests", {}), (name, c["name"])
    daemon = pod_specs()["shimmyd"]["containers"][0]
    limit = _mebibytes(daemon["resources"]["limits"]["memory"])
    conf = by_kind("ConfigMap")[0]["data"]["shimmyd.toml"]
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    budget = tomllib.loads(conf)["shm_budget"] / (1 << 20)
    assert budget > 0 and limit >= budget + 64, (limit, budget)
    assert daemon["resources"]["requests"]["memory"] == daemon["resources"]["limits"]["memory"]


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
