"""End to end over RDMA in the two-guest lab: a daemon in each guest, peered over the guest link,
the transport chosen automatically (``transport = "auto"``).  Guest A (LAB_ROLE=a) publishes,
guest B subscribes; both run this file and meet at named barriers in the shared run folder.

Messages carry their index and a CRC; sizes are random across the small-write threshold and the
ring's wrap point (the ring is small, so it wraps hundreds of times)."""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import time
import zlib
from collections import deque

import pytest

ROLE = os.environ.get("LAB_ROLE", "")
RUN = os.path.dirname(os.environ.get("LAB_OUT", "/nonexistent/x"))
PEER = os.environ.get("LAB_PEER", "")
A_IP = "198.18.0.1"
N = 20_000
CAPACITY = 1 << 16
SIZES = (0, 8, 60, 200, 400, 500, 600, 1000, 3000, 9000)   # threshold 512; ring 64 KiB
pytestmark = pytest.mark.skipif(ROLE not in ("a", "b"), reason="needs the two-guest lab "
                                "(tools/rdma-lab/run.sh sets LAB_ROLE)")


def barrier(name: str, timeout: float = 120.0) -> None:
    """Both guests reach ``name`` (marker files in the shared run folder).  A guest whose step
    failed leaves ``failed`` in its folder (lab_job.sh): the other stops waiting at once."""
    name = name.replace("/", "_")
    with open(os.path.join(RUN, ROLE, f"at-{name}"), "w") as fh:
        fh.write(str(time.time()))
    folder = os.path.join(RUN, "b" if ROLE == "a" else "a")
    other = os.path.join(folder, f"at-{name}")
    deadline = time.monotonic() + timeout
    while not os.path.exists(other):
        assert not os.path.exists(os.path.join(folder, "failed")), \
            f"the other guest failed before reaching {name!r}: its output says why"
        assert time.monotonic() < deadline, f"the other guest never reached {name!r}"
        time.sleep(0.05)


def payload(i: int, rng: random.Random) -> bytes:
    head = struct.pack("<Q", i) + rng.randbytes(rng.choice(SIZES))
    return head + struct.pack("<I", zlib.crc32(head))


def index_of(data: bytes) -> int:
    assert len(data) >= 12 and zlib.crc32(data[:-4]) == struct.unpack("<I", data[-4:])[0], \
        f"checksum mismatch in a message of {len(data)} bytes (starts {data[:24].hex()})"
    return struct.unpack("<Q", data[:8])[0]


class Daemon:
    def __init__(self, tag: str, env: dict | None = None, wrap: list[str] | None = None,
                 **settings):
        self.dir = os.path.join("/tmp", f"shimmy-{tag}")
        os.makedirs(self.dir, exist_ok=True)
        key = os.path.join(self.dir, "cluster.key")
        with open(key, "w") as fh:
            fh.write("lab-cluster-key-" + "k" * 32)
        os.chmod(key, 0o600)
        self.socket = os.path.join(self.dir, "d.sock")
        self.log_path = os.path.join(os.environ["LAB_OUT"], f"daemon-{tag}.log")
        conf = os.path.join(self.dir, "d.toml")
        settings = {"node": f"node-{ROLE}", "cluster_key_file": key, "log_level": "info",
                    **settings}
        with open(conf, "w") as fh:
            for k, v in settings.items():
                fh.write(f"{k} = {json.dumps(v)}\n")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*(wrap or []), sys.executable, "-m", "shimmy.cli", "daemon", "--socket",
                 self.socket, "--config", conf], stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 60
        while "daemon ready" not in self.log():
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.1)

    def log(self) -> str:
        with open(self.log_path) as fh:
            return fh.read()

    def stat(self) -> dict:
        from shimmy.sdk.client import get_client
        return get_client(self.socket).request("stat")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def node(tag: str, port: int, **kw) -> Daemon:
    if ROLE == "a":
        return Daemon(tag, peer_listen=f"{A_IP}:{port}", **kw)
    return Daemon(tag, peers=[f"{A_IP}:{port}"], **kw)


def publish(d: Daemon, name: str, mode: str, n: int, pace: float) -> None:
    import shimmy
    ch = shimmy.Channel(name, daemon=d.socket, mode=mode, capacity=CAPACITY,
                        publish_timeout=120)
    ch.publish(payload(2**63, random.Random(0)))   # announced once it has a publisher
    barrier(f"{name}-subscribed")
    rng = random.Random(7)
    for i in range(n):
        ch.publish(payload(i, rng))
        if i % 100 == 99:
            time.sleep(pace)          # some small batches too (sizes across the threshold)
    barrier(f"{name}-received", timeout=400)
    ch.close()


def subscribe(d: Daemon, name: str, n: int) -> dict:
    import shimmy
    import shimmy.sdk.channel
    from shimmy.sdk.client import get_client
    deadline = time.monotonic() + 60
    # published, not only opened: opening it here earlier would make a default-capacity local
    # channel that conflicts with the source's
    while not any(c["name"] == name and c.get("published")
                  for c in get_client(d.socket).request("list").get("remote", [])):
        assert time.monotonic() < deadline, f"{name} never announced as published by guest A"
        time.sleep(0.1)
    ch = shimmy.Channel(name, daemon=d.socket)
    sub = ch.subscribe()
    while sub.status == "down":
        assert time.monotonic() < deadline, "the mirror never came up"
        time.sleep(0.05)
    barrier(f"{name}-subscribed")
    got = lost = 0
    prev = None
    seq_off = None        # a message's seq minus its index: the same for every message
    errors: list[str] = []
    recent: deque = deque(maxlen=8)   # (pos, seq, lost, len, index) of the last messages
    try:
        while prev != n - 1:
            msg = sub.receive(timeout=120)
            recent.append((msg._pos, msg.seq, msg.lost, len(msg), None))
            try:
                data = bytes(msg)
            except shimmy.MessageOverwritten:     # lossy: lapped while copying
                lost += msg.lost + 1
                prev = (prev if prev is not None else -1) + 1 + msg.lost
                recent[-1] = (*recent[-1][:4], "overwritten")
                continue
            i = index_of(data)
            if i == 2**63:
                continue
            recent[-1] = (*recent[-1][:4], i)
            # exact loss accounting: the jump in index equals msg.lost (the subscription started
            # before message 0, so the first message's lost counts from index 0)
            if i != (prev if prev is not None else -1) + 1 + msg.lost:
                errors.append(f"index {i} after {prev} with lost={msg.lost} (seq {msg.seq} at "
                              f"position {msg._pos})")
            if seq_off is None:
                seq_off = msg.seq - i
            elif msg.seq - i != seq_off:
                errors.append(f"index {i} in the frame of seq {msg.seq} at position {msg._pos} "
                              f"(seq - index was {seq_off})")
            lost += msg.lost
            prev = i
            got += 1
    except Exception as exc:
        # Everything the failure needs, in the guest's output: where the stream stood, the
        # messages just before, the replica's counters, and the ring itself (LAB_OUT).
        dump = os.path.join(os.environ["LAB_OUT"], f"ring-{name.replace('/', '_')}.bin")
        with open(dump, "wb") as fh:
            fh.write(bytes(ch._view.mm))
        replica = next((r for r in d.stat()["peer"]["replicas"] if r["name"] == name), None)
        raise AssertionError(
            f"{type(exc).__name__}: {exc}\n  after index {prev}: got {got}, lost {lost}, "
            f"errors {errors[:5]}\n  last messages (pos, seq, lost, len, index): "
            f"{list(recent)}\n  replica: {replica}\n  ring: {dump}") from exc
    result = {"got": got, "lost": lost, "errors": errors[:5], "stat": d.stat()}
    barrier(f"{name}-received")
    ch.close()
    return result


def replica_transport(stat: dict, name: str) -> dict:
    return next(r for r in stat["peer"]["replicas"] if r["name"] == name)["transport"]


def run_pair(tag: str, port: int, mode: str, n: int, env_a: dict | None = None,
             wrap_b: list[str] | None = None):
    d = node(tag, port, env=env_a if ROLE == "a" else None,
             wrap=wrap_b if ROLE == "b" else None)
    try:
        if ROLE == "a":
            publish(d, f"lab/{tag}", mode, n, 0.02 if mode == "lossy" else 0.004)
            out = d.stat()
        else:
            out = subscribe(d, f"lab/{tag}", n)
        # Neither daemon stops (ending the link and its mirrors) before both took their stat.
        barrier(f"lab/{tag}-stat-taken")
        return d, out
    finally:
        d.stop()


def test_reliable_20000_messages_over_rdma():
    d, out = run_pair("reliable", 7701, "reliable", N)
    if ROLE == "b":
        assert out["errors"] == [] and out["lost"] == 0 and out["got"] == N, out
        t = replica_transport(out["stat"], "lab/reliable")
        assert t["kind"] == "rdma" and t["registration"] == "pinned", t
        assert out["stat"]["peer"]["counters"]["rdma_fallbacks"] == 0
    else:
        m = out["peer"]["mirrors"][0]
        assert m["transport"] == "rdma" and m["rdma"]["writes"] > 0, m
        assert m["rdma"]["small_writes"] > 0, m      # both paths ran
        print("source mirror:", json.dumps(m))


def test_lossy_20000_messages_exact_loss():
    d, out = run_pair("lossy", 7702, "lossy", N)
    if ROLE == "b":
        assert out["errors"] == [], out
        assert out["got"] + out["lost"] == N, out    # every index either received or counted
        assert out["got"] > 100, out                 # and enough arrived to check the order
        assert replica_transport(out["stat"], "lab/lossy")["kind"] == "rdma"
        print("lossy:", out["got"], "received,", out["lost"], "lost")
        r = next(r for r in out["stat"]["peer"]["replicas"] if r["name"] == "lab/lossy")
        print("replica:", {k: r.get(k) for k in ("batches", "gaps", "gap_bytes", "torn_padded")})
    else:
        m = out["peer"]["mirrors"][0]
        print("source mirror:", {k: m.get(k) for k in ("batches", "gaps", "gap_bytes", "torn")},
              m.get("rdma"))


def test_qp_error_mid_stream_recovers_without_loss():
    d, out = run_pair("qperr", 7703, "reliable", N, env_a={"SHIMMY_RDMA_FAULT_AFTER": "300"})
    if ROLE == "b":
        assert out["errors"] == [] and out["lost"] == 0 and out["got"] == N, out
        assert out["stat"]["peer"]["counters"]["rdma_failures"] >= 1
        assert "restarting the mirror over" in d.log()
    else:
        assert "moving the QP of mirror lab/qperr to the error state" in d.log()
        assert "tearing the mirror down" in d.log()


def test_memlock_too_small_falls_back_to_tcp():
    wrap = ["setpriv", "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock",
            "prlimit", "--memlock=65536:65536"]
    d, out = run_pair("memlock", 7704, "reliable", 2000, wrap_b=wrap)
    if ROLE == "b":
        assert out["errors"] == [] and out["lost"] == 0 and out["got"] == 2000, out
        t = replica_transport(out["stat"], "lab/memlock")
        assert t["kind"] == "tcp" and "RLIMIT_MEMLOCK=65536" in t["fallback"], t
        assert out["stat"]["peer"]["counters"]["rdma_fallbacks"] >= 1
        assert "RLIMIT_MEMLOCK" in d.log()


# -- the order table with bursts (docs/peering.md, "The order table"; "Interest") -----------------
# Both daemons forced to transport=rdma.  The subscriber on B waits (``oldest``) before anything
# is published; A's publisher bursts 26 rings' worth of mixed sizes up to 60 KB at once.
# Reliable: every message from the first; lossy: received + lost = published.
BURST_N = 400
BURST_CAP = 256 << 10
BURST_SIZES = (0, 100, 1000, 8000, 30000, 60000)


def _listed(d: Daemon, name: str, key: str, node: str = "") -> bool:
    from shimmy.sdk.client import get_client
    reply = get_client(d.socket).request("list")
    entries = [c for c in reply["channels"] + reply.get("remote", []) if c["name"] == name]
    return bool(entries) and (node in entries[0].get(key, []) if node else True)


def _wait(what: str, cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _burst_publish(d: Daemon, name: str, mode: str, silent_first: bool) -> None:
    import shimmy
    if not silent_first:
        barrier(f"{name}-subscribed")
    ch = shimmy.Channel(name, daemon=d.socket, mode=mode, capacity=BURST_CAP,
                        publish_timeout=120)
    if silent_first:
        barrier(f"{name}-opened")
        barrier(f"{name}-subscribed")
    _wait("node-a to hear of node-b's subscriber", lambda: _listed(d, name, "subscribed_on",
                                                                      "node-b"))
    rng = random.Random(7)
    for i in range(BURST_N):
        head = struct.pack("<Q", i) + rng.randbytes(rng.choice(BURST_SIZES))
        ch.publish(head + struct.pack("<I", zlib.crc32(head)))
    barrier(f"{name}-received", timeout=400)
    ch.close()


def _burst_subscribe(d: Daemon, name: str, mode: str, silent_first: bool) -> dict:
    import shimmy
    import shimmy.sdk.channel
    if silent_first:
        barrier(f"{name}-opened")
        _wait(f"{name} to be known here", lambda: _listed(d, name, "open_on"))
    ch = shimmy.Channel(name, daemon=d.socket, mode=mode, capacity=BURST_CAP)
    sub = ch.subscribe("oldest")
    barrier(f"{name}-subscribed")
    got = lost = 0
    first = prev = None
    errors: list[str] = []
    while prev != BURST_N - 1:
        try:
            msg = sub.receive(timeout=60)
        except TimeoutError:
            errors.append(f"nothing for 60 s after {prev}")
            break
        lost += msg.lost    # the subscription began before message 0: counted from there
        try:
            data = bytes(msg)
        except shimmy.MessageOverwritten:
            lost += 1
            prev = (prev if prev is not None else -1) + 1 + msg.lost
            continue
        i = index_of(data)
        first = i if first is None else first
        if i != (prev if prev is not None else -1) + 1 + msg.lost:
            errors.append(f"index {i} after {prev} with lost={msg.lost}")
        prev = i
        got += 1
    result = {"got": got, "lost": lost, "first": first, "last": prev, "errors": errors[:5],
              "stat": d.stat()}
    barrier(f"{name}-received")
    ch.close()
    return result


@pytest.mark.parametrize("order, mode", [("subscriber-first", "reliable"),
                                         ("subscriber-first", "lossy"),
                                         ("silent-publisher", "reliable"),
                                         ("silent-publisher", "lossy")])
def test_burst_order_over_rdma(order, mode):
    tag = f"burst-{order}-{mode}"
    name = f"lab/{tag}"
    silent = order == "silent-publisher"
    port = 7710 + 2 * (order == "silent-publisher") + (mode == "lossy")
    # (lease_timeout: a guest starved of CPU by a loaded host must not evict the subscriber
    # mid-burst; these rows test the order of things, not leases)
    d = node(tag, port, transport="rdma", lease_timeout=120.0, session_timeout=240.0)
    try:
        if ROLE == "a":
            _burst_publish(d, name, mode, silent)
        else:
            out = _burst_subscribe(d, name, mode, silent)
        barrier(f"{name}-stat-taken")
    finally:
        d.stop()
    if ROLE == "b":
        assert out["errors"] == [] and out["last"] == BURST_N - 1, {
            k: v for k, v in out.items() if k != "stat"}
        if mode == "reliable":
            assert out["first"] == 0 and out["got"] == BURST_N and out["lost"] == 0, out
        else:
            assert out["got"] + out["lost"] == BURST_N, out
        assert replica_transport(out["stat"], name)["kind"] == "rdma"
