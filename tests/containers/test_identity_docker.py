"""shimmy.daemon.identity, containers and label_policy against a real Docker engine: labels and
names of a running container, its id from /proc/<pid>/cgroup on the host, and the die-event
watcher."""

from __future__ import annotations

import threading

import pytest

from ctrkit import APP_IMAGE, docker, wait_until

pytestmark = pytest.mark.container
docker_sdk = pytest.importorskip("docker", reason="the docker SDK is not installed "
                                                   "(pip install 'shimmy[daemon]')")

from shimmy.daemon.containers import DockerLabelSource, watch_container_deaths  # noqa: E402
from shimmy.daemon.identity import container_id_of_pid  # noqa: E402
from shimmy.daemon.label_policy import policy_for_pid  # noqa: E402
from shimmy.errors import PermissionDenied  # noqa: E402


def sleeper(containers, role, labels=None):
    name = containers.run(role, APP_IMAGE, "python", "-c", "import time; time.sleep(120)",
                          labels=labels, rundir=False, opts=("--stop-timeout", "1"))
    wait_until(lambda: containers.running(name), 30, 0.2, f"{name} running")
    cid = docker("inspect", "-f", "{{.Id}}", name).stdout.strip()
    pid = int(docker("inspect", "-f", "{{.State.Pid}}", name).stdout.strip())
    return name, cid, pid


def test_cgroup_and_labels_of_a_real_container(containers):
    name, cid, pid = sleeper(containers, "labelled", {"shimmy.publish": "sensors/*"})
    assert container_id_of_pid(pid) == cid            # the host's /proc, the real cgroup file
    src = DockerLabelSource(ttl=5)
    labels = src.labels(cid)
    assert labels is not None and labels["shimmy.publish"] == "sensors/*"
    assert src.name(cid) == name
    policy = policy_for_pid(pid, src, default_open=True)
    policy.check("publish", "sensors/temp")
    with pytest.raises(PermissionDenied, match=rf"container {cid[:12]} \({name}\) may not "
                                               rf"publish channel 'video/x'"):
        policy.check("publish", "video/x")


def test_watch_container_deaths_reports_a_killed_container(containers):
    stop = threading.Event()
    seen: list[str] = []
    t = threading.Thread(target=watch_container_deaths, args=(seen.append, stop),
                         kwargs={"poll": 0.5}, daemon=True)
    t.start()
    try:
        name, cid, _ = sleeper(containers, "doomed")
        docker("kill", "-s", "KILL", name)
        wait_until(lambda: cid in seen, 15, 0.1, "die event delivered")
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive(), "watcher did not stop within 10 s of stop_event"
