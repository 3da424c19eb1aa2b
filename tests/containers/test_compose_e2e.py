"""docker compose: the shimmyd sidecar and two app containers exchange 10,000 checksummed
messages through shared memory (deploy/compose/compose.yaml, as a user runs it)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from ctrkit import APP_IMAGE, DAEMON_IMAGE, RUN_ID, docker, summary, wait_until

pytestmark = pytest.mark.container

COMPOSE_FILE = os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "compose",
                            "compose.yaml")
COUNT = 10_000


@pytest.fixture
def project(compose_bin):
    name = f"shimmy-ci-e2e-{RUN_ID}"
    env = dict(os.environ, SHIMMY_DAEMON_IMAGE=DAEMON_IMAGE, SHIMMY_APP_IMAGE=APP_IMAGE,
               SHIMMY_COUNT=str(COUNT), SHIMMY_CHANNEL="e2e/compose", SHIMMY_SHM_SIZE="256m")
    if os.path.exists("/var/run/docker.sock"):
        env["DOCKER_GID"] = str(os.stat("/var/run/docker.sock").st_gid)

    def compose(*args, timeout=120, check=True):
        r = subprocess.run([compose_bin, "-p", name, "-f", COMPOSE_FILE, *args],
                           capture_output=True, text=True, timeout=timeout, env=env)
        if check and r.returncode != 0:
            raise AssertionError(f"compose {' '.join(args)} -> {r.returncode}\n{r.stdout}\n"
                                 f"{r.stderr}")
        return r

    def container(service):
        ids = docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={name}",
                     "--filter", f"label=com.docker.compose.service={service}").stdout.split()
        assert len(ids) == 1, (service, ids)
        return ids[0]

    compose.container = container
    compose.name = name
    try:
        yield compose
    finally:
        r = compose("logs", "--no-color", check=False, timeout=60)
        print(r.stdout[-6000:])
        compose("down", "-v", "--remove-orphans", "-t", "10", check=False, timeout=120)
        for cid in docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={name}",
                          check=False).stdout.split():
            docker("rm", "-f", "-v", cid, check=False)


def test_compose_sidecar_moves_10000_messages_through_shared_memory(project):
    project("config", "--quiet")                       # the file is valid compose
    # --no-build: CI built the images offline; up -d returns once publisher has started,
    # which compose does only after shimmyd is healthy and the subscriber has subscribed
    project("up", "-d", "--no-build", timeout=180)
    pub, sub, daemon = (project.container(s) for s in ("publisher", "subscriber", "shimmyd"))

    def exited(cid):
        return docker("inspect", "-f", "{{.State.Status}}", cid).stdout.strip() == "exited"

    wait_until(lambda: exited(pub) and exited(sub), 180, 0.5, "publisher and subscriber done")
    codes = {cid: docker("inspect", "-f", "{{.State.ExitCode}}", cid).stdout.strip()
             for cid in (pub, sub)}
    pub_log = docker("logs", pub).stdout
    sub_log = docker("logs", sub).stdout
    assert codes == {pub: "0", sub: "0"}, pub_log + sub_log

    p, s = summary(pub_log), summary(sub_log)
    assert int(p["sent"]) == COUNT
    assert int(s["received"]) == COUNT
    assert (s["bad"], s["lost"], s["out_of_order"]) == ("0", "0", "0")
    assert p["digest"] == s["digest"]                  # every byte, in order

    # the data went through shared memory, not through the daemon: its stats (read inside the
    # daemon container) count 10,000 messages published on a ring in /dev/shm, while the
    # control socket saw only a handful of requests
    stats = docker("exec", daemon, "shimmy", "stat", check=False)
    if stats.returncode != 0:
        stats = docker("exec", daemon, "shimmy", "stat", "--json")
    st = json.loads(stats.stdout)
    (ch,) = [c for c in st["channels"] if c["name"] == "e2e/compose"]
    assert ch["published"] == COUNT
    assert ch["tail"] >= COUNT * 256                   # bytes committed to the ring
    assert st["counters"]["requests"] < 100, st["counters"]
    shm_name = ch["shm"].lstrip("/")
    listing = docker("exec", daemon, "ls", "/dev/shm").stdout.split()
    assert shm_name in listing, listing
    # the apps mapped that same object: the ring lives in the daemon's IPC namespace, which the
    # apps joined (ipc: service:shimmyd)
    daemon_id = docker("inspect", "-f", "{{.Id}}", daemon).stdout.strip()
    assert docker("inspect", "-f", "{{.HostConfig.IpcMode}}", pub).stdout.strip() \
        == f"container:{daemon_id}"

    # daemon restart (docs/containers.md): the restarted shimmyd starts with no channels and a
    # fresh IPC namespace (/dev/shm); apps joined to the old one must be recreated, and then work
    project("restart", "-t", "10", "shimmyd", timeout=90)
    wait_until(lambda: docker("exec", daemon, "shimmy", "health", check=False).returncode == 0,
               30, 0.3, "restarted shimmyd healthy")
    assert shm_name not in docker("exec", daemon, "ls", "/dev/shm").stdout.split()
    assert not [c for c in json.loads(docker("exec", daemon, "shimmy", "stat").stdout)["channels"]
                if c["name"] == "e2e/compose"]
    project("up", "-d", "--no-build", "--force-recreate", "subscriber", "publisher", timeout=180)
    daemon = project.container("shimmyd")
    pub, sub = project.container("publisher"), project.container("subscriber")
    wait_until(lambda: exited(pub) and exited(sub), 180, 0.5, "second run done")
    p2, s2 = summary(docker("logs", pub).stdout), summary(docker("logs", sub).stdout)
    assert int(s2["received"]) == COUNT and s2["digest"] == p2["digest"] == p["digest"]

    # graceful stop: SIGTERM, exit 0, nothing left in /dev/shm
    project("stop", "-t", "10", "shimmyd", timeout=60)
    assert docker("inspect", "-f", "{{.State.ExitCode}}", daemon).stdout.strip() == "0", \
        docker("logs", daemon).stderr[-3000:]
