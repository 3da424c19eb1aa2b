"""``shimmy top`` against a real daemon with real traffic: piped (one plain snapshot) and in a
pseudo-terminal (live view), ended by Ctrl-C, SIGHUP and a terminal that goes away."""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import subprocess
import sys
import termios
import threading
import time

import pytest

import shimmy

SHIMMY = [sys.executable, "-m", "shimmy.cli"]


class Traffic:
    """Publishes to ``top/busy`` (with a subscriber that keeps up) until stopped; ``top/quiet``
    gets one message."""

    def __init__(self, socket: str):
        self.stop = threading.Event()
        self.busy = shimmy.Channel("top/busy", daemon=socket, mode="lossy")
        self.quiet = shimmy.Channel("top/quiet", daemon=socket)
        self.quiet.publish(b"once")
        self.sub = self.busy.subscribe()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        payload = b"x" * 512
        while not self.stop.is_set():
            for _ in range(50):
                self.busy.publish(payload)
            while self.sub.receive_nowait() is not None:
                pass
            time.sleep(0.005)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.sub.close()
        self.busy.close()
        self.quiet.close()


@pytest.fixture
def traffic(daemon):
    t = Traffic(daemon.socket)
    yield t
    t.close()


def test_piped_top_prints_one_snapshot_sorted_by_traffic(daemon, traffic):
    r = subprocess.run([*SHIMMY, "top", "--daemon", daemon.socket, "--interval", "0.5"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("shimmy daemon") and "\x1b" not in r.stdout  # plain text
    busy = next(i for i, ln in enumerate(lines) if ln.startswith("top/busy"))
    quiet = next(i for i, ln in enumerate(lines) if ln.startswith("top/quiet"))
    assert busy < quiet, r.stdout
    m = re.match(r"top/busy\s+lossy\s+([\d.]+k?)/s\s+[\d.]+ (B|KiB|MiB)/s", lines[busy])
    assert m and m.group(1) != "0", lines[busy]
    assert lines[quiet].split()[2] == "0/s", lines[quiet]
    once = subprocess.run([*SHIMMY, "top", "--once", "--daemon", daemon.socket, "--interval",
                           "0.2"], capture_output=True, text=True, timeout=60)
    assert once.returncode == 0 and "top/busy" in once.stdout


def _take_terminal() -> None:
    """In the child: the pty on stdin becomes the controlling terminal, as with ssh."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def spawn_in_pty(*args, controlling: bool = False):
    master, slave = os.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "140", "LINES": "40"}
    p = subprocess.Popen([*SHIMMY, *args], stdin=slave, stdout=slave, stderr=slave, env=env,
                         start_new_session=not controlling,
                         preexec_fn=_take_terminal if controlling else None)
    os.close(slave)
    return p, master


def read_until(master: int, needle: bytes, limit: float = 20.0) -> bytes:
    out = b""
    deadline = time.monotonic() + limit
    while needle not in out and time.monotonic() < deadline:
        if select.select([master], [], [], 0.2)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    return out


def drain(master: int, wait: float = 0.3) -> bytes:
    out = b""
    try:
        while select.select([master], [], [], wait)[0]:
            chunk = os.read(master, 65536)
            if not chunk:
                break
            out += chunk
    except OSError:
        pass
    return out


@pytest.mark.parametrize("ending", [signal.SIGINT, signal.SIGHUP, signal.SIGTERM])
def test_live_top_in_a_terminal_ends_cleanly(daemon, traffic, ending):
    p, master = spawn_in_pty("top", "--daemon", daemon.socket, "--interval", "0.2")
    try:
        out = read_until(master, b"top/busy")
        # a second frame, with rates, proves it refreshes
        out += read_until(master, b"B/s", limit=10)
        assert b"top/busy" in out and b"B/s" in out and b"\x1b[" in out, out[-2000:]
        p.send_signal(ending)
        # Read on while it ends, as a terminal does: its last frames and the escape that
        # leaves the alternate screen would block on a full pty otherwise.
        deadline = time.monotonic() + 15
        while p.poll() is None and time.monotonic() < deadline:
            out += drain(master, 0.05)
        assert p.wait(1) == 0
        out += drain(master)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)
    assert b"Traceback" not in out, out[-3000:]
    assert out.rstrip().endswith(b"\x1b[?1049l"), "the alternate screen is left on exit"


@pytest.mark.parametrize("controlling", [True, False], ids=["sighup", "hung-up-tty"])
def test_live_top_exits_when_its_terminal_goes_away(daemon, traffic, controlling):
    """The terminal closes (an ssh connection drops): as its controlling terminal the kernel
    sends SIGHUP; otherwise the tty just hangs up under it.  Either way top ends, exit 0."""
    p, master = spawn_in_pty("top", "--daemon", daemon.socket, "--interval", "0.2",
                             controlling=controlling)
    try:
        assert b"top/busy" in read_until(master, b"top/busy")
    finally:
        os.close(master)  # the terminal is gone: writes fail with EIO
    try:
        assert p.wait(20) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_top_and_stat_show_peer_links_mirrors_and_the_rdma_state(daemon_factory, tmp_path):
    """Two daemons peered over loopback; a subscriber on B makes A mirror its channel."""
    import socket as socket_mod

    from shimmy.daemon.peer.auth import random_key_file
    key = str(tmp_path / "cluster.key")
    random_key_file(key)
    with socket_mod.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    a = daemon_factory("--node", "A", "--peer-listen", f"127.0.0.1:{port}",
                       "--cluster-key-file", key)
    b = daemon_factory("--node", "B", "--peer", f"127.0.0.1:{port}", "--cluster-key-file", key)
    with shimmy.Channel("top/peered", daemon=a.socket) as pub_ch:
        pub_ch.publish(b"first")
        from shimmy.sdk.client import get_client
        deadline = time.monotonic() + 30
        # B must learn that A publishes top/peered before opening it, or B creates its own
        while not any(c["name"] == "top/peered"
                      for c in get_client(b.socket).request("list")["remote"]):
            assert time.monotonic() < deadline, "B never heard of A's channel"
            time.sleep(0.1)
        sub_ch = shimmy.Channel("top/peered", daemon=b.socket)
        with sub_ch, sub_ch.subscribe() as sub:
            deadline = time.monotonic() + 30
            while True:  # the mirror starts asynchronously: publish until one arrives
                pub_ch.publish(b"x" * 100)
                try:
                    assert bytes(sub.receive(timeout=0.2)) == b"x" * 100
                    break
                except shimmy.ReceiveTimeout:
                    assert time.monotonic() < deadline, "nothing reached B's replica"
            top_a = subprocess.run([*SHIMMY, "top", "--once", "--daemon", a.socket,
                                    "--interval", "0.2"], capture_output=True, text=True,
                                   timeout=60)
            stat_b = subprocess.run([*SHIMMY, "stat", "--daemon", b.socket],
                                    capture_output=True, text=True, timeout=60)
    assert top_a.returncode == 0 and "Traceback" not in top_a.stderr, top_a.stderr
    out = top_a.stdout
    assert "peering on" in out and "rdma unavailable: " in out, out
    assert re.search(r"^B\s+127\.0\.0\.1:\d+\s+accepted", out, re.M), out
    assert re.search(r"^top/peered\s+to\s+B\s+running\s+tcp", out, re.M), out
    assert stat_b.returncode == 0, stat_b.stderr
    assert re.search(r"^top/peered\s+from\s+A\s+\S+, link up", stat_b.stdout, re.M), stat_b.stdout
    assert re.search(r"^top/peered\s+reliable.*A \(replica\)", stat_b.stdout, re.M)
