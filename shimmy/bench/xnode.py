"""The measurements behind ``shimmy bench --only crossnode`` (shimmy/bench/crossnode.py): two
daemons peered on loopback against a raw TCP stream and ZeroMQ tcp carrying the same messages,
one way and round trip.  Also runs on its own:

    python -m shimmy.bench.xnode 65536 1048576

Each side runs in its own process (publisher/sender, subscriber/receiver); the two daemons are
real ``shimmy daemon`` subprocesses with their own sockets (distinct shm prefixes), peered over
127.0.0.1.  Every receiver times its steady state: the clock starts after the first tenth of the
messages (``warm_up``), so a fresh connection's slow start and socket-buffer autotuning (the raw
TCP and ZeroMQ rows open one per measurement; the daemons' link is already up) count for no one.
The receiver also reads the CPU time of every process of its path from /proc (``thread_cpu_ns``:
publisher, both daemons and subscriber; raw TCP's and ZeroMQ's two ends) just before the sender
starts and after the last message, and the sender stays up until then, so each process's
whole share of the transfer is counted, whichever end ran ahead (a ZeroMQ sender queues its
messages long before they cross).

Placement: each simulated node runs on a CPU of its own (``NODE_CPUS``, set by the suite from
the bench's two-sided placement): node A's daemon, publisher (or pinger) and the raw TCP and
ZeroMQ senders on CPU A, node B's on CPU B, as two machines would run them.  Unpinned, the
scheduler may put both nodes' processes on one CPU, where a message never crosses CPUs (and the
other CPU halts between round trips): on this 2-vCPU VM that made the 64 B round trip of every
system bimodal by run, ZeroMQ PAIR 21 or 80 µs by where its four threads landed
(docs/performance.md, "The relay hops in C").

The publisher's ways to send (``how``): ``copy`` (``publish`` of one bytes object, as raw TCP
and ZeroMQ send one buffer over and over), ``loan`` (``Channel.loan``: the message is made in
place in the ring; the publisher stamps its number in the first 8 bytes and leaves the rest as
the ring holds it, the loan counterpart of sending the same buffer again, so that no row pays
for making its payload), ``batch`` (``publish_many`` / ``receive_many``).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

from . import harness, report

MIB = 1 << 20

# The CPUs of node A and node B (None: unpinned, where the machine has one CPU).
NODE_CPUS: tuple[int | None, int | None] = (None, None)


def _on_node(node: int) -> None:
    """Pin this process (and the threads it starts afterwards) to node ``node``'s CPU."""
    harness.pin(NODE_CPUS[node])


class _OnNode:
    """This process on node ``node``'s CPU for the block (the side of a round trip that the
    calling process plays), its affinity restored after."""

    def __init__(self, node: int):
        self.node = node
        self.saved: set[int] | None = None

    def __enter__(self) -> None:
        if NODE_CPUS[self.node] is not None:
            self.saved = os.sched_getaffinity(0)
            _on_node(self.node)

    def __exit__(self, *exc) -> None:
        if self.saved is not None:
            os.sched_setaffinity(0, self.saved)


def _pin_process(pid: int, cpu: int | None) -> None:
    """Pin every thread process ``pid`` has now to ``cpu`` (the ones it starts later inherit it
    from the thread that starts them)."""
    if cpu is None:
        return
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), {cpu})
        except OSError:   # the thread ended meanwhile
            pass

# Each receiver uses its library's idiomatic call for the size, the rule the ZeroMQ sender below
# uses too (``copy=size < 4096``): below this size a copy into a new bytes object is cheaper than
# a zero-copy wrapper (shimmy ``receive_bytes``; ZeroMQ frames are zero-copy throughout), from it
# on the zero-copy call (shimmy ``receive``: a view into the ring, no copy).
ZERO_COPY_FROM = 4096

# The loan rows' publisher stamps each message's number here (its first 8 bytes); the
# subscriber checks it in the view, in order.
STAMP = struct.Struct("<Q")

# The roles of a one-way path's processes, in the order tables list them: raw TCP and ZeroMQ
# have a sender and a receiver, shimmy a publisher (sender), two daemons and a subscriber.
ROLES = ("sender", "daemon_a", "daemon_b", "receiver")

HOWS = ("copy", "loan", "batch")


class OneWay(NamedTuple):
    """One measurement: the seconds ``count`` messages take at the steady rate, and the CPU
    time each process of the path spent on the whole transfer, in µs per MiB of payload."""
    seconds: float
    cpu_us_per_mib: dict[str, float]


def _count_for(size: int, budget_bytes: int = 256 << 20, cap: int = 200_000) -> int:
    return max(200, min(cap, budget_bytes // max(size, 1)))


def warm_up(count: int) -> int:
    """Messages a receiver takes before it starts its clock."""
    return count // 10


def _steady(count: int, seconds: float, timed: int) -> float:
    """Seconds for ``count`` messages at the rate of ``timed`` messages in ``seconds``."""
    return seconds * count / timed


_SCHEDSTAT = os.path.exists("/proc/self/schedstat")
_TICK_NS = 1e9 / os.sysconf("SC_CLK_TCK")


def thread_cpu_ns(pid: int) -> dict[int, int]:
    """CPU time (user + system) that each live thread of process ``pid`` has used so far, in
    ns, by thread id, from /proc: the first field of ``/proc/<pid>/task/<tid>/schedstat`` (the
    scheduler's run time, which is utime + stime at ns resolution; ``/proc/<pid>/stat`` counts
    the same time in clock ticks of 10 ms, a few percent of a quarter-second transfer), or
    ``stat``'s utime + stime for the whole process (as thread 0) where the kernel has no
    schedstat."""
    if not _SCHEDSTAT:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return {0: int((int(fields[11]) + int(fields[12])) * _TICK_NS)}
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                out[int(tid)] = int(fh.read().split(None, 1)[0])
        except (FileNotFoundError, ProcessLookupError):   # the thread ended meanwhile
            pass
    return out


class CpuWindow:
    """The CPU time of a path's processes (``roles``: role -> pid) between ``start`` (the
    receiver calls it before it lets the sender go) and ``per_mib`` (after the last message).
    Counted thread by thread over the threads alive at the end: a daemon's thread that ends
    meanwhile (the mirror of the previous measurement's channel, winding down) takes its whole
    life's time with it, which a per-process sum would subtract from this window."""

    def __init__(self, roles: dict[str, int]):
        self.roles = roles
        self.t0: dict[str, dict[int, int]] = {}

    def start(self) -> None:
        self.t0 = {r: thread_cpu_ns(pid) for r, pid in self.roles.items()}

    def per_mib(self, nbytes: int) -> dict[str, float]:
        mib = max(nbytes, 1) / MIB
        out = {}
        for r, pid in self.roles.items():
            before = self.t0[r]
            ns = sum(t - before.get(tid, 0) for tid, t in thread_cpu_ns(pid).items())
            out[r] = ns / 1e3 / mib
        return out


def _recv_exact(s, view):
    got = 0
    while got < len(view):
        k = s.recv_into(view[got:])
        if not k:
            raise EOFError
        got += k


def _raw_rx(port_q, res_q, roles_q, go, done, size, count):
    _on_node(1)
    ls = socket.create_server(("127.0.0.1", 0))
    port_q.put(ls.getsockname()[1])
    c, _ = ls.accept()
    cpu = CpuWindow({**roles_q.get(timeout=30), "receiver": os.getpid()})
    cpu.start()
    go.set()
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
    _report(res_q, done, _steady(count, time.perf_counter() - t0, count - 1 - warm), cpu,
            count * size)


def _report(res_q, done, seconds: float, cpu: CpuWindow, nbytes: int) -> None:
    """The receiver's result; then the sender may go (it waited, its threads still counted)."""
    res_q.put(OneWay(seconds, cpu.per_mib(nbytes)))
    done.set()


def _raw_tx(port, go, done, size, count):
    _on_node(0)
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload = os.urandom(size)
    hdr = struct.pack("<I", size)
    go.wait(30)
    for _ in range(count):
        s.sendmsg([hdr, payload])
    done.wait(300)
    s.close()


def _one_way(rx_target, rx_args, tx_target, tx_args) -> OneWay:
    """Receiver first (it reports its port), then the sender; what the receiver measured."""
    port_q: mp.Queue = mp.Queue()
    res_q: mp.Queue = mp.Queue()
    roles_q: mp.Queue = mp.Queue()
    go, done = mp.Event(), mp.Event()
    rx = mp.Process(target=rx_target, args=(port_q, res_q, roles_q, go, done, *rx_args))
    rx.start()
    tx = None
    try:
        tx = mp.Process(target=tx_target, args=(port_q.get(timeout=30), go, done, *tx_args))
        tx.start()
        roles_q.put({"sender": tx.pid})
        return res_q.get(timeout=300)
    finally:
        _reap(tx, rx)


def raw_tcp(size: int, count: int) -> OneWay:
    return _one_way(_raw_rx, (size, count), _raw_tx, (size, count))


def _zmq_rx(port_q, res_q, roles_q, go, done, size, count):
    import zmq
    _on_node(1)
    ctx = zmq.Context()
    s = ctx.socket(zmq.PULL)
    port_q.put(s.bind_to_random_port("tcp://127.0.0.1"))
    cpu = CpuWindow({**roles_q.get(timeout=30), "receiver": os.getpid()})
    cpu.start()
    go.set()
    warm = warm_up(count)
    for _ in range(warm + 1):
        s.recv(copy=False)
    t0 = time.perf_counter()
    timed = count - 1 - warm
    for _ in range(timed):
        s.recv(copy=False)
    _report(res_q, done, _steady(count, time.perf_counter() - t0, timed), cpu, count * size)
    s.close()
    ctx.term()


def _zmq_tx(port, go, done, size, count):
    import zmq
    _on_node(0)
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.SNDHWM, 100_000)
    s.connect(f"tcp://127.0.0.1:{port}")
    payload = os.urandom(size)
    go.wait(30)
    for _ in range(count):
        s.send(payload, copy=size < ZERO_COPY_FROM)
    done.wait(300)
    s.close(linger=-1)
    ctx.term()


def zmq_tcp(size: int, count: int) -> OneWay:
    return _one_way(_zmq_rx, (size, count), _zmq_tx, (size, count))


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


def _shimmy_rx(sock, name, ready_q, res_q, done, roles, count, how, size):
    import shimmy
    _on_node(1)
    _wait_published(sock, name)
    ch = shimmy.Channel(name, daemon=sock)
    sub = ch.subscribe()
    while sub.status != "up":
        time.sleep(0.01)
    cpu = CpuWindow({**roles, "receiver": os.getpid()})
    cpu.start()
    ready_q.put(1)
    warm = warm_up(count)
    if len(sub.receive(timeout=30).data) == 1:
        # The publisher's announcement (``_shimmy_tx``), when the replica was positioned
        # before it: not one of the ``count``.
        sub.receive(timeout=30)
    for _ in range(warm):
        sub.receive(timeout=30)
    t0 = time.perf_counter()
    timed = count - 1 - warm
    if how == "batch":
        got, most = 0, 4 * report.XN_BATCH
        while got < timed:
            got += len(sub.receive_many(min(most, timed - got), timeout=30))
    elif how == "loan":   # the zero-copy view; the stamp read from it says the order held
        unpack = STAMP.unpack_from
        for i in range(warm + 1, count):
            got_n = unpack(sub.receive(timeout=30).data)[0]
            if got_n != i:
                res_q.put(f"loan row: message {i} carries the stamp {got_n}")
                done.set()
                return
    elif size < ZERO_COPY_FROM:   # small: the copy path, a bytes object per message
        for _ in range(timed):
            sub.receive_bytes(timeout=30)
    else:   # large: the zero-copy path (a view into the ring), as the ZeroMQ receiver's frames
        for _ in range(timed):
            sub.receive(timeout=30)
    _report(res_q, done, _steady(count, time.perf_counter() - t0, timed), cpu, count * size)


def _shimmy_tx(sock, name, ready_q, go_q, done, size, count, capacity, how):
    import shimmy
    _on_node(0)
    ch = shimmy.Channel(name, daemon=sock, mode="reliable", capacity=capacity,
                        publish_timeout=60)
    ch.publish(b"x")
    ready_q.put(1)
    go_q.get()
    if how == "loan":   # made in place: the stamp is all this publisher writes
        loan, stamp = ch.loan, STAMP.pack_into
        for i in range(count):
            with loan(size) as buf:
                stamp(buf, 0, i)
    elif how == "batch":
        msgs = [os.urandom(size)] * report.XN_BATCH
        for _ in range(count // len(msgs)):
            ch.publish_many(msgs)
        ch.publish_many(msgs[:count % len(msgs)])
    else:
        payload = os.urandom(size)
        for _ in range(count):
            ch.publish(payload)
    done.wait(300)


class TwoDaemons:
    """Two peered daemons on loopback (no namespaces needed: distinct sockets, shm prefixes)."""

    def __init__(self, transport: str = "tcp"):
        from shimmy.daemon.peer.auth import random_key_file
        self.transport = transport   # the mirrors' data path: tcp, or rdma where a device exists
        self.dir = tempfile.mkdtemp(prefix="shimmy-xbench-")
        key = os.path.join(self.dir, "key")
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
        for proc, cpu in zip(self.procs, NODE_CPUS, strict=True):   # each on its node's CPU
            _pin_process(proc.pid, cpu)

    def close(self):
        for p in self.procs:
            p.terminate()
            p.wait(10)


def cross_node(size: int, count: int, daemons: TwoDaemons | None = None,
               how: str = "copy") -> OneWay:
    """``count`` messages of ``size`` bytes, publisher on A to subscriber on B, sent the way
    ``how`` says (``copy``: one ``publish`` per message; ``loan``: made in place with
    ``Channel.loan``, received as the view; ``batch``: ``publish_many`` / ``receive_many`` of
    ``report.XN_BATCH`` messages a call)."""
    if how not in HOWS:
        raise ValueError(f"how must be one of {HOWS}, got {how!r}")
    if how == "loan" and size < STAMP.size:
        raise ValueError(f"loan rows stamp {STAMP.size} bytes; size {size} is smaller")
    own = daemons is None
    d = daemons or TwoDaemons()
    name = f"xbench/{size}/{time.monotonic_ns()}"
    capacity = 1 << max(22, (size * 8 - 1).bit_length())
    tx = rx = None
    try:
        ready_q: mp.Queue = mp.Queue()
        go_q: mp.Queue = mp.Queue()
        res_q: mp.Queue = mp.Queue()
        done = mp.Event()
        tx = mp.Process(target=_shimmy_tx, args=(d.a, name, ready_q, go_q, done, size, count,
                                                 capacity, how))
        tx.start()
        ready_q.get(timeout=30)
        roles = {"sender": tx.pid, "daemon_a": d.procs[0].pid, "daemon_b": d.procs[1].pid}
        rx = mp.Process(target=_shimmy_rx, args=(d.b, name, ready_q, res_q, done, roles, count,
                                                 how, size))
        rx.start()
        ready_q.get(timeout=30)
        go_q.put(1)
        res = res_q.get(timeout=300)
        done.set()
        if isinstance(res, str):
            raise RuntimeError(res)
        return res
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
    given ``res_q`` pings and measures (node A); the other echoes (node B)."""
    import shimmy
    _on_node(0 if res_q is not None else 1)
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
    _on_node(1)
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
    with _OnNode(0):
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
    _on_node(1)
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
    with _OnNode(0):   # (ZeroMQ's I/O thread, started with the socket, inherits the CPU)
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
    """{size: {row: {"msgs_per_s", "mb_per_s", "count", "cpu_us_per_mib"}}}, medians of
    ``repeat`` measurements, the rows alternating within each repetition."""
    mp.set_start_method("fork", force=True)
    d = TwoDaemons()
    out: dict = {}
    try:
        for size in sizes:
            count = _count_for(size)
            rows = {"shimmy copy": lambda s=size, n=count: cross_node(s, n, d),
                    "raw_tcp": lambda s=size, n=count: raw_tcp(s, n),
                    "zmq": lambda s=size, n=count: zmq_tcp(s, n)}
            if size >= STAMP.size:
                rows["shimmy loan"] = lambda s=size, n=count: cross_node(s, n, d, "loan")
            runs: dict[str, list[OneWay]] = {label: [] for label in rows}
            for _ in range(repeat):
                for label, fn in rows.items():
                    runs[label].append(fn())
            out[size] = {}
            for label, got in runs.items():
                dt = statistics.median(r.seconds for r in got)
                out[size][label] = {
                    "msgs_per_s": round(count / dt), "mb_per_s": round(count * size / dt / 1e6, 1),
                    "count": count, "cpu_us_per_mib": {
                        k: round(statistics.median(r.cpu_us_per_mib[k] for r in got), 1)
                        for k in got[0].cpu_us_per_mib}}
    finally:
        d.close()
    return out


if __name__ == "__main__":
    import json
    sizes = tuple(int(x) for x in sys.argv[1:]) or (64, 65536, 1 << 20)
    print(json.dumps(compare(sizes), indent=1))
