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
    shm_name = ch["shm"].lstrip("/")
    listing = docker("exec", daemon, "ls", "-ln", "/dev/shm").stdout
    # the ring: 0660, the daemon's uid and group; the apps (uid 10002) reach it by the group
    line = next(ln for ln in listing.splitlines() if ln.endswith(shm_name))
    assert line.split()[0] == "-rw-rw----" and line.split()[2:4] == ["10001", "10001"], line
    pub = project.container("publisher")
    assert docker("inspect", "-f", "{{.Config.User}}", pub).stdout.strip() == "10002:10002"
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
    pub, sub = project.container("publisher"), project.container("subscriber")

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
