"""docker compose, exactly as docs/containers.md tells a user: `deploy/compose/up.sh` (engine,
base image, images, Compose v2, up, wait), `deploy/compose/compose.sh ...` for everything after,
`deploy/compose/down.sh`.  The sidecar and two app containers exchange 10,000 checksummed
messages through shared memory; the restart path of the docs works; the checkout stays clean."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import pytest

from ctrkit import APP_IMAGE, DAEMON_IMAGE, REPO, RUN_ID, docker, summary, wait_until

pytestmark = pytest.mark.container

COUNT = 10_000
UP, DOWN, COMPOSE = (str(REPO / "deploy" / "compose" / f) for f in ("up.sh", "down.sh",
                                                                     "compose.sh"))


class Project:
    """One compose project, driven only through the documented scripts."""

    def __init__(self, name: str, env: dict[str, str]):
        self.name = name
        self.env = env

    def __call__(self, script: str, *args: str, timeout: float = 300,
                 check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([script, *args], capture_output=True, text=True, timeout=timeout,
                           env=self.env, cwd=REPO)
        if check and r.returncode != 0:
            raise AssertionError(f"{script} {' '.join(args)} -> {r.returncode}\n{r.stdout}\n"
                                 f"{r.stderr[-5000:]}")
        return r

    def container(self, service: str) -> str:
        ids = docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={self.name}",
                     "--filter", f"label=com.docker.compose.service={service}").stdout.split()
        assert len(ids) == 1, (service, ids)
        return ids[0]


@pytest.fixture
def project(engine) -> Iterator[Project]:
    name = f"shimmy-ci-e2e-{RUN_ID}"
    # what a user may set (docs/containers.md); the rest (engine, work folder, base image) comes
    # from the environment as it is, as it would for a user
    env = dict(os.environ, COMPOSE_PROJECT_NAME=name, SHIMMY_DAEMON_IMAGE=DAEMON_IMAGE,
               SHIMMY_APP_IMAGE=APP_IMAGE, SHIMMY_COUNT=str(COUNT),
               SHIMMY_CHANNEL="e2e/compose", SHIMMY_SHM_SIZE="256m")
    proj = Project(name, env)
    try:
        yield proj
    finally:
        r = proj(COMPOSE, "logs", "--no-color", check=False, timeout=60)
        print(r.stdout[-6000:])
        proj(DOWN, check=False, timeout=180)
        for cid in docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={name}",
                          check=False).stdout.split():
            docker("rm", "-f", "-v", cid, check=False)


MODES = """
import json, os
out = {}
for d in ("/dev/shm", "/run/shimmy"):
    for p in [d] + sorted(os.path.join(d, n) for n in os.listdir(d)):
        st = os.lstat(p)
        out[p] = (st.st_mode & 0o7777, st.st_uid, st.st_gid)
print(json.dumps(out))
"""


def _modes(daemon: str) -> dict[str, tuple[int, int, int]]:
    """(mode, uid, gid) of /dev/shm, /run/shimmy and everything in them, in the daemon."""
    out = docker("exec", daemon, "python3", "-c", MODES).stdout
    return {k: tuple(v) for k, v in json.loads(out).items()}


OUTSIDER = """
import json, os, sys, shimmy
out = {}
try:
    shimmy.Channel(sys.argv[1])
    out["channel"] = "ALLOWED"
except shimmy.PermissionDenied as exc:
    out["channel"] = f"PermissionDenied: {exc}"
for what, call in [("ring", lambda: os.open("/dev/shm/" + sys.argv[2], os.O_RDONLY)),
                   ("socket dir", lambda: os.listdir("/run/shimmy"))]:
    try:
        call()
        out[what] = "ALLOWED"
    except PermissionError as exc:
        out[what] = f"PermissionError: {exc}"
print(json.dumps(out))
"""


def _outsider(daemon: str, shm_name: str) -> dict[str, str]:
    """An app container as compose runs them, but uid 10004 and no group 10001."""
    volume = docker("inspect", "-f", '{{range .Mounts}}{{if eq .Destination "/run/shimmy"}}'
                    '{{.Name}}{{end}}{{end}}', daemon).stdout.strip()
    assert volume, "no volume at /run/shimmy in shimmyd"
    r = docker("run", "--rm", "--label", "shimmy.ci=1", "--network", "none", "--user",
               "10004:10004", "--ipc", f"container:{daemon}", "-v", f"{volume}:/run/shimmy",
               "--read-only", "--cap-drop", "ALL", APP_IMAGE, "python", "-c", OUTSIDER,
               "e2e/compose", shm_name, timeout=120)
    return json.loads(r.stdout.strip().splitlines()[-1])


def _untracked() -> set[str]:
    r = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=all"],
                       capture_output=True, text=True, timeout=60)
    return {ln for ln in r.stdout.splitlines() if ln.startswith("??")}


@pytest.mark.timeout(900)   # up.sh builds whatever is not current: wheels, images
def test_documented_compose_path_moves_10000_messages_through_shared_memory(project):
    untracked_before = _untracked()
    up = project(UP, timeout=900)
    # up.sh printed both summary lines, with equal digests (every byte, in order)
    p, s = (summary("\n".join(ln for ln in up.stdout.splitlines() if ln.startswith(role)))
            for role in ("publisher:", "subscriber:"))
    assert int(p["sent"]) == COUNT and int(s["received"]) == COUNT, up.stdout
    assert (s["bad"], s["lost"], s["out_of_order"]) == ("0", "0", "0")
    assert p["digest"] == s["digest"]
    assert "messages flowed" in up.stderr
    # no warning about a deprecated setting of ours (the legacy builder's own notice, printed
    # when up.sh rebuilds an image, is not one), nothing left in the checkout (wheels, contexts)
    warnings = [ln for ln in (up.stderr + up.stdout).splitlines()
                if "deprecat" in ln.lower() and "legacy builder" not in ln]
    assert not warnings, warnings
    assert _untracked() == untracked_before

    daemon = project.container("shimmyd")
    # the data went through shared memory, not through the daemon: its stats count 10,000
    # messages published on a ring in /dev/shm, while the control socket saw a handful of
    # requests (read with the docs' own command)
    out = project(COMPOSE, "exec", "-T", "shimmyd", "shimmy", "stat", "--json", check=False)
    if out.returncode != 0:   # a CLI whose stat prints JSON without --json
        out = project(COMPOSE, "exec", "-T", "shimmyd", "shimmy", "stat")
    st = json.loads(out.stdout)
    (ch,) = [c for c in st["channels"] if c["name"] == "e2e/compose"]
    assert ch["published"] == COUNT
    assert ch["tail"] >= COUNT * 256
    assert st["counters"]["requests"] < 100, st["counters"]
    ls = project(COMPOSE, "exec", "-T", "shimmyd", "shimmy", "ls")
    assert "e2e/compose" in ls.stdout
    # the compose file serves Prometheus metrics on the host's loopback (docs/metrics.md): the
    # channel's published count, read from its ring at scrape time, is the 10,000 above
    import urllib.request
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen("http://127.0.0.1:9464/metrics", timeout=10) as resp:
        families = {f.name: f for f in text_string_to_metric_families(resp.read().decode())}
    published = [s.value for s in families["shimmy_channel_messages_published"].samples
                 if s.labels.get("channel") == "e2e/compose"]
    assert published == [COUNT], published
    shm_name = ch["shm"].lstrip("/")
    # two uids shared the channel through the group (channel_group 10001, owner policy)
    pub, sub = project.container("publisher"), project.container("subscriber")
    assert docker("inspect", "-f", "{{.Config.User}}", sub).stdout.strip() == "10002:10002"
    assert docker("inspect", "-f", "{{.Config.User}}", pub).stdout.strip() == "10003:10003"
    # what the daemon made, as the daemon set it (never by umask): the ring and its semaphores
    # creator-or-daemon:10001 0660, the sockets 10001:10001 0660, the lock 0600, the socket
    # directory 0750; nothing at all readable or writable by others
    modes = _modes(daemon)
    ring = modes[f"/dev/shm/{shm_name}"]
    assert ring == (0o660, 10001, 10001), ring
    # (a slot's semaphore lives while its subscriber does: those left, if any)
    sems = {k: v for k, v in modes.items() if k.startswith(f"/dev/shm/sem.{shm_name}")}
    assert set(sems.values()) <= {(0o660, 10001, 10001)}, sems
    for sock in ("/run/shimmy/shimmyd.sock", "/run/shimmy/shimmyd.sock.session"):
        assert modes[sock] == (0o660, 10001, 10001), (sock, modes[sock])
    assert modes["/run/shimmy/shimmyd.sock.lock"][0] == 0o600
    assert modes["/run/shimmy"] == (0o750, 10001, 10001)
    assert not [k for k, (mode, _, _) in modes.items() if mode & 0o007 and k != "/dev/shm"], \
        modes
    # an outsider (another uid, no group 10001) in the same IPC namespace with the same volume:
    # refused by the SDK with PermissionDenied, and by the kernel for the ring and the directory
    got = _outsider(daemon, shm_name)
    assert got["channel"].startswith("PermissionDenied: ") and "/run/shimmy" in got["channel"], got
    assert "socket directory" in got["channel"] and "10004" in got["channel"], got
    assert got["ring"].startswith("PermissionError"), got
    assert got["socket dir"].startswith("PermissionError"), got
    daemon_id = docker("inspect", "-f", "{{.Id}}", daemon).stdout.strip()
    assert docker("inspect", "-f", "{{.HostConfig.IpcMode}}", pub).stdout.strip() \
        == f"container:{daemon_id}"

    # daemon restart, as the docs say: restart shimmyd, then recreate the apps
    project(COMPOSE, "restart", "-t", "10", "shimmyd", timeout=90)
    wait_until(lambda: docker("exec", daemon, "shimmy", "health", check=False).returncode == 0,
               30, 0.3, "restarted shimmyd healthy")
    assert shm_name not in docker("exec", daemon, "ls", "/dev/shm").stdout.split()
    project(COMPOSE, "up", "-d", "--no-build", "--force-recreate", "subscriber", "publisher",
            timeout=180)
    pub, sub = project.container("publisher"), project.container("subscriber")  # recreated

    def exited(cid):
        return docker("inspect", "-f", "{{.State.Status}}", cid).stdout.strip() == "exited"

    wait_until(lambda: exited(pub) and exited(sub), 180, 0.5, "second run done")
    p2, s2 = summary(docker("logs", pub).stdout), summary(docker("logs", sub).stdout)
    assert int(s2["received"]) == COUNT and s2["digest"] == p2["digest"] == p["digest"]

    # graceful stop: SIGTERM, exit 0; then down.sh removes the project and its volume
    project(COMPOSE, "stop", "-t", "10", "shimmyd", timeout=60)
    assert docker("inspect", "-f", "{{.State.ExitCode}}", daemon).stdout.strip() == "0", \
        docker("logs", daemon).stderr[-3000:]
    project(DOWN, timeout=180)
    assert not docker("ps", "-aq", "--filter",
                      f"label=com.docker.compose.project={project.name}").stdout.split()
    assert not docker("volume", "ls", "-q", "--filter",
                      f"label=com.docker.compose.project={project.name}").stdout.split()
