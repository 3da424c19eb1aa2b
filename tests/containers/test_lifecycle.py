"""Container lifecycle: a killed app container's slots are freed and a reliable publisher goes
on; a daemon container that restarts sweeps what its previous life left and serves new clients.
"""

from __future__ import annotations

import os
import time

import pytest

from ctrkit import docker, summary, wait_until

pytestmark = pytest.mark.container


def channel(stats: dict, name: str) -> dict | None:
    return next((c for c in stats["channels"] if c["name"] == name), None)


def test_killing_a_subscriber_container_frees_its_slot_and_the_publisher_goes_on(containers):
    ch = "life/kill"
    # more bytes than one ring holds (4 MiB default): if the dead subscriber's slot were not
    # freed, the reliable publisher would stall for good once the ring is full
    count, size = 24_000, 256
    daemon = containers.daemon()
    env = {"SHIMMY_CHANNEL": ch, "SHIMMY_COUNT": str(count), "SHIMMY_SIZE": str(size),
           "SHIMMY_TIMEOUT": "120", "SHIMMY_MODE": "reliable"}
    keep = containers.app("sub-keep", daemon, "compose_subscriber.py", env)
    doomed = containers.app("sub-doomed", daemon, "compose_subscriber.py", env)

    def subscribers():
        c = channel(containers.stat(daemon), ch)
        return len(c["subscribers"]) if c else 0

    wait_until(lambda: subscribers() == 2, 30, 0.3, "two subscribers registered")
    # paced so the kill lands mid-stream: ~2,000 messages/s for ~12 s
    pub = containers.app("pub", daemon, "compose_publisher.py", {**env, "SHIMMY_RATE": "2000"})
    wait_until(lambda: (channel(containers.stat(daemon), ch) or {}).get("published", 0) > 2000,
               30, 0.3, "publisher under way")

    before = containers.stat(daemon)
    docker("kill", "-s", "KILL", doomed)
    killed_at = time.monotonic()
    wait_until(lambda: subscribers() == 1, 15, 0.2, "killed subscriber's slot freed")
    freed_after = time.monotonic() - killed_at
    after = containers.stat(daemon)
    assert after["counters"]["slots_reclaimed"] >= before["counters"]["slots_reclaimed"] + 1
    # the per-client table no longer lists the dead container's process
    doomed_pid = int(docker("inspect", "-f", "{{.State.Pid}}", doomed).stdout.strip() or 0)
    live = [c for c in after["clients"] if c.get("connected", True)]
    assert all(c["pid"] != doomed_pid or doomed_pid == 0 for c in live), after["clients"]
    print(f"slot freed {freed_after:.2f} s after SIGKILL")

    assert containers.wait_exit(pub, 120) == 0, containers.logs(pub)
    assert containers.wait_exit(keep, 60) == 0, containers.logs(keep)
    p, s = summary(containers.logs(pub)), summary(containers.logs(keep))
    assert int(p["sent"]) == count and int(s["received"]) == count
    assert (s["bad"], s["lost"], s["out_of_order"]) == ("0", "0", "0")
    assert p["digest"] == s["digest"]
    final = channel(containers.stat(daemon), ch)
    assert final is not None and final["published"] == count


def _shimmy_objects(path) -> list[str]:
    return sorted(n for n in os.listdir(path) if "shimmy" in n)


def test_daemon_restart_sweeps_stale_shm_and_new_clients_work(containers, tmpfs_dir):
    """The Kubernetes layout (a node tmpfs directory mounted at /dev/shm), where shared memory
    outlives the daemon container: after SIGKILL the next daemon start removes what the dead
    one left; clients of the old daemon must reopen (new containers here); SIGTERM stops the
    daemon cleanly, leaving nothing behind."""
    shm = ("-v", f"{tmpfs_dir}:/dev/shm")
    daemon = containers.daemon(ipc=shm)
    ch = "life/restart"
    env = {"SHIMMY_CHANNEL": ch, "SHIMMY_COUNT": "2000", "SHIMMY_TIMEOUT": "60",
           "SHIMMY_RECEIVE_TIMEOUT": "5"}
    sub = containers.app("sub1", daemon, "compose_subscriber.py", env, shm=shm)
    wait_until(lambda: channel(containers.stat(daemon), ch), 30, 0.3, "channel created")
    stale = _shimmy_objects(tmpfs_dir)
    assert stale, "the daemon made no shared memory in the node directory"

    # crash: no chance to clean up
    docker("kill", "-s", "KILL", daemon)
    wait_until(lambda: not containers.running(daemon), 15, 0.2, "daemon dead")
    assert set(stale) <= set(_shimmy_objects(tmpfs_dir)), "objects vanished without a daemon"

    # the old subscriber notices (its daemon is gone) and exits non-zero, within its timeouts
    assert containers.wait_exit(sub, 90) != 0
    print("old subscriber after the crash:", containers.logs(sub)[-600:])

    # restart: the sweep removes the dead daemon's objects before it says ready
    docker("start", daemon)
    containers.wait_healthy(daemon)
    left = set(stale) & set(_shimmy_objects(tmpfs_dir))
    assert not left, f"stale objects survived the restart: {sorted(left)}"
    log = containers.logs(daemon)
    assert "swept=0" in log and any(f"swept={n}" in log for n in range(1, 1000)), log[-2000:]

    # clients reopen: fresh containers exchange messages through the restarted daemon
    env2 = {**env, "SHIMMY_CHANNEL": ch}
    sub2 = containers.app("sub2", daemon, "compose_subscriber.py", env2, shm=shm)
    wait_until(lambda: len((channel(containers.stat(daemon), ch) or {"subscribers": []})
                           ["subscribers"]) == 1, 30, 0.3, "new subscriber registered")
    pub2 = containers.app("pub2", daemon, "compose_publisher.py", env2, shm=shm)
    assert containers.wait_exit(pub2, 60) == 0, containers.logs(pub2)
    assert containers.wait_exit(sub2, 60) == 0, containers.logs(sub2)
    assert summary(containers.logs(pub2))["digest"] == summary(containers.logs(sub2))["digest"]

    # graceful stop: SIGTERM -> exit 0, its shared memory and socket gone
    docker("stop", "-t", "10", daemon, timeout=30)
    assert docker("inspect", "-f", "{{.State.ExitCode}}", daemon).stdout.strip() == "0"
    assert _shimmy_objects(tmpfs_dir) == []
    assert not (containers.rundir / "shimmyd.sock").exists()
