"""No listener can end the daemon (docs/security.md, "A flood of local connections or requests").

A daemon held to RLIMIT_NOFILE 1024 (soft and hard, set before it starts) with every listener
open: the control socket, the session socket, the metrics port and the peer listener.  This
process raises its own limit and opens more connections than the daemon has descriptors against
each listener in turn, then against all four at once: half of them idle, half sending part of
what the listener expects (half a frame, half a token, half an HTTP request line, half a
handshake) and then nothing.  Meanwhile a client attached before the flood keeps publishing,
receiving and asking the daemon; afterwards new clients (and a new peer daemon) are served, the
refusals are counted in ``stat`` and ``/metrics``, and the daemon exits 0 on SIGTERM.

Loopback and unix sockets only; every phase is bounded in time; every process it starts is
stopped by its pid.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import msgpack
import pytest

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import shimmy  # noqa: E402
from shimmy.daemon.peer.auth import random_key_file  # noqa: E402
from workers import until  # noqa: E402
from shimmy.protocol import FRAME_HEADER, read_frame  # noqa: E402
from shimmy.sdk.client import DaemonClient  # noqa: E402

DAEMON_NOFILE = 1024
FLOOD = 1200            # connections per listener: more than the daemon's descriptors
HOLD = 3.0              # seconds the flood is held open
LISTENERS = ("control", "session", "metrics", "peer")
#: What a half-open connection sends before falling silent, per listener.
HALF = {"control": FRAME_HEADER.pack(100) + b"\x81", "session": b"0123abcd",
        "metrics": b"GET /metr", "peer": b"\x00\x01"}

LIVE_WORKER = r"""
import json, os, sys, time
import shimmy
from shimmy.sdk.client import get_client
path, progress, stop = sys.argv[1:4]
state = {"received": 0, "requests": 0, "errors": []}
with shimmy.Channel("flood/live", daemon=path, capacity=1 << 16) as ch:
    sub = ch.subscribe()
    client = get_client(path)
    last = 0.0
    i = 0
    while not os.path.exists(stop):
        try:
            ch.publish(i.to_bytes(8, "little"))
            got = int.from_bytes(bytes(sub.receive(timeout=5)), "little")
            if got != i:
                state["errors"].append(f"message {i} arrived as {got}")
            state["received"] += 1
            i += 1
            now = time.monotonic()
            if now - last > 0.1:
                client.request("list")   # the control plane still answers an existing client
                state["requests"] += 1
                last = now
                with open(progress + ".tmp", "w") as fh:
                    json.dump(state, fh)
                os.replace(progress + ".tmp", progress)
        except Exception as exc:
            state["errors"].append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.05)
        time.sleep(0.001)
with open(progress + ".tmp", "w") as fh:
    json.dump(state, fh)
os.replace(progress + ".tmp", progress)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _limit_nofile() -> None:   # in the daemon's child, before exec
    resource.setrlimit(resource.RLIMIT_NOFILE, (DAEMON_NOFILE, DAEMON_NOFILE))


class Node:
    """A daemon subprocess with every listener open, at RLIMIT_NOFILE 1024."""

    def __init__(self, directory: str, key: str, name: str, *extra: str):
        self.dir = directory
        self.socket = os.path.join(directory, "shimmyd.sock")
        self.log_path = os.path.join(directory, "daemon.log")
        self.peer_port = _free_port()
        cfg = os.path.join(directory, "shimmyd.toml")
        with open(cfg, "w") as fh:
            # Quotas out of the way: the descriptor budget is what must hold here (the quotas
            # have their own tests); short timeouts keep the run bounded.
            fh.write('metrics_listen = "127.0.0.1:0"\n'
                     f'peer_listen = "127.0.0.1:{self.peer_port}"\n'
                     f'cluster_key_file = "{key}"\nnode = "{name}"\n'
                     "quota_control_connections = 100000\nquota_connections = 100000\n"
                     "quota_sessions = 100000\nmax_clients = 100000\n"
                     "control_request_timeout = 2.0\nsession_connect_timeout = 2.0\n"
                     "metrics_timeout = 2.0\npeer_handshake_timeout = 2.0\n")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "shimmy.cli", "daemon", "--socket", self.socket,
                 "--config", cfg, *extra], stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=_limit_nofile)
        deadline = time.monotonic() + 20
        while "daemon ready" not in self.log():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log()
            time.sleep(0.05)
        while not (m := re.search(r"metrics on http://([\d.]+:\d+)/metrics", self.log())):
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.05)
        self.metrics_url = f"http://{m.group(1)}/metrics"

    def log(self) -> str:
        with open(self.log_path, errors="replace") as fh:
            return fh.read()

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def address(self, listener: str):
        if listener == "control":
            return socket.AF_UNIX, self.socket
        if listener == "session":
            return socket.AF_UNIX, self.socket + ".session"
        if listener == "metrics":
            host, port = self.metrics_url.split("/")[2].split(":")
            return socket.AF_INET, (host, int(port))
        return socket.AF_INET, ("127.0.0.1", self.peer_port)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(20)


def _flood(node: Node, listeners, count: int) -> tuple[list[socket.socket], int]:
    """Open ``count`` connections to each listener, without blocking; every other one sends
    half of what its listener expects.  Returns the sockets and how many connects failed."""
    held, failed = [], 0
    for i in range(count):
        for listener in listeners:
            family, addr = node.address(listener)
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                _connect(s, addr, family)
            except OSError:
                failed += 1
                s.close()
                continue
            if i % 2:
                try:
                    s.send(HALF[listener])
                except OSError:
                    pass
            held.append(s)
    return held, failed


def _connect(s: socket.socket, addr, family: int) -> None:
    """Connect without blocking for long.  A TCP connect is left in progress (the kernel
    completes it).  A unix one finding the listener's backlog full (EAGAIN) is tried again until
    there is room, for at most 10 s: the daemon is to see every connection, not the kernel."""
    deadline = time.monotonic() + 10
    while True:
        try:
            s.connect(addr)
            return
        except (BlockingIOError, InterruptedError):
            if family != socket.AF_UNIX:
                return
            if time.monotonic() > deadline:
                raise
            time.sleep(0.001)


def _progress(path: str) -> dict:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {"received": 0, "requests": 0, "errors": []}


def _scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.fixture
def key(tmp_path):
    path = str(tmp_path / "cluster.key")
    random_key_file(path)
    return path


@pytest.fixture(scope="module", autouse=True)
def _own_limit():
    """This process holds thousands of connections at once: raise its own soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * FLOOD * len(LISTENERS) + 256
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"needs RLIMIT_NOFILE of {want} in the test process (hard limit {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# The metric, in stat, of each listener's refusals (stat["counters"], or stat["peer"]).
REFUSED_IN_STAT = {"control": ("counters", "control_connections_refused"),
                   "session": ("counters", "connections_refused"),
                   "metrics": ("counters", "metrics_connections_refused"),
                   "peer": ("peer", "evicted_pending")}


@pytest.mark.parametrize("listeners", [(name,) for name in LISTENERS] + [LISTENERS],
                         ids=[*LISTENERS, "all-at-once"])
def test_a_flood_of_idle_and_half_open_connections_ends_nothing(tmp_path, key, listeners):
    node = Node(str(tmp_path), key, "A")
    live = progress = stop = None
    other = None
    try:
        progress, stop = str(tmp_path / "progress.json"), str(tmp_path / "stop")
        live = subprocess.Popen([sys.executable, "-c", LIVE_WORKER, node.socket, progress, stop])
        until(lambda: _progress(progress)["requests"] >= 3, 30, "the live client started")
        fds_before = node.fds()

        held, failed = _flood(node, listeners, FLOOD)
        try:
            before = _progress(progress)
            peak = 0
            end = time.monotonic() + HOLD
            while time.monotonic() < end:
                assert node.proc.poll() is None, node.log()[-3000:]
                peak = max(peak, node.fds())
                time.sleep(0.1)
            during = _progress(progress)
        finally:
            for s in held:
                s.close()
        assert len(held) + failed == FLOOD * len(listeners)
        # The daemon never held more descriptors than its limit allows, and it is alive.
        assert peak < DAEMON_NOFILE, peak
        assert node.proc.poll() is None, node.log()[-3000:]
        # The client attached before the flood kept receiving and asking during it.
        assert during["received"] > before["received"] + 20, (before, during)
        assert during["requests"] > before["requests"] + 3, (before, during)
        assert not during["errors"], during["errors"][:5]

        # After the flood: what it held is given back, and new clients are served.
        until(lambda: node.fds() <= fds_before + 8, 30,
               f"the daemon's descriptors back near {fds_before} (now {node.fds()})")
        with shimmy.Channel("flood/after", daemon=node.socket) as ch:
            sub = ch.subscribe()
            ch.publish(b"served")
            assert bytes(sub.receive(timeout=10)) == b"served"
        samples = _scrape(node.metrics_url)
        client = DaemonClient(node.socket)
        try:
            stat = client.request("stat")
        finally:
            client.close()
        for listener in listeners:
            where, name = REFUSED_IN_STAT[listener]
            counted = stat[where]["counters" if where == "peer" else name]
            counted = counted[name] if where == "peer" else counted
            assert counted > 0, (listener, stat["counters"], stat["peer"]["counters"])
            refused = samples.get(("shimmy_connections_refused_total",
                                   frozenset({("listener", listener)})))
            assert refused == counted, (listener, refused, counted)
        if "peer" in listeners:
            # A real peer daemon links after the flood.
            other_dir = tmp_path / "b"
            other_dir.mkdir()
            other = Node(str(other_dir), key, "B", "--peer", f"127.0.0.1:{node.peer_port}")
            probe = DaemonClient(node.socket)
            try:
                until(lambda: probe.request("stat")["peer"]["links"], 30,
                       "node B linked to A after the flood")
            finally:
                probe.close()

        open(stop, "w").close()
        assert live.wait(30) == 0
        final = _progress(progress)
        assert not final["errors"], final["errors"][:5]
    finally:
        if live is not None and live.poll() is None:
            live.kill()
            live.wait()
        if other is not None:
            other.stop()
        code = node.stop()
    assert code == 0, node.log()[-3000:]
    log = node.log()
    assert "Traceback" not in log, log[-5000:]
    # Refusals are logged, throttled: a handful of lines, not one per connection.
    assert log.count("WARNING") < 200, log.count("WARNING")


def test_control_connections_past_the_quota_are_told_why(daemon_factory, tmp_path):
    """One uid's control connections past quota_control_connections get one error reply naming
    the setting, then end; the SDK raises it as LimitExceeded; each refusal is counted."""
    cfg = tmp_path / "shimmyd.toml"
    cfg.write_text("quota_control_connections = 8\n")
    d = daemon_factory("--config", str(cfg))
    held = []
    try:
        for _ in range(7):   # with the probe's own connection below: 8
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(d.socket)
            held.append(s)
        probe = DaemonClient(d.socket)
        try:
            with pytest.raises(shimmy.LimitExceeded, match="quota_control_connections=8"):
                DaemonClient(d.socket)
            extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            extra.connect(d.socket)
            held.append(extra)
            extra.settimeout(5)
            reply = msgpack.unpackb(read_frame(extra, time.monotonic() + 5))
            assert reply["ok"] is False and reply["error"]["code"] == "limit", reply
            assert "holds 8 control connections" in reply["error"]["message"], reply
            assert extra.recv(1) == b""   # and closed
            assert probe.request("stat")["counters"]["control_connections_refused"] == 2
        finally:
            probe.close()
    finally:
        for s in held:
            s.close()
    # Given back as they close: a new client is served.
    client = until(lambda: _try_client(d.socket), 10, "a client served after the quota frees")
    client.close()


def _try_client(path: str):
    try:
        return DaemonClient(path)
    except shimmy.LimitExceeded:
        return None
