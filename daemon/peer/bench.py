"""Cross-node one-way throughput: two daemons peered on loopback vs a raw TCP stream and ZeroMQ
tcp carrying the same messages.  Reusable by shimmy/bench:

    from shimmy.daemon.peer.bench import cross_node, compare
    cross_node(size=64, count=200_000)   -> seconds
    compare(sizes=(64, 65536, 1 << 20), repeat=3)
        -> {size: {"shimmy": .., "raw_tcp": .., "zmq": ..}}

Each side runs in its own process (publisher/sender, subscriber/receiver); the two daemons are
real ``shimmy daemon`` subprocesses with their own sockets (distinct shm prefixes), peered over
127.0.0.1.  Every receiver times its steady state: the clock starts after the first tenth of the
messages (``warm_up``), so a fresh connection's slow start and socket-buffer autotuning (the raw
TCP and ZeroMQ rows open one per measurement; the daemons' link is already up) count for no one,
and each function returns the seconds ``count`` messages take at that rate.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time


# Each receiver uses its library's idiomatic call for the size, the rule the ZeroMQ sender below
# uses too (``copy=size < 4096``): below this size a copy into a new bytes object is cheaper than
# a zero-copy wrapper (shimmy ``receive_bytes``; ZeroMQ frames are zero-copy throughout), from it
# on the zero-copy call (shimmy ``receive``: a view into the ring, no copy).
ZERO_COPY_FROM = 4096


def _count_for(size: int, budget_bytes: int = 256 << 20, cap: int = 200_000) -> int:
    return max(200, min(cap, budget_bytes // max(size, 1)))


def warm_up(count: int) -> int:
    """Messages a receiver takes before it starts its clock."""
    return count // 10


def _steady(count: int, seconds: float, timed: int) -> float:
    """Seconds for ``count`` messages at the rate of ``timed`` messages in ``seconds``."""
    return seconds * count / timed


def _recv_exact(s, view):
    got = 0
    while got < len(view):
        k = s.recv_into(view[got:])
        if not k:
            raise EOFError
        got += k


def _raw_rx(port_q, res_q, size, count):
    ls = socket.create_server(("127.0.0.1", 0))
    port_q.put(ls.getsockname()[1])
    c, _ = ls.accept()
    buf = bytearray(max(size, 1) + 4)
    hv = memoryview(buf)
    t0 = 0.0
    warm = warm_up(count)
    for i in range(count):
        _recv_exact(c, hv[:4])
        n = struct.unpack_from("<I", buf)[0]
        _recv_exact(c, hv[4:4 + n])
        if i == warm:
            t0 = time.perf_counter()
    res_q.put(_steady(count, time.perf_counter() - t0, count - 1 - warm))


def _raw_tx(port, size, count):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload = os.urandom(size)
    hdr = struct.pack("<I", size)
    for _ in range(count):
        s.sendmsg([hdr, payload])
    s.close()


def _one_way(rx_target, rx_args, tx_target, tx_args) -> float:
    """Receiver first (it reports its port), then the sender; seconds the receiver measured."""
    port_q: mp.Queue = mp.Queue()
    res_q: mp.Queue = mp.Queue()
    rx = mp.Process(target=rx_target, args=(port_q, res_q, *rx_args))
    rx.start()
    tx = mp.Process(target=tx_target, args=(port_q.get(timeout=30), *tx_args))
    tx.start()
    dt = res_q.get(timeout=300)
    tx.join()
    rx.join()
    return dt


def raw_tcp(size: int, count: int) -> float:
    return _one_way(_raw_rx, (size, count), _raw_tx, (size, count))


def _zmq_rx(port_q, res_q, count):
    import zmq
    ctx = zmq.Context()
    s = ctx.socket(zmq.PULL)
    port_q.put(s.bind_to_random_port("tcp://127.0.0.1"))
    warm = warm_up(count)
    for _ in range(warm + 1):
        s.recv(copy=False)
    t0 = time.perf_counter()
    for _ in range(count - 1 - warm):
        s.recv(copy=False)
    res_q.put(_steady(count, time.perf_counter() - t0, count - 1 - warm))


def _zmq_tx(port, size, count):
    import zmq
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.SNDHWM, 100_000)
    s.connect(f"tcp://127.0.0.1:{port}")
    payload = os.urandom(size)
    for _ in range(count):
        s.send(payload, copy=size < ZERO_COPY_FROM)
    s.close(linger=-1)
    ctx.term()


def zmq_tcp(size: int, count: int) -> float:
    return _one_way(_zmq_rx, (count,), _zmq_tx, (size, count))


def _wait_published(sock: str, name: str, timeout: float = 30.0) -> None:
    """Until this node's directory says a peer *publishes* ``name``: a name is announced when it
    is opened, and opening it here before its publisher's capacity is known would make a local
    channel of the default capacity, which then conflicts with the source's."""
    from shimmy.sdk.client import get_client
    deadline = time.monotonic() + timeout
    while not any(c["name"] == name and c.get("published")
                  for c in get_client(sock).request("list").get("remote", [])):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} never announced as published to {sock}")
        time.sleep(0.02)


def _shimmy_rx(sock, name, ready_q, res_q, count, batch, size):
    import shimmy
    _wait_published(sock, name)
    ch = shimmy.Channel(name, daemon=sock)
    sub = ch.subscribe()
    while sub.status != "up":
        time.sleep(0.01)
    ready_q.put(1)
    warm = warm_up(count)
    for _ in range(warm + 1):
        sub.receive(timeout=30)
    t0 = time.perf_counter()
    c0 = _own_cpu()
    timed = count - 1 - warm
    if batch:
        got, most = 0, 4 * batch
        while got < timed:
            got += len(sub.receive_many(min(most, timed - got), timeout=30))
    elif size < ZERO_COPY_FROM:   # small: the copy path, a bytes object per message
        for _ in range(timed):
            sub.receive_bytes(timeout=30)
    else:   # large: the zero-copy path (a view into the ring), as the ZeroMQ receiver's frames
        for _ in range(timed):
            sub.receive(timeout=30)
    res_q.put((_steady(count, time.perf_counter() - t0, timed), _own_cpu() - c0, timed))


def _shimmy_tx(sock, name, ready_q, go_q, size, count, capacity, batch):
    import shimmy
    ch = shimmy.Channel(name, daemon=sock, mode="reliable", capacity=capacity,
                        publish_timeout=60)
    ch.publish(b"x")
    ready_q.put(1)
    go_q.get()
    payload = os.urandom(size)
    c0 = _own_cpu()
    if batch:
        msgs = [payload] * batch
        for _ in range(count // batch):
            ch.publish_many(msgs)
        ch.publish_many(msgs[:count % batch])
    else:
        for _ in range(count):
            ch.publish(payload)
    ready_q.put(_own_cpu() - c0)


def _own_cpu() -> float:
    """CPU seconds (user + system, all threads) of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of another process so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class TwoDaemons:
    """Two peered daemons on loopback (no namespaces needed: distinct sockets, shm prefixes)."""

    def __init__(self, transport: str = "tcp"):
        self.transport = transport   # the mirrors' data path: tcp, or rdma where a device exists
        self.dir = tempfile.mkdtemp(prefix="shimmy-xbench-")
        key = os.path.join(self.dir, "key")
        from .auth import random_key_file
        random_key_file(key)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.a = os.path.join(self.dir, "a.sock")
        self.b = os.path.join(self.dir, "b.sock")
        base = [sys.executable, "-m", "shimmy.cli", "daemon", "--cluster-key-file", key,
                "--log-level", "warning", "--transport", transport]
        log = open(os.path.join(self.dir, "log"), "ab")
        self.procs = [
            subprocess.Popen(base + ["--socket", self.a, "--node", "bench-a", "--peer-listen",
                                     f"127.0.0.1:{port}"], stdout=log, stderr=log),
            subprocess.Popen(base + ["--socket", self.b, "--node", "bench-b", "--peer",
                                     f"127.0.0.1:{port}"], stdout=log, stderr=log)]
        for p in (self.a, self.b):
            while not os.path.exists(p + ".session"):
                time.sleep(0.02)
        self.last_cpu: dict[str, float] = {}   # CPU µs per message of the last cross_node()

    def cpu(self) -> tuple[float, float]:
        return _proc_cpu(self.procs[0].pid), _proc_cpu(self.procs[1].pid)

    def close(self):
        for p in self.procs:
            p.terminate()
            p.wait(10)


def cross_node(size: int, count: int, daemons: TwoDaemons | None = None, batch: int = 0) -> float:
    """Seconds for ``count`` messages of ``size`` bytes, publisher on A to subscriber on B
    (``batch``: the publisher calls ``publish_many`` with that many messages at a time and the
    subscriber ``receive_many``, instead of one call per message)."""
    own = daemons is None
    d = daemons or TwoDaemons()
    name = f"xbench/{size}/{time.monotonic_ns()}"
    capacity = 1 << max(22, (size * 8 - 1).bit_length())
    try:
        ready_q: mp.Queue = mp.Queue()
        go_q: mp.Queue = mp.Queue()
        res_q: mp.Queue = mp.Queue()
        tx = rx = None
        tx = mp.Process(target=_shimmy_tx, args=(d.a, name, ready_q, go_q, size, count, capacity,
                                                      batch))
        tx.start()
        ready_q.get(timeout=30)
        rx = mp.Process(target=_shimmy_rx, args=(d.b, name, ready_q, res_q, count, batch,
                                                   size))
        rx.start()
        ready_q.get(timeout=30)
        a0, b0 = d.cpu()
        go_q.put(1)
        dt, rx_cpu, rx_timed = res_q.get(timeout=300)
        tx_cpu = ready_q.get(timeout=300)
        a1, b1 = d.cpu()
        per = 1e6 / count
        d.last_cpu = {"publisher": tx_cpu * per, "daemon_a": (a1 - a0) * per,
                      "daemon_b": (b1 - b0) * per, "subscriber": rx_cpu * 1e6 / rx_timed}
        return dt
    finally:
        _reap(tx, rx)
        if own:
            d.close()


def _reap(*procs) -> None:
    """Join the measurement processes; any still running after a failed measurement is
    terminated, so a benchmark never leaves one behind (holding its caller's pipes)."""
    for p in procs:
        if p is None:
            continue
        p.join(10)
        if p.is_alive():
            p.terminate()
            p.join(10)


# -- round trip: a ping published on A and mirrored to B, a pong published on B and mirrored to A

def _subscribe_remote(sock, name):
    import shimmy
    _wait_published(sock, name)
    ch = shimmy.Channel(name, daemon=sock)
    sub = ch.subscribe()
    while sub.status != "up":
        time.sleep(0.01)
    return ch, sub


def _rtt_side(sock, mine, theirs, size, count, ready, go, res_q):
    """Publish ``mine`` here, subscribe ``theirs`` (published on the other node).  The side
    given ``res_q`` pings and measures; the other echoes."""
    import shimmy
    out = shimmy.Channel(mine, daemon=sock)
    out.publish(b"")                     # announce it (and take the publisher role)
    _, sub = _subscribe_remote(sock, theirs)
    ready.put(1)
    go.get()
    payload = os.urandom(size)
    if res_q is None:                    # echo
        for _ in range(count):
            out.publish(sub.receive_bytes(timeout=30))
        return
    samples = []
    for _ in range(count):
        t0 = time.perf_counter_ns()
        out.publish(payload)
        sub.receive_bytes(timeout=30)
        samples.append(time.perf_counter_ns() - t0)
    res_q.put(samples)


def cross_node_rtt(size: int, count: int, daemons: TwoDaemons) -> list[int]:
    """Round trips (ns) of ``size``-byte pings: A -> mirror -> B -> mirror -> A."""
    tag = f"{size}/{time.monotonic_ns()}"
    ready: mp.Queue = mp.Queue()
    go_a: mp.Queue = mp.Queue()
    go_b: mp.Queue = mp.Queue()
    res_q: mp.Queue = mp.Queue()
    a = mp.Process(target=_rtt_side, args=(daemons.a, f"xrtt/ping/{tag}", f"xrtt/pong/{tag}",
                                           size, count, ready, go_a, res_q))
    b = mp.Process(target=_rtt_side, args=(daemons.b, f"xrtt/pong/{tag}", f"xrtt/ping/{tag}",
                                           size, count, ready, go_b, None))
    a.start()
    b.start()
    try:
        ready.get(timeout=60)
        ready.get(timeout=60)
        go_b.put(1)
        go_a.put(1)
        return res_q.get(timeout=300)
    finally:
        _reap(a, b)


def _tcp_echo(port_q, size, count):
    ls = socket.create_server(("127.0.0.1", 0))
    port_q.put(ls.getsockname()[1])
    c, _ = ls.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = memoryview(bytearray(size))
    for _ in range(count):
        _recv_exact(c, buf)
        c.sendall(buf)


def raw_tcp_rtt(size: int, count: int) -> list[int]:
    port_q: mp.Queue = mp.Queue()
    srv = mp.Process(target=_tcp_echo, args=(port_q, size, count))
    srv.start()
    s = socket.create_connection(("127.0.0.1", port_q.get(timeout=30)))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload, buf = os.urandom(size), memoryview(bytearray(size))
    samples = []
    for _ in range(count):
        t0 = time.perf_counter_ns()
        s.sendall(payload)
        _recv_exact(s, buf)
        samples.append(time.perf_counter_ns() - t0)
    s.close()
    srv.join(30)
    return samples


def _zmq_echo(port_q, count):
    import zmq
    ctx = zmq.Context()
    s = ctx.socket(zmq.PAIR)
    port_q.put(s.bind_to_random_port("tcp://127.0.0.1"))
    for _ in range(count):
        s.send(s.recv())
    s.close(linger=1000)
    ctx.term()


def zmq_tcp_rtt(size: int, count: int) -> list[int]:
    import zmq
    port_q: mp.Queue = mp.Queue()
    srv = mp.Process(target=_zmq_echo, args=(port_q, count))
    srv.start()
    ctx = zmq.Context()
    s = ctx.socket(zmq.PAIR)
    s.connect(f"tcp://127.0.0.1:{port_q.get(timeout=30)}")
    payload = os.urandom(size)
    samples = []
    for _ in range(count):
        t0 = time.perf_counter_ns()
        s.send(payload)
        s.recv()
        samples.append(time.perf_counter_ns() - t0)
    s.close(linger=0)
    ctx.term()
    srv.join(30)
    return samples


def compare(sizes=(64, 65536, 1 << 20), repeat=3) -> dict:
    ctx_method = "fork"
    mp.set_start_method(ctx_method, force=True)
    d = TwoDaemons()
    out = {}
    try:
        for size in sizes:
            count = _count_for(size)
            row = {}
            for label, fn in (("shimmy", lambda s=size, n=count: cross_node(s, n, d)),
                              ("raw_tcp", lambda s=size, n=count: raw_tcp(s, n)),
                              ("zmq", lambda s=size, n=count: zmq_tcp(s, n))):
                dts = [fn() for _ in range(repeat)]
                dt = statistics.median(dts)
                row[label] = {"msgs_per_s": round(count / dt),
                              "mb_per_s": round(count * size / dt / 1e6, 1), "count": count}
            out[size] = row
    finally:
        d.close()
    return out


if __name__ == "__main__":
    import json
    sizes = tuple(int(x) for x in sys.argv[1:]) or (64, 65536, 1 << 20)
    print(json.dumps(compare(sizes), indent=1))
