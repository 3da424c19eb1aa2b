"""Daemon restarts, clean shutdown, leases: documented behaviour, nothing left in /dev/shm."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import shimmy

WORKERS = os.path.join(os.path.dirname(__file__), "workers.py")


def test_sigterm_unlinks_everything_it_created(daemon):
    ch = shimmy.Channel("bye", daemon=daemon.socket)
    sub = ch.subscribe()
    ch.publish(b"x")
    assert bytes(sub.receive(timeout=1)) == b"x"
    assert daemon.shm_objects(), "ring and semaphore exist while the daemon runs"
    assert daemon.stop() == 0
    assert daemon.shm_objects() == []
    assert not os.path.exists(daemon.socket)
    with pytest.raises(shimmy.ChannelRetired, match="retired"):
        sub.receive(timeout=1)


def test_restart_after_crash_sweeps_and_old_handles_report_closed(daemon_factory):
    d = daemon_factory()
    ch = shimmy.Channel("persist", daemon=d.socket, capacity=8192)
    sub = ch.subscribe()
    ch.publish(b"before")
    assert bytes(sub.receive(timeout=1)) == b"before"
    old = d.shm_objects()
    d.kill()
    assert d.shm_objects() == old, "a SIGKILLed daemon cannot clean up"
    d.start()  # same socket: the new daemon sweeps what the old one left
    assert d.shm_objects() == []
    assert f"swept={len(old)}" in d.log()
    # Documented: handles from before the restart are retired, never silently split-brained.
    with pytest.raises(shimmy.ChannelRetired, match="retired"):
        sub.receive(timeout=2)
    with pytest.raises(shimmy.ChannelRetired, match="retired"):
        for _ in range(1000):
            ch.publish(b"x" * 100)
    # A fresh handle (after the SDK noticed the restart) works against the new daemon.
    deadline = time.monotonic() + 10
    while True:
        try:
            fresh = shimmy.Channel("persist", daemon=d.socket)
            break
        except shimmy.ShimmyError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    fsub = fresh.subscribe()
    fresh.publish(b"after")
    assert bytes(fsub.receive(timeout=1)) == b"after"
    fresh.close()


def test_second_daemon_on_the_same_socket_is_refused(daemon_factory, daemon):
    with pytest.raises(RuntimeError, match="another shimmy daemon is running"):
        daemon_factory(directory=daemon.dir)
    with shimmy.Channel("still-here", daemon=daemon.socket) as ch:
        ch.publish(b"ok")


def test_stopped_subscriber_loses_its_lease_and_the_publisher_goes_on(daemon_factory, tmp_path):
    cfg = tmp_path / "lease.toml"
    cfg.write_text("heartbeat_interval = 0.2\nlease_timeout = 1.0\n")
    d = daemon_factory("--config", str(cfg))
    ready = tmp_path / "ready"
    stuck = subprocess.Popen([sys.executable, WORKERS, "subscribe", "--daemon", d.socket,
                              "--channel", "lease", "--capacity", "4096", "--idle", "30",
                              "--ready", str(ready)], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while not ready.exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(stuck.pid, signal.SIGSTOP)
        with shimmy.Channel("lease", daemon=d.socket, capacity=4096) as ch:
            # 4 KiB ring, 200 x 100 B: needs the stopped subscriber's room after ~1 s lease.
            t0 = time.monotonic()
            for _ in range(200):
                ch.publish(b"y" * 100, timeout=10)
            assert time.monotonic() - t0 < 10
        assert "missed heartbeats" in d.log()
    finally:
        os.kill(stuck.pid, signal.SIGKILL)
        stuck.wait(10)
