"""The DaemonSet and the example Deployment, as kustomize renders them, run on the real Docker
engine through podkit (each pod spec setting translated to `docker run` options with the
kubelet's semantics): the daemon starts with the peering Secret mounted, two daemon pods on two
simulated nodes peer, the example app pod (two uids of its own, the daemon's group as primary
group) exchanges messages, the probes pass; a rolling update of the daemon, the socket path
contract, the Secret without fsGroup (the reason fsGroup is there), the daemon's group as a mere
supplementary group (the reason for runAsGroup) and a pod outside the group are shown as they
happen."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ctrkit import APP_IMAGE, DAEMON_IMAGE, REPO, docker, wait_until
from podkit import Cluster, Node, PodRunner

pytestmark = pytest.mark.container

sys.path.insert(0, str(REPO / "deploy" / "tools"))
import kustomize_subset  # noqa: E402

K8S = REPO / "deploy" / "kubernetes"
# the two nodes' pod IPs: loopback addresses, so the peer port never leaves this machine
IP_A, IP_B = "127.0.0.2", "127.0.0.3"


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    return kustomize_subset.render(K8S)


def _spec(objs: list[dict], kind: str) -> dict:
    (o,) = [o for o in objs if o["kind"] == kind]
    return copy.deepcopy(o["spec"]["template"]["spec"])


def _cluster(objs: list[dict], secret: bytes | None) -> Cluster:
    ns = next(o for o in objs if o["kind"] == "Namespace")["metadata"]["name"]
    cms = {o["metadata"]["name"]: o["data"] for o in objs if o["kind"] == "ConfigMap"}
    m = re.search(r'^version\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert m, "no version in pyproject.toml"
    version = m.group(1)
    cluster = Cluster(namespace=ns, configmaps=cms,
                      # what a user's `kustomize edit set image` does: the locally built images
                      images={f"shimmy-daemon:{version}": DAEMON_IMAGE,
                              f"shimmy-app:{version}": APP_IMAGE})
    domain = cms["shimmyd-cluster"]["cluster-domain"]
    # the headless Service's DNS name answers with the ready daemons' pod IPs
    cluster.dns[f"shimmyd-peers.{ns}.svc.{domain}"] = [IP_A, IP_B]
    if secret is not None:
        cluster.secrets["shimmy-cluster-key"] = {"cluster.key": secret}
    return cluster


@pytest.fixture
def nodes(containers, request):
    """Two simulated nodes, each a fresh tmpfs (a node's /dev/shm and /run live in memory)."""
    if os.geteuid() != 0:
        pytest.skip("simulated nodes are tmpfs mounts: needs root")
    made: list[Path] = []

    def node(name: str, ip: str) -> Node:
        d = Path(tempfile.mkdtemp(prefix=f"shimmy-ci-node-{name}-",
                                  dir=os.environ.get("SHIMMY_TEST_WORK") or None))
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600m,mode=0755",
                            "shimmy-ci-node", str(d)], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            os.rmdir(d)
            pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
        made.append(d)
        return Node(f"node-{name}", d, ip)
    try:
        yield node
    finally:
        if getattr(request.node, "rep_call_failed", False):
            for n in containers.names:
                print(f"----- logs of {n}\n{containers.logs(n)[-4000:]}")
        containers.remove_all()   # before the mounts go
        for d in made:
            subprocess.run(["umount", str(d)], capture_output=True, timeout=30)
            os.rmdir(d)


@pytest.fixture
def runner(containers):
    work = Path(tempfile.mkdtemp(prefix="shimmy-ci-pods-",
                                 dir=os.environ.get("SHIMMY_TEST_WORK") or None))
    yield lambda cluster: PodRunner(containers, cluster, work)
    subprocess.run(["rm", "-rf", str(work)], timeout=60)


def _stat(pod, container="shimmyd") -> dict:
    import json
    r = docker("exec", pod.containers[container], "shimmy", "stat", "--json", check=False)
    if r.returncode != 0:
        r = docker("exec", pod.containers[container], "shimmy", "stat")
    return json.loads(r.stdout)


def _published(pod, channel: str) -> int:
    ch = [c for c in _stat(pod)["channels"] if c["name"] == channel]
    return ch[0]["published"] if ch else 0


SUB_LINE = re.compile(r"^subscriber: received=(\d+) .*bad=(\d+) lost=\d+ out_of_order=(\d+)"
                      r".* reopens=(\d+)$", re.M)


def _sub_lines(containers, pod) -> list[tuple[int, ...]]:
    log = containers.logs(pod.containers["subscriber"])
    return [tuple(int(x) for x in m.groups()) for m in SUB_LINE.finditer(log)]


def test_daemon_pods_with_the_secret_peer_and_the_app_pod_exchanges_messages(
        rendered, containers, nodes, runner):
    cluster = _cluster(rendered, secret=os.urandom(32))
    pods = runner(cluster)
    ds, app = _spec(rendered, "DaemonSet"), _spec(rendered, "Deployment")
    node_a, node_b = nodes("a", IP_A), nodes("b", IP_B)
    da = pods.run("shimmyd-a", ds, node_a)
    db = pods.run("shimmyd-b", ds, node_b)
    for d in (da, db):
        print(f"{d.name} ready after {pods.wait_probe(d, 'shimmyd', 'readinessProbe'):.1f} s")
    # the Secret as the kubelet mounts it with fsGroup: root:10001 0440, read by the daemon
    # (the file bind-mounted at /etc/shimmy-peer/cluster.key; the daemon read it: it peers)
    st = (da.dir / "secret" / "cluster-key" / "cluster.key").stat()
    assert (oct(st.st_mode & 0o777), st.st_uid, st.st_gid) == (oct(0o440), 0, 10001)
    # peered: both daemons have a link (the higher address is dialed by the lower)
    wait_until(lambda: _stat(da)["peer"]["links"] and _stat(db)["peer"]["links"], 30, 0.5,
               "daemons peered")
    assert _stat(da)["peer"]["counters"]["peers_discovered"] == 1
    assert _stat(db)["peer"]["node"] == "node-b"

    pa = pods.run("example-a", app, node_a)
    # the example app: two uids of its own (subscriber 10002, publisher 10003), both with the
    # daemon's group as primary group, the one the daemon sees in the peer credentials
    ident = {c: docker("exec", pa.containers[c], "id", "-u").stdout.strip() + ":"
             + docker("exec", pa.containers[c], "id", "-g").stdout.strip()
             for c in ("subscriber", "publisher")}
    assert ident == {"subscriber": "10002:10001", "publisher": "10003:10001"}, ident
    wait_until(lambda: _published(da, "demo/k8s") > 2000, 60, 0.5, "messages published")
    wait_until(lambda: [s for s in _sub_lines(containers, pa) if s[0] > 1000], 40, 1,
               "subscriber reports")
    received, bad, out_of_order, reopens = _sub_lines(containers, pa)[-1]
    assert (bad, out_of_order, reopens) == (0, 0, 0), _sub_lines(containers, pa)
    # the rings: 0660, group shimmy, in the node's shm directory (1770, 10001:10001)
    shm = node_a.path("/dev/shm/shimmy")
    st = shm.stat()
    assert (oct(st.st_mode & 0o7777), st.st_uid, st.st_gid) == (oct(0o1770), 10001, 10001)
    # everything in it (rings and semaphores: the daemon's uid, channel_group 10001, 0660 as the
    # daemon set them) and the sockets (socket_group 10001, socket_mode 0660): nothing for others
    objs = {f.name: (f.stat().st_mode & 0o7777, f.stat().st_uid, f.stat().st_gid)
            for f in shm.iterdir()}
    rings = [n for n in objs if not n.startswith("sem.")]
    assert rings and set(objs.values()) == {(0o660, 10001, 10001)}, objs
    run = node_a.path("/run/shimmy")
    assert {f.name: (f.stat().st_mode & 0o7777, f.stat().st_uid, f.stat().st_gid)
            for f in run.iterdir()} == {"shimmyd.sock": (0o660, 10001, 10001),
                                        "shimmyd.sock.session": (0o660, 10001, 10001),
                                        "shimmyd.sock.lock": (0o600, 10001, 10001)}
    st = run.stat()
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o750, 10001, 10001)
    # both probes pass on both daemons, and nothing exited (no CrashLoopBackOff by design)
    for d in (da, db):
        assert pods.probe(d, "shimmyd", "livenessProbe")
        assert pods.probe(d, "shimmyd", "readinessProbe")
    for p in (da, db, pa):
        for n in p.containers.values():
            assert containers.running(n), containers.logs(n)[-2000:]


def test_without_fs_group_the_secret_is_unreadable_and_the_daemon_fails(
        rendered, containers, nodes, runner):
    """Why fsGroup is in the DaemonSet: the same pod without it crashes on the key file."""
    pods = runner(_cluster(rendered, secret=os.urandom(32)))
    ds = _spec(rendered, "DaemonSet")
    del ds["securityContext"]["fsGroup"]
    d = pods.run("shimmyd-nofsgroup", ds, nodes("a", IP_A))
    assert containers.wait_exit(d.containers["shimmyd"], 30) != 0
    log = containers.logs(d.containers["shimmyd"])
    # refused at start by the daemon's settings check, naming the setting and the file
    assert "cluster_key_file=/etc/shimmy-peer/cluster.key: not a readable file" in log, \
        log[-2000:]


def test_rolling_update_of_the_daemon_apps_reopen_and_go_on(rendered, containers, nodes,
                                                            runner):
    """What a DaemonSet rolling update does on one node: the old daemon pod gets SIGTERM (it
    unlinks its rings and exits 0), the new one starts, sweeps, and serves; the running app
    pod is not restarted: its examples notice the new daemon and reopen the channel."""
    pods = runner(_cluster(rendered, secret=None))   # no Secret: a single-node install
    ds, app = _spec(rendered, "DaemonSet"), _spec(rendered, "Deployment")
    node = nodes("a", IP_A)
    old = pods.run("shimmyd-old", ds, node)
    pods.wait_probe(old, "shimmyd", "readinessProbe")
    pa = pods.run("example", app, node)
    wait_until(lambda: _published(old, "demo/k8s") > 2000, 60, 0.5, "messages flowing")
    started = {n: docker("inspect", "-f", "{{.State.StartedAt}}", n).stdout
               for n in pa.containers.values()}

    t0 = time.monotonic()
    pods.delete(old)
    assert docker("inspect", "-f", "{{.State.ExitCode}}",
                  old.containers["shimmyd"]).stdout.strip() == "0"
    new = pods.run("shimmyd-new", ds, node)
    ready = pods.wait_probe(new, "shimmyd", "readinessProbe")
    wait_until(lambda: _published(new, "demo/k8s") > 500, 60, 0.25, "flowing via the new daemon")
    gap = time.monotonic() - t0
    assert "swept=" in containers.logs(new.containers["shimmyd"])
    # the app pod was never restarted; its subscriber reopened once and goes on, intact
    for n in pa.containers.values():
        assert containers.running(n)
        assert docker("inspect", "-f", "{{.State.StartedAt}}", n).stdout == started[n]
    wait_until(lambda: [s for s in _sub_lines(containers, pa) if s[3] >= 1 and s[0] > 0],
               40, 1, "subscriber reports after the update")
    received, bad, out_of_order, reopens = _sub_lines(containers, pa)[-1]
    assert bad == 0 and out_of_order == 0 and reopens >= 1, _sub_lines(containers, pa)
    print(f"rolling update: old daemon stopped -> new daemon ready {ready:.1f} s after its "
          f"start, messages flowing again {gap:.1f} s after the old daemon got SIGTERM")


def test_socket_dir_mounted_at_another_path_gets_the_contract_error(
        rendered, containers, nodes, runner):
    pods = runner(_cluster(rendered, secret=None))
    ds, app = _spec(rendered, "DaemonSet"), _spec(rendered, "Deployment")
    node = nodes("a", IP_A)
    d = pods.run("shimmyd", ds, node)
    pods.wait_probe(d, "shimmyd", "readinessProbe")
    # an app pod that mounts the node's /run/shimmy at /var/run/elsewhere
    del app["initContainers"]
    c = app["containers"][0]
    app["containers"] = [c]
    for m in c["volumeMounts"]:
        if m["mountPath"] == "/run/shimmy":
            m["mountPath"] = "/var/run/elsewhere"
    c["env"] = [{"name": "SHIMMY_DAEMON", "value": "/var/run/elsewhere/shimmyd.sock"}]
    c["command"] = ["python", "-c", "import shimmy; shimmy.Channel('demo/contract')"]
    p = pods.run("misplaced", app, node)
    n = p.containers[c["name"]]
    assert containers.wait_exit(n, 30) != 0
    log = containers.logs(n)
    assert "must be mounted at the same path" in log, log[-2000:]
    assert "/run/shimmy/shimmyd.sock.session" in log and "start one with" not in log


def test_a_supplementary_group_is_invisible_to_the_daemon_so_apps_need_run_as_group(
        rendered, containers, nodes, runner):
    """Why the example sets runAsGroup 10001 rather than supplementalGroups [10001]: the
    daemon has no hostPID, so it knows a client's groups only from the socket's peer
    credentials, whose gid is the primary group.  With the group merely supplementary the files
    would open, but the daemon refuses the second uid the channel, naming the rule."""
    pods = runner(_cluster(rendered, secret=None))
    ds, app = _spec(rendered, "DaemonSet"), _spec(rendered, "Deployment")
    node = nodes("a", IP_A)
    d = pods.run("shimmyd", ds, node)
    pods.wait_probe(d, "shimmyd", "readinessProbe")
    app["securityContext"].update(runAsGroup=10002, supplementalGroups=[10001])
    p = pods.run("supplementary", app, node)

    def refused():
        log = containers.logs(p.containers["publisher"])
        return [ln for ln in log.splitlines() if "publisher: error PermissionDenied" in ln]
    line = wait_until(refused, 60, 0.5, "the publisher (uid 10003) refused")[-1]
    assert "uid 10003" in line and "'demo/k8s'" in line, line
    assert "belongs to uid 10002 or members of group 10001" in line, line
    assert _published(d, "demo/k8s") == 0


def test_a_pod_without_the_daemons_group_cannot_reach_the_daemon_or_the_rings(
        rendered, containers, nodes, runner):
    """The negative control of 'apps by group': the example pod's spec with another uid and
    neither primary nor supplementary group 10001 is kept out of the socket directory (0750),
    the socket (0660) and the shm directory (1770), so it neither reaches the daemon nor maps a
    ring."""
    pods = runner(_cluster(rendered, secret=None))
    ds, app = _spec(rendered, "DaemonSet"), _spec(rendered, "Deployment")
    node = nodes("a", IP_A)
    d = pods.run("shimmyd", ds, node)
    pods.wait_probe(d, "shimmyd", "readinessProbe")
    ok = pods.run("member", app, node)   # the example as shipped: it works
    wait_until(lambda: _published(d, "demo/k8s") > 100, 60, 0.5, "member app publishing")
    outsider = copy.deepcopy(app)
    del outsider["initContainers"]
    outsider["securityContext"].update(runAsUser=10003, runAsGroup=10003, supplementalGroups=[])
    c = outsider["containers"][0]
    outsider["containers"] = [c]
    # plain system calls, not the SDK: `import shimmy` itself needs to create (and at once
    # unlink) a semaphore in /dev/shm, which this pod may not do
    c["command"] = ["python", "-c", """
import os, socket
for what, call in [
        ("socket", lambda: socket.socket(socket.AF_UNIX).connect("/run/shimmy/shimmyd.sock")),
        ("socket dir", lambda: os.listdir("/run/shimmy")),
        ("shm dir", lambda: os.listdir("/dev/shm")),
        ("shm create", lambda: os.open("/dev/shm/x", os.O_CREAT | os.O_RDWR, 0o600))]:
    try:
        call()
        print(what, "ALLOWED")
    except PermissionError as exc:
        print(what, "refused:", exc)
"""]
    p = pods.run("outsider", outsider, node)
    n = p.containers[c["name"]]
    assert containers.wait_exit(n, 30) == 0, containers.logs(n)
    log = containers.logs(n)
    assert "ALLOWED" not in log and log.count("refused:") == 4, log
    for name in ok.containers.values():
        assert containers.running(name)
