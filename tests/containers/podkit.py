"""Runs a Kubernetes pod spec on the Docker engine, one ``docker run`` per container, with the
kubelet's semantics for every setting that decides whether shimmy's pods work together:

- users: ``runAsUser``/``runAsGroup`` (container over pod) -> ``--user``; ``supplementalGroups``
  and ``fsGroup`` -> ``--group-add``; ``runAsNonRoot`` with uid 0 -> the pod fails to start;
- ``readOnlyRootFilesystem`` -> ``--read-only``; ``capabilities`` -> ``--cap-drop``/``--cap-add``;
  ``allowPrivilegeEscalation: false`` -> ``no-new-privileges``; ``privileged``; seccomp
  ``RuntimeDefault`` (Docker's default profile) or ``Unconfined``;
- volumes: ``hostPath`` (a folder of the simulated node; ``DirectoryOrCreate`` makes it root
  0755 as the kubelet does, ``Directory`` must exist or the pod stays pending), ``emptyDir``
  (0777, setgid + fsGroup), ``configMap`` and ``secret`` (files root-owned with the item
  ``mode`` or ``defaultMode`` (0644); with ``fsGroup`` the group becomes fsGroup and 0440 is
  added, the volume being read-only; a missing ``optional`` Secret is an empty folder);
  ``readOnly`` mounts;
- ``env``: values with ``$(VAR)`` expansion, ``fieldRef`` (pod name/namespace, node name, pod
  and host IP), ``configMapKeyRef``; ``command``/``args`` with ``$(VAR)`` expansion;
- init containers run in order, each to exit 0, before the containers start;
- exec probes run as ``docker exec`` in the container (its user, its environment);
- ``resources.limits`` -> ``--memory``/``--cpus``;
- cluster DNS: the names given (a headless Service's name -> its ready pod IPs) are written to
  the containers' /etc/hosts (with /etc/host.conf ``multi on``, so all addresses come back).

Networking is ``--network host`` with each pod's IP a loopback address (127.0.0.x), so a pod
that listens on its pod IP (the daemon's peer port) is reachable there and nowhere else.  Not
modelled (listed so nobody relies on it): the pod-wide IPC and network namespaces (shimmy pods
share /dev/shm through the hostPath, and talk over unix sockets), ``emptyDir.sizeLimit``,
restart policies (a container that exits stays exited; the tests assert that nothing exits).
Anything else in a spec is refused with ``Unsupported`` naming the field.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ctrkit import Containers, docker, wait_until

POD_FIELDS = {"automountServiceAccountToken", "enableServiceLinks", "securityContext",
              "initContainers", "containers", "volumes", "terminationGracePeriodSeconds",
              "priorityClassName", "tolerations"}   # scheduling fields: nothing to translate
CONTAINER_FIELDS = {"name", "image", "imagePullPolicy", "command", "args", "env", "ports",
                    "resources", "readinessProbe", "livenessProbe", "securityContext",
                    "volumeMounts"}
VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


class Unsupported(ValueError):
    """The pod spec uses something this translation does not model."""


class PodFailed(AssertionError):
    """What the kubelet would report as a pod that cannot start (pending, init failure)."""


@dataclass
class Node:
    """A simulated node: hostPath volumes are folders under ``root`` (a tmpfs, like a node's
    /dev/shm and /run); ``ip`` is the node's and its pods' address (loopback)."""
    name: str
    root: Path
    ip: str

    def path(self, host_path: str) -> Path:
        return self.root / host_path.lstrip("/")


@dataclass
class Cluster:
    """What the API server would hold: rendered ConfigMaps, Secrets (name -> key -> bytes),
    DNS names (name -> addresses) and the namespace."""
    namespace: str
    configmaps: dict[str, dict[str, str]] = field(default_factory=dict)
    secrets: dict[str, dict[str, bytes]] = field(default_factory=dict)
    dns: dict[str, list[str]] = field(default_factory=dict)
    images: dict[str, str] = field(default_factory=dict)   # image ref -> local image


@dataclass
class Pod:
    name: str
    node: Node
    spec: dict
    dir: Path
    containers: dict[str, str] = field(default_factory=dict)   # container name -> docker name

    def container(self, name: str) -> dict:
        return next(c for c in self.spec["containers"] if c["name"] == name)


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion: defined variables are replaced, $$(VAR) is a literal."""
    out = VAR.sub(lambda m: env.get(m.group(1), m.group(0)), value.replace("$$(", "\0"))
    return out.replace("\0", "$(")


def _quantity(q) -> float:
    s = str(q)
    for u, f in (("m", 1e-3), ("Ki", 2**10), ("Mi", 2**20), ("Gi", 2**30)):
        if s.endswith(u):
            return float(s[: -len(u)]) * f
    return float(s)


class PodRunner:
    """Starts pods of one test (containers tracked by ``Containers``, removed with it)."""

    def __init__(self, containers: Containers, cluster: Cluster, workdir: Path):
        self.c = containers
        self.cluster = cluster
        self.workdir = workdir

    # -- volumes ----------------------------------------------------------------------------
    def _write_files(self, d: Path, data: dict[str, bytes], src: dict, fs_group: int | None):
        d.mkdir(parents=True)
        default_mode = src.get("defaultMode", 0o644)
        items = src.get("items") or [{"key": k, "path": k} for k in data]
        for it in items:
            if it["key"] not in data:
                raise PodFailed(f"key {it['key']!r} not found in the volume source")
            f = d / it["path"]
            f.write_bytes(data[it["key"]])
            mode = it.get("mode", default_mode)
            gid = 0
            if fs_group is not None:
                gid, mode = fs_group, mode | 0o440
            os.chown(f, 0, gid)
            os.chmod(f, mode)
        os.chown(d, 0, fs_group if fs_group is not None else 0)
        os.chmod(d, 0o2755 if fs_group is not None else 0o755)

    def _volume(self, pod: Pod, v: dict, fs_group: int | None) -> tuple[Path, bool]:
        """The host folder backing volume ``v`` and whether it is read-only by nature."""
        kinds = set(v) - {"name"}
        if kinds == {"hostPath"}:
            hp = v["hostPath"]
            p = pod.node.path(hp["path"])
            kind = hp.get("type", "")
            if kind == "DirectoryOrCreate":
                if not p.exists():
                    p.mkdir(parents=True)
                    os.chmod(p, 0o755)
            elif kind == "Directory":
                if not p.is_dir():
                    raise PodFailed(f"pod {pod.name}: hostPath {hp['path']} (type Directory) "
                                    "does not exist on the node: the pod stays pending")
            elif kind:
                raise Unsupported(f"hostPath type {kind!r}")
            return p, False
        if kinds == {"emptyDir"}:
            d = pod.dir / "emptydir" / v["name"]
            d.mkdir(parents=True)
            os.chmod(d, 0o777)
            if fs_group is not None:
                os.chown(d, 0, fs_group)
                os.chmod(d, 0o2777)
            return d, False
        if kinds == {"configMap"}:
            src = v["configMap"]
            data = self.cluster.configmaps.get(src["name"])
            if data is None and not src.get("optional"):
                raise PodFailed(f"configmap {src['name']!r} not found")
            d = pod.dir / "configmap" / v["name"]
            self._write_files(d, {k: s.encode() for k, s in (data or {}).items()}, src,
                              fs_group)
            return d, True
        if kinds == {"secret"}:
            src = v["secret"]
            sdata = self.cluster.secrets.get(src["secretName"])
            if sdata is None and not src.get("optional"):
                raise PodFailed(f"secret {src['secretName']!r} not found")
            d = pod.dir / "secret" / v["name"]
            self._write_files(d, sdata or {}, src, fs_group)
            return d, True
        raise Unsupported(f"volume {v['name']!r}: {sorted(kinds)}")

    # -- containers -------------------------------------------------------------------------
    def _env(self, pod: Pod, c: dict) -> dict[str, str]:
        fields = {"metadata.name": pod.name, "metadata.namespace": self.cluster.namespace,
                  "spec.nodeName": pod.node.name, "status.podIP": pod.node.ip,
                  "status.hostIP": pod.node.ip}
        env: dict[str, str] = {}
        for e in c.get("env", []):
            if "value" in e:
                env[e["name"]] = _expand(str(e["value"]), env)
            elif "fieldRef" in e.get("valueFrom", {}):
                env[e["name"]] = fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
            elif "configMapKeyRef" in e.get("valueFrom", {}):
                ref = e["valueFrom"]["configMapKeyRef"]
                try:
                    env[e["name"]] = self.cluster.configmaps[ref["name"]][ref["key"]]
                except KeyError:
                    raise PodFailed(f"configMapKeyRef {ref} not found") from None
            else:
                raise Unsupported(f"env {e['name']!r}: {e}")
        return env

    def docker_options(self, pod: Pod, c: dict, mounts: dict[str, tuple[Path, bool]]
                       ) -> tuple[list[str], str, list[str]]:
        """(docker run options, image, command) for container ``c`` of ``pod``."""
        extra = set(c) - CONTAINER_FIELDS
        if extra:
            raise Unsupported(f"container {c['name']!r}: {sorted(extra)}")
        psc = pod.spec.get("securityContext", {})
        csc = c.get("securityContext", {})
        uid = csc.get("runAsUser", psc.get("runAsUser"))
        gid = csc.get("runAsGroup", psc.get("runAsGroup"))
        if uid is None or gid is None:
            raise Unsupported(f"container {c['name']!r}: runAsUser/runAsGroup must be explicit")
        if csc.get("runAsNonRoot", psc.get("runAsNonRoot")) and uid == 0:
            raise PodFailed(f"container {c['name']!r} has runAsNonRoot and runAsUser 0")
        opts = ["--user", f"{uid}:{gid}"]
        for g in psc.get("supplementalGroups", []) + (
                [psc["fsGroup"]] if "fsGroup" in psc else []):
            opts += ["--group-add", str(g)]
        if csc.get("readOnlyRootFilesystem"):
            opts.append("--read-only")
        if csc.get("privileged"):
            opts.append("--privileged")
        caps = csc.get("capabilities", {})
        for cap in caps.get("drop", []):
            opts += ["--cap-drop", cap]
        for cap in caps.get("add", []):
            opts += ["--cap-add", cap]
        if csc.get("allowPrivilegeEscalation") is False:
            opts += ["--security-opt", "no-new-privileges=true"]
        seccomp = csc.get("seccompProfile", psc.get("seccompProfile", {"type": "RuntimeDefault"}))
        if seccomp["type"] == "Unconfined":
            opts += ["--security-opt", "seccomp=unconfined"]
        elif seccomp["type"] != "RuntimeDefault":
            raise Unsupported(f"seccompProfile {seccomp}")
        limits = c.get("resources", {}).get("limits", {})
        if "memory" in limits:
            opts += ["--memory", str(int(_quantity(limits["memory"])))]
        if "cpu" in limits:
            opts += ["--cpus", f"{_quantity(limits['cpu']):g}"]
        env = self._env(pod, c)
        for k, v in env.items():
            opts += ["-e", f"{k}={v}"]
        for m in c.get("volumeMounts", []):
            if set(m) - {"name", "mountPath", "readOnly"}:
                raise Unsupported(f"volumeMount {m}")
            host, ro = mounts[m["name"]]
            opts += ["-v", f"{host}:{m['mountPath']}" + (":ro" if ro or m.get("readOnly") else "")]
        opts += ["-v", f"{pod.dir / 'hosts'}:/etc/hosts:ro",
                 "-v", f"{pod.dir / 'host.conf'}:/etc/host.conf:ro"]
        image = self.cluster.images.get(c["image"], c["image"])
        cmd = [_expand(a, env) for a in c.get("command", []) + c.get("args", [])]
        if c.get("command"):
            opts += ["--entrypoint", cmd[0]]
            cmd = cmd[1:]
        return opts, image, cmd

    def run(self, name: str, spec: dict, node: Node, start_timeout: float = 120) -> Pod:
        """Create the pod: volumes, init containers (each must exit 0), then the containers."""
        extra = set(spec) - POD_FIELDS
        if extra:
            raise Unsupported(f"pod {name}: {sorted(extra)}")
        pod = Pod(name, node, spec, self.workdir / f"{name}-{len(self.c.names)}")
        pod.dir.mkdir(parents=True)
        (pod.dir / "hosts").write_text("127.0.0.1 localhost\n" + "".join(
            f"{ip} {host}\n" for host, ips in self.cluster.dns.items() for ip in ips))
        # every address of a name, as cluster DNS answers for a headless Service (glibc's
        # files backend returns only the first line's address without `multi on`)
        (pod.dir / "host.conf").write_text("multi on\n")
        for f in ("hosts", "host.conf"):
            os.chmod(pod.dir / f, 0o644)
        fs_group = spec.get("securityContext", {}).get("fsGroup")
        mounts = {v["name"]: self._volume(pod, v, fs_group) for v in spec.get("volumes", [])}
        for c in spec.get("initContainers", []):
            opts, image, cmd = self.docker_options(pod, c, mounts)
            n = self.c.run(f"{name}-{c['name']}", image, *cmd, opts=tuple(opts), rundir=False)
            code = self.c.wait_exit(n, start_timeout)
            if code != 0:
                raise PodFailed(f"pod {name}: init container {c['name']} exited {code}:\n"
                                f"{self.c.logs(n)[-3000:]}")
        for c in spec["containers"]:
            opts, image, cmd = self.docker_options(pod, c, mounts)
            pod.containers[c["name"]] = self.c.run(f"{name}-{c['name']}", image, *cmd,
                                                   opts=tuple(opts), rundir=False)
        return pod

    # -- probes and lifecycle ---------------------------------------------------------------
    def probe(self, pod: Pod, container: str, kind: str) -> bool:
        """Run the container's exec probe once, as the kubelet does; True when it passes."""
        p = pod.container(container)[kind]
        try:
            r = docker("exec", pod.containers[container], *p["exec"]["command"], check=False,
                       timeout=p.get("timeoutSeconds", 1) + 5)
        except subprocess.TimeoutExpired:
            return False
        return r.returncode == 0

    def wait_probe(self, pod: Pod, container: str, kind: str, timeout: float = 60) -> float:
        """Poll the probe at its period until it passes (the container must keep running);
        return the seconds it took."""
        p = pod.container(container)[kind]
        start = time.monotonic()
        time.sleep(p.get("initialDelaySeconds", 0))

        def ok():
            if not self.c.running(pod.containers[container]):
                raise PodFailed(f"{pod.name}/{container} exited:\n"
                                f"{self.c.logs(pod.containers[container])[-3000:]}")
            return self.probe(pod, container, kind)
        wait_until(ok, timeout, min(p.get("periodSeconds", 10), 1.0), f"{pod.name} {kind}")
        return time.monotonic() - start

    def delete(self, pod: Pod) -> None:
        """Delete the pod as the kubelet does: SIGTERM to every container, SIGKILL after
        terminationGracePeriodSeconds (default 30), then the pod's folders go."""
        grace = pod.spec.get("terminationGracePeriodSeconds", 30)
        for n in pod.containers.values():
            docker("stop", "-t", str(grace), n, timeout=grace + 30, check=False)
        shutil.rmtree(pod.dir, ignore_errors=True)
