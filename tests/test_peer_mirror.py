"""Multi-node tests of the peer module: several daemons on one machine, each in its own IPC and
mount namespace with a private /dev/shm, peered over 127.0.0.1 only.

Client processes of a node run inside that node's namespaces (nsenter).  The test process talks
to the daemons' control sockets directly (plain files) for stats.  Every process started here is
stopped here, by pid.  Also runnable as a script: ``python test_peer_mirror.py pub|sub ...`` is
what the client processes execute.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types
import zlib

import pytest

HERE = os.path.abspath(__file__)
HAVE_NS = os.geteuid() == 0 and shutil.which("unshare") and shutil.which("nsenter")
pytestmark = pytest.mark.skipif(
    not HAVE_NS, reason="needs root, unshare and nsenter (a private IPC namespace and /dev/shm "
                        "per node)")


# -- client processes (run inside a node's namespaces) ---------------------------------------------
def make_payload(i: int, rng: random.Random) -> bytes:
    body = rng.randbytes(rng.choice((0, 8, 60, 200, 1000, 3000)))
    head = struct.pack("<Q", i) + body
    return head + struct.pack("<I", zlib.crc32(head))


def check_payload(data: bytes) -> int:
    if len(data) < 12 or zlib.crc32(data[:-4]) != struct.unpack("<I", data[-4:])[0]:
        raise AssertionError(f"checksum mismatch in a message of {len(data)} bytes")
    return struct.unpack("<Q", data[:8])[0]


def _open_when_linked(sock: str, name: str, mode: str, capacity: int, links: int):
    """Open ``name`` once the node's daemon answers and has ``links`` peer links up (after a
    restart of the daemon, the publisher reopens only then; docs/peering.md, restarts)."""
    import shimmy
    from shimmy.errors import DaemonUnavailable
    from shimmy.sdk.client import DaemonClient
    deadline = time.monotonic() + 60
    last: Exception | None = None
    while True:
        try:
            c = DaemonClient(sock)
            try:
                up = len(c.request("stat")["peer"]["links"])
            finally:
                c.close()
            if up >= links:
                return shimmy.Channel(name, daemon=sock, mode=mode, capacity=capacity,
                                      publish_timeout=60)
        except (DaemonUnavailable, ConnectionError) as exc:
            if repr(exc) != repr(last):
                print(f"waiting for the daemon: {exc!r}", file=sys.stderr, flush=True)
            last = exc
        assert time.monotonic() < deadline, f"daemon never came back: {last}"
        time.sleep(0.05)


CARRY = -2   # worker_pub ``links``: survive daemon restarts with Channel.reopen


def _reopen(ch) -> None:
    """``ch.reopen()`` as soon as a daemon answers on its socket again."""
    from shimmy.errors import DaemonUnavailable
    deadline = time.monotonic() + 60
    while True:
        try:
            ch.reopen()
            return
        except DaemonUnavailable as exc:
            assert time.monotonic() < deadline, f"daemon never came back: {exc}"
            time.sleep(0.02)


def worker_pub(sock: str, name: str, mode: str, n: int, pace: float, capacity: int,
               announce: int = 1, links: int = 0) -> None:
    """Publish ``n`` checksummed messages.  ``announce``: publish one message before "ready"
    (else the publisher is attached but silent).  ``links`` > 0: survive restarts of our daemon
    by reopening (once it has that many links) and publishing the same index again; -1: the
    same, reopening as soon as the daemon answers; ``CARRY``: on any error, ``Channel.reopen``
    (carrying the stream over) as soon as the daemon answers, then the same index again."""
    from shimmy.errors import ShimmyError
    ch = _open_when_linked(sock, name, mode, capacity, max(links, 0))
    if announce:
        ch.publish(b"announce")
    print("ready", flush=True)
    sys.stdin.readline()      # go
    rng = random.Random(1234)
    reopened = 0
    i = 0
    while i < n:
        if links == CARRY and ch._view.retired():
            _reopen(ch)   # (publish itself notices only at its next slow path)
            reopened += 1
        elif links and ch._view.retired():
            ch.close()
            ch = _open_when_linked(sock, name, mode, capacity, max(links, 0))
            reopened += 1
        try:
            ch.publish(make_payload(i, rng))
        except ShimmyError:
            if not links:
                raise
            if links == CARRY:
                _reopen(ch)
                reopened += 1
            continue      # retired under us: reopen and publish index i again
        i += 1
        if pace and i % 100 == 0:
            time.sleep(pace)
    print("done", reopened, flush=True)
    sys.stdin.readline()
    ch.close()


def _reopen_when_known(ch, sock: str, name: str) -> None:
    """After our daemon restarted: ``ch.reopen()`` once it answers and knows ``name`` as
    published by a peer (so the channel is made as that peer's replica)."""
    from shimmy.errors import DaemonUnavailable
    from shimmy.sdk.client import DaemonClient
    deadline = time.monotonic() + 60
    while True:
        try:
            c = DaemonClient(sock)
            try:
                remote = c.request("list").get("remote", [])
            finally:
                c.close()
            if any(r["name"] == name and r.get("published") for r in remote):
                ch.reopen()
                return
        except DaemonUnavailable:
            pass
        assert time.monotonic() < deadline, "daemon never came back with the channel"
        time.sleep(0.05)


def worker_sub(sock: str, name: str, n: int, idle: float, wait_known: int = 1,
               mode: str = "", capacity: int | str = 0, reopen: int | str = 0) -> None:
    import shimmy
    import shimmy.sdk.channel
    from shimmy.sdk.client import get_client
    deadline = time.monotonic() + 20
    while wait_known:   # wait until our daemon knows the channel (local, or announced by a peer)
        reply = get_client(sock).request("list")
        names = {c["name"] for c in reply["channels"]}
        names |= {c["name"] for c in reply.get("remote", []) if c.get("published")}
        if name in names:
            break
        assert time.monotonic() < deadline, f"channel {name} never announced"
        time.sleep(0.05)
    ch = shimmy.Channel(name, daemon=sock, mode=mode or None, capacity=int(capacity) or None)
    sub = ch.subscribe()
    while wait_known and sub.status == "down":
        assert time.monotonic() < deadline, "mirror link never came up"
        time.sleep(0.02)
    print("ready", sub.status, flush=True)
    got = lost = 0
    prev = None
    first = None
    errors: list[str] = []
    statuses = [sub.status]
    waited = 0.0
    reopens = 0
    while True:
        try:
            msg = sub.receive(timeout=0.2)
        except shimmy.ChannelClosed:
            if not int(reopen):
                raise
            _reopen_when_known(ch, sock, name)   # our daemon restarted: same Subscription
            reopens += 1
            continue
        except TimeoutError:
            waited += 0.2
            if sub.status != statuses[-1]:
                statuses.append(sub.status)
            if waited >= idle:
                break
            continue
        waited = 0.0
        if sub.status != statuses[-1]:
            statuses.append(sub.status)
        try:
            data = bytes(msg)
        except shimmy.MessageOverwritten:   # lossy: lapped while we copied it
            if prev is not None:
                lost += msg.lost + 1
                prev += 1 + msg.lost
            continue
        if data == b"announce":
            continue
        i = check_payload(data)
        if first is None:
            first = i
        elif prev is not None and i != prev + 1 + msg.lost:   # exact loss accounting
            errors.append(f"index {i} after {prev} with lost={msg.lost}")
        lost += msg.lost if prev is not None else 0
        prev = i
        got += 1
        if i == n - 1:
            break
    # The link state is set by the daemon's main loop when it handles ``mirror_ok``; the first
    # batches may be committed (by the link reader) a moment before that: let it settle.
    settle = time.monotonic() + 2.0
    while sub.status == "down" and time.monotonic() < settle:
        time.sleep(0.01)
    if sub.status != statuses[-1]:
        statuses.append(sub.status)
    print(json.dumps({"got": got, "lost": lost, "first": first, "last": prev,
                      "errors": errors[:5], "status": sub.status, "statuses": statuses,
                      "reopens": reopens}),
          flush=True)


def worker_sub_mode(sock: str, name: str, mode: str) -> None:
    """Subscribe to ``name`` opened with ``mode``; report the first status other than local."""
    import shimmy
    ch = shimmy.Channel(name, daemon=sock, mode=mode)
    sub = ch.subscribe()
    print("ready", sub.status, flush=True)
    deadline = time.monotonic() + 20
    while sub.status == "local" and time.monotonic() < deadline:
        time.sleep(0.02)
    print("status", sub.status, flush=True)


# -- nodes and processes ---------------------------------------------------------------------------
class Node:
    """One node: a process holding a private IPC and mount namespace with its own tmpfs on
    /dev/shm (the "machine"), and a daemon run inside it.  ``stop``/``start`` restart the
    daemon on the same machine (clients there keep running); ``close`` ends the machine."""

    def __init__(self, name: str, key: str, *args: str, hosts: str = ""):
        self.name = name
        self.dir = tempfile.mkdtemp(prefix=f"shimmy-peer-{name}-")
        self.socket = os.path.join(self.dir, "shimmyd.sock")
        self.key = key
        self.args = args
        self.proc: subprocess.Popen | None = None
        # hosts: a file bound over /etc/hosts inside the node (DNS discovery on loopback)
        setup = f"mount --bind {hosts} /etc/hosts && " if hosts else ""
        self.holder = subprocess.Popen(
            ["unshare", "--ipc", "--mount", "sh", "-c",
             setup + "mount -t tmpfs -o size=256m none /dev/shm && echo up && exec sleep 3600"],
            stdout=subprocess.PIPE, text=True)
        assert self.holder.stdout is not None
        if self.holder.stdout.readline().strip() != "up":
            raise RuntimeError(f"node {name}: could not make a private /dev/shm")

    @property
    def pid(self) -> int:
        """The daemon's pid (the node must be started)."""
        assert self.proc is not None, f"node {self.name} is not started"
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def enter(self) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "--ipc", "--mount"]

    def start(self) -> "Node":
        for p in (self.socket, self.socket + ".session"):
            if os.path.exists(p):
                os.unlink(p)
        cmd = [*self.enter(), sys.executable, "-m", "shimmy.cli", "daemon", "--socket",
               self.socket, "--node", self.name, "--cluster-key-file", self.key, *self.args]
        log = open(os.path.join(self.dir, "daemon.log"), "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 60   # a loaded machine (load ~18) took over 15 s
        while not os.path.exists(self.socket + ".session"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"node {self.name} did not start:\n{self.log()}")
            time.sleep(0.02)
        return self

    def log(self) -> str:
        with open(os.path.join(self.dir, "daemon.log"), errors="replace") as fh:
            return fh.read()

    def stat(self) -> dict:
        from shimmy.sdk.client import DaemonClient
        c = DaemonClient(self.socket)
        try:
            return c.request("stat")
        finally:
            c.close()

    def peer(self) -> dict:
        return self.stat()["peer"]

    def request(self, op: str, **fields) -> dict:
        from shimmy.sdk.client import DaemonClient
        c = DaemonClient(self.socket)
        try:
            return c.request(op, **fields)
        finally:
            c.close()

    def client(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([*self.enter(), sys.executable, HERE, *args],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def close(self) -> None:
        self.stop()
        if self.holder.poll() is None:
            self.holder.kill()
            self.holder.wait(10)


def wait_for(what: str, cond, timeout: float = 30, interval: float = 0.05):
    """Poll ``cond()`` until it returns something true; fail naming ``what`` after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def wait_line(proc: subprocess.Popen, want: str, timeout: float = 30) -> str:
    result: list[str] = []
    out, err = proc.stdout, proc.stderr
    assert out is not None and err is not None
    t = threading.Thread(target=lambda: result.append(out.readline()), daemon=True)
    t.start()
    t.join(timeout)
    line = result[0] if result else ""
    if not line.startswith(want):
        proc.kill()
        raise AssertionError(f"expected {want!r}, got {line!r}; "
                             f"stderr: {err.read()[-3000:]}")
    return line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_nodes():
    """The ``cluster`` fixture's body (shared with the other test_peer_* files): ``node()``
    starts a node, ``client()`` a client process in it, ``config()`` a settings file; all are
    stopped afterwards, by pid."""
    made: list = []
    procs: list[subprocess.Popen] = []
    keydir = tempfile.mkdtemp(prefix="shimmy-key-")
    key = os.path.join(keydir, "cluster.key")
    from shimmy.daemon.peer.auth import random_key_file
    random_key_file(key)

    c = types.SimpleNamespace(key=key, dir=keydir)

    def node(name, *args, key_file=None, start=True):
        n = Node(name, key_file or key, "--log-level", "info", *args)
        made.append(n)
        return n.start() if start else n

    def client(n, *args):
        p = n.client(*args)
        procs.append(p)
        return p
    def config(name, **settings):
        """``--config FILE`` setting ``settings`` (numbers and strings) for one node."""
        path = os.path.join(keydir, f"{name}.toml")
        with open(path, "w") as fh:
            for k, v in settings.items():
                fh.write(f"{k} = {json.dumps(v)}\n")
        return ["--config", path]
    c.node, c.client, c.config = node, client, config
    yield c
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(5)
    for n in made:
        n.close()
    keep = os.environ.get("SHIMMY_PEER_TEST_LOGS")   # a folder to keep the daemons' logs in
    for n in made:
        if keep:
            os.makedirs(keep, exist_ok=True)
            shutil.copy(os.path.join(n.dir, "daemon.log"), os.path.join(keep, f"{n.name}.log"))
        shutil.rmtree(n.dir, ignore_errors=True)
    shutil.rmtree(keydir, ignore_errors=True)


@pytest.fixture
def cluster():
    yield from cluster_nodes()


def run_stream(c, pub_node, sub_nodes, name, mode, n, pace=0.0, capacity=1 << 20, during=None,
               idle=15.0):
    """Publisher on pub_node, one subscriber per node in sub_nodes; returns their results."""
    pub = c.client(pub_node, "pub", pub_node.socket, name, mode, str(n), str(pace), str(capacity))
    wait_line(pub, "ready")
    subs = [c.client(nd, "sub", nd.socket, name, str(n), str(idle)) for nd in sub_nodes]
    for s in subs:
        wait_line(s, "ready")
    pub.stdin.write("go\n")
    pub.stdin.flush()
    if during is not None:
        during(pub, subs)
    results = [json.loads(wait_line(s, "{", timeout=120)) for s in subs]
    wait_line(pub, "done", timeout=60)
    pub.stdin.write("bye\n")
    pub.stdin.flush()
    pub.wait(20)
    return results


def check(result, n, reliable, allow_start_after=False):
    assert not result["errors"], result
    if reliable:
        assert result["lost"] == 0, result
        assert result["first"] == 0 or allow_start_after, result
        assert result["last"] == n - 1, result
        assert result["got"] == n - result["first"], result
    else:
        assert result["got"] + result["lost"] == result["last"] - result["first"] + 1, result


# -- tests -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["reliable", "lossy"])
def test_fanout_to_two_nodes_in_order(cluster, mode):
    port = free_port()
    # The mirrors are listed after the subscribers have left: a grace far past the time a loaded
    # machine takes to get there keeps them listed (the 1 s default let them go, now and then).
    grace = {"peer_unmirror_grace": 60.0}
    a = cluster.node("A", "--peer-listen", f"127.0.0.1:{port}", *cluster.config("A", **grace))
    b = cluster.node("B", "--peer", f"127.0.0.1:{port}", *cluster.config("B", **grace))
    c = cluster.node("C", "--peer", f"127.0.0.1:{port}", *cluster.config("C", **grace))
    n = 50_000
    results = run_stream(cluster, a, [a, b, c], "fan/" + mode, mode, n)
    for r in results:
        check(r, n, mode == "reliable")
    assert results[0]["status"] == "local" and results[1]["status"] == "up"
    mirrors = {m["to"]: m for m in a.peer()["mirrors"]}
    assert set(mirrors) == {"B", "C"}
    for m in mirrors.values():
        assert m["batches"] > 0 and m["bytes"] > 0 and m["messages"] > 0
        # batching: far fewer sends than messages
        assert m["batches"] < n
    if mode == "reliable":
        assert all(r["got"] == n for r in results)
    else:
        assert all(r["last"] == n - 1 for r in results)


def test_kill_and_restart_replica_daemon(cluster):
    port = free_port()
    a = cluster.node("A", "--peer-listen", f"127.0.0.1:{port}")
    b = cluster.node("B", "--peer", f"127.0.0.1:{port}")
    c = cluster.node("C", "--peer", f"127.0.0.1:{port}")
    n = 20_000

    def during(pub, subs):
        time.sleep(0.5)
        b.stop(signal.SIGKILL)
        subs[1].kill()
        subs[1].wait(5)
        b.start()
        subs[1] = cluster.client(b, "sub", b.socket, "kr/x", str(n), "10")
        wait_line(subs[1], "ready", timeout=30)

    # pace: 10 ms per 100 messages, so the stream (>= 2 s) outlasts B's kill and restart and
    # the restarted subscriber has something left to receive
    results = run_stream(cluster, a, [c, b], "kr/x", "reliable", n, pace=0.01,
                         during=during)
    check(results[0], n, True)                    # C undisturbed
    late = results[1]
    check(late, n, True, allow_start_after=True)   # restarted B: in order, nothing lost
    assert late["got"] > 0
    assert "reconnects" in a.peer()["counters"]


class Proxy:
    """127.0.0.1 TCP proxy whose live connections the test can cut."""

    def __init__(self, target: int, port: int = 0):
        self.target = target
        self.lsock = socket.create_server(("127.0.0.1", port))
        self.port = self.lsock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopped:
            try:
                a, _ = self.lsock.accept()
            except OSError:
                return
            try:
                b = socket.create_connection(("127.0.0.1", self.target))
            except OSError:   # the target is down: the dialer sees the connection close
                a.close()
                continue
            self.conns += [a, b]
            for x, y in ((a, b), (b, a)):
                threading.Thread(target=self._pipe, args=(x, y), daemon=True).start()

    @staticmethod
    def _pipe(x, y):
        try:
            while True:
                d = x.recv(1 << 16)
                if not d:
                    break
                y.sendall(d)
        except OSError:
            pass
        for s in (x, y):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def close(self):
        self.stopped = True
        try:
            self.lsock.shutdown(socket.SHUT_RDWR)   # wakes the blocked accept(); close alone won't
        except OSError:
            pass
        self.lsock.close()
        self.cut()


@pytest.mark.parametrize("mode", ["reliable", "lossy"])
def test_connection_cut_by_proxy_resumes(cluster, mode):
    port = free_port()
    a = cluster.node("A", "--peer-listen", f"127.0.0.1:{port}")
    proxy = Proxy(port)
    try:
        b = cluster.node("B", "--peer", f"127.0.0.1:{proxy.port}")
        n = 20_000

        def during(pub, subs):
            for _ in range(2):
                time.sleep(0.4)
                proxy.cut()

        # pace: >= 1 s of stream, so both cuts land mid-stream
        (r,) = run_stream(cluster, a, [b], "px/" + mode, mode, n, pace=0.005, during=during)
        check(r, n, mode == "reliable")
        replica = b.peer()["replicas"][0]
        assert replica["reconnects"] >= 1, replica
        assert a.peer()["counters"]["reconnects"] >= 1
    finally:
        proxy.close()


@pytest.mark.parametrize("mode", ["reliable", "lossy"])
def test_paused_source(cluster, mode):
    port = free_port()
    a = cluster.node("A", "--peer-listen", f"127.0.0.1:{port}")
    b = cluster.node("B", "--peer", f"127.0.0.1:{port}")
    n = 20_000

    def during(pub, subs):
        time.sleep(0.3)
        a.proc.send_signal(signal.SIGSTOP)   # the source daemon: its mirror stops reading
        time.sleep(1.5)
        a.proc.send_signal(signal.SIGCONT)

    # pace: >= 1 s of stream, so the pause (at 0.3 s) lands mid-stream
    (r,) = run_stream(cluster, a, [b], "ps/" + mode, mode, n, pace=0.005, capacity=1 << 16,
                      during=during)
    check(r, n, mode == "reliable")
    if mode == "lossy":
        mirror = a.peer()["mirrors"][0]
        # the publisher lapped the paused mirror: the hole was reported, exactly (check())
        assert mirror["gaps"] >= 1 and r["lost"] > 0, (mirror, r)


def test_bad_peers_are_refused_and_nothing_else_disturbed(cluster):
    from shimmy.daemon.peer import auth
    from shimmy.daemon.peer.tcp import HDR, K_CTRL
    import msgpack
    port = free_port()
    a = cluster.node("A", "--peer-listen", f"127.0.0.1:{port}")
    b = cluster.node("B", "--peer", f"127.0.0.1:{port}")
    wrong = os.path.join(cluster.dir, "wrong.key")
    auth.random_key_file(wrong)
    cluster.node("W", "--peer", f"127.0.0.1:{port}", key_file=wrong)

    def during(pub, subs):
        # garbage on the peer port
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n" + bytes(64))
            s.settimeout(5)
            try:
                assert s.recv(100) == b""   # closed on us
            except ConnectionResetError:
                pass
        # an authenticated peer announcing absurd sizes
        for payload in ("ctrl", "dir"):
            s = socket.create_connection(("127.0.0.1", port))
            s.settimeout(5)
            auth.dial_handshake(s, auth.load_key(cluster.key), "evil-" + payload)
            if payload == "ctrl":
                s.sendall(HDR.pack(K_CTRL, 0, 1 << 40, 0, 0, 0))
            else:
                body = msgpack.packb({"t": "dir", "node": "evil",
                                      "channels": {"huge": [0, 1 << 40, 0, 0, 1, "", 1]}})
                s.sendall(HDR.pack(K_CTRL, 0, len(body), 0, 0, 0) + body)
            time.sleep(0.3)
            s.close()

    n = 5_000
    (r,) = run_stream(cluster, a, [b], "bad/x", "reliable", n, pace=0.002, during=during)
    check(r, n, True)
    counters = a.peer()["counters"]
    assert counters["auth_failures"] >= 1, counters
    assert counters["protocol_errors"] >= 1, counters
    assert counters["refused_sizes"] >= 2, counters
    log = a.log()
    assert "peer refused" in log and ": auth:" in log
    assert "bad magic" in log
    assert "exceeds peer_max_control_bytes" in log
    assert "outside [4096, peer_max_replica_capacity" in log
    assert {lk["node"] for lk in a.peer()["links"]} >= {"B"}


def test_ls_shows_where_channels_are_published_and_mirrored(cluster):
    port = free_port()
    a = cluster.node("A", "--peer-listen", f"127.0.0.1:{port}")
    b = cluster.node("B", "--peer", f"127.0.0.1:{port}")
    (r,) = run_stream(cluster, a, [b], "ls/x", "reliable", 100)
    check(r, 100, True)
    out = subprocess.run([sys.executable, "-m", "shimmy.cli", "ls", "--daemon", b.socket],
                         capture_output=True, text=True, timeout=20).stdout
    assert "ls/x" in out and "A (replica" in out, out
    out = subprocess.run([sys.executable, "-m", "shimmy.cli", "ls", "--daemon", a.socket],
                         capture_output=True, text=True, timeout=20).stdout
    assert "ls/x" in out, out


if __name__ == "__main__":
    role, args = sys.argv[1], sys.argv[2:]
    if role == "pub":
        worker_pub(args[0], args[1], args[2], int(args[3]), float(args[4]),
                   *(int(x) for x in args[5:]))
    elif role == "sub_mode":
        worker_sub_mode(*args)
    elif role == "sub":
        worker_sub(args[0], args[1], int(args[2]), float(args[3]), int(args[4]) if args[4:] else 1,
                   *args[5:])


def test_peers_found_through_dns_discovery(cluster):
    """--peer-dns: every address a name resolves to is a peer (a Kubernetes headless Service).
    Here the "name" is an address literal on loopback; the node with the higher address is the
    one dialed, so exactly one link forms and messages flow."""
    port = free_port()
    a = cluster.node("a", "--peer-listen", f"127.0.0.3:{port}", "--peer-dns", f"127.0.0.2:{port}")
    b = cluster.node("b", "--peer-listen", f"127.0.0.2:{port}", "--peer-dns", f"127.0.0.3:{port}")
    deadline = time.monotonic() + 20
    while not (a.peer()["links"] and b.peer()["links"]):
        assert time.monotonic() < deadline, a.log()[-3000:] + b.log()[-3000:]
        time.sleep(0.1)
    assert b.peer()["counters"]["peers_discovered"] == 1   # 127.0.0.2 dials 127.0.0.3 ...
    assert a.peer()["counters"]["peers_discovered"] == 0   # ... and not the other way round
    (result,) = run_stream(cluster, a, [b], "dns/found", "reliable", 2000)
    check(result, 2000, reliable=True)
