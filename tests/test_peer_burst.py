"""The order table of docs/peering.md with bursts many times a ring's capacity: real daemons, each
in its own IPC and mount namespace with a private /dev/shm, peered over 127.0.0.1; real client
processes.  Every message is numbered and checksummed, sizes mixed up to 60 KB.

Reliable: the remote subscriber receives every message from the first, in order (the publishing
node holds its ring for the subscriber's node from the first message until that node's mirror
asks; docs/peering.md, "Interest").  Lossy: never waits, and received + ``lost`` = published.
The harness (nodes, proxy) is the one of test_peer_mirror.py.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import time
import zlib

import pytest

from test_peer_mirror import HAVE_NS, Proxy, cluster_nodes, free_port, wait_for, wait_line

pytestmark = pytest.mark.skipif(not HAVE_NS, reason="needs root, unshare and nsenter "
                                                     "(a private IPC namespace and /dev/shm)")

CAP = 256 << 10          # the ring
N = 400                  # messages per burst: about 7 MB, some 26 times the ring
SIZES = (0, 100, 1000, 8000, 30000, 60000)


# -- client processes (run inside a node's namespaces) ---------------------------------------------
def payload(i: int, rng: random.Random) -> bytes:
    head = struct.pack("<Q", i) + rng.randbytes(rng.choice(SIZES))
    return head + struct.pack("<I", zlib.crc32(head))


def number(data: bytes) -> int:
    if len(data) < 12 or zlib.crc32(data[:-4]) != struct.unpack("<I", data[-4:])[0]:
        raise AssertionError(f"checksum mismatch in a message of {len(data)} bytes")
    return struct.unpack("<Q", data[:8])[0]


def worker_pub(sock: str, name: str, mode: str, n: int, group: int) -> None:
    """Open ``name`` (silent: the publisher role comes with the first message), say "ready",
    publish ``n`` numbered messages as fast as the ring allows on "go"."""
    import shimmy
    ch = shimmy.Channel(name, daemon=sock, mode=mode, capacity=CAP, publish_timeout=60,
                        **({"max_publishers": group} if group > 1 else {}))
    print("ready", flush=True)
    sys.stdin.readline()
    rng = random.Random(7)
    for i in range(n):
        ch.publish(payload(i, rng))
    print("done", flush=True)
    sys.stdin.readline()
    ch.close()


def worker_sub(sock: str, name: str, mode: str, n: int, group: int) -> None:
    """Subscribe (``oldest``) before anything is published; receive until message ``n - 1`` or
    5 s of silence; report what arrived and the loss counted."""
    import shimmy
    import shimmy.sdk.channel
    ch = shimmy.Channel(name, daemon=sock, mode=mode, capacity=CAP,
                        **({"max_publishers": group} if group > 1 else {}))
    sub = ch.subscribe("oldest")
    print("ready", sub.status, flush=True)
    got = lost = 0
    first = last = None
    errors: list[str] = []
    silent = 0.0
    while last != n - 1 and silent < 5.0:
        try:
            msg = sub.receive(timeout=0.2)
        except TimeoutError:
            silent += 0.2
            continue
        silent = 0.0
        lost += msg.lost   # counted from the subscription's start: the first message's too
        try:
            i = number(bytes(msg))
        except shimmy.MessageOverwritten:   # lossy: lapped while we copied it
            lost += 1
            last = (last if last is not None else -1) + 1 + msg.lost
            continue
        if first is None:
            first = i
        expect = (last if last is not None else -1) + 1 + msg.lost
        if i != expect and len(errors) < 5:
            errors.append(f"message {i} where {expect} was due (lost={msg.lost})")
        last = i
        got += 1
    print(json.dumps({"got": got, "lost": lost, "first": first, "last": last,
                      "errors": errors, "status": sub.status}), flush=True)


# -- harness ---------------------------------------------------------------------------------------
@pytest.fixture
def cluster():
    procs: list[subprocess.Popen] = []
    for c in cluster_nodes():
        def client(node, *args: str) -> subprocess.Popen:
            p = subprocess.Popen([*node.enter(), sys.executable, os.path.abspath(__file__),
                                  *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
            procs.append(p)
            return p
        c.burst = client
        yield c
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)


def publisher(c, node, name, mode, group=1):
    p = c.burst(node, "pub", node.socket, name, mode, str(N), str(group))
    wait_line(p, "ready")
    return p


def subscriber(c, node, name, mode, group=1):
    s = c.burst(node, "sub", node.socket, name, mode, str(N), str(group))
    status = wait_line(s, "ready").split()[1]
    return s, status


def burst(p, s) -> dict:
    p.stdin.write("go\n")
    p.stdin.flush()
    r = json.loads(wait_line(s, "{", timeout=120))
    wait_line(p, "done", timeout=60)
    p.stdin.write("bye\n")
    p.stdin.flush()
    p.wait(20)
    return r


def check(r: dict, mode: str) -> None:
    assert not r["errors"], r
    assert r["last"] == N - 1, r
    if mode == "reliable":
        assert r["first"] == 0 and r["got"] == N and r["lost"] == 0, r
    else:
        assert r["got"] + r["lost"] == N, r


def knows_subscriber(node, name: str, other: str) -> None:
    """Wait until ``node`` has heard of a subscriber of ``name`` on node ``other`` (``ls``:
    ``subscribed_on``): the order "B subscribes, then A publishes" across two nodes."""
    def heard():
        reply = node.request("list")
        entries = [c for c in reply["channels"] + reply.get("remote", []) if c["name"] == name]
        return entries and other in entries[0].get("subscribed_on", [])
    wait_for(f"node {node.name} to hear of {other}'s subscriber of {name}", heard)


def pair(c, *a_args, b_args=()):
    port = free_port()
    a = c.node("A", "--peer-listen", f"127.0.0.1:{port}", *a_args)
    b = c.node("B", "--peer", f"127.0.0.1:{port}", *b_args)
    wait_for("link A-B", lambda: a.peer()["links"] and b.peer()["links"])
    return a, b


# -- the rows --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["reliable", "lossy"])
def test_burst_subscriber_first(cluster, mode):
    """Row 1: B's subscriber waits on a name nobody publishes; then A's publisher opens it and
    publishes a burst of 26 rings at once."""
    a, b = pair(cluster)
    s, status = subscriber(cluster, b, "burst/first", mode)
    assert status == "local"
    knows_subscriber(a, "burst/first", "B")
    p = publisher(cluster, a, "burst/first", mode)
    check(burst(p, s), mode)


@pytest.mark.parametrize("mode", ["reliable", "lossy"])
def test_burst_publisher_attached_but_silent(cluster, mode):
    """Row 2: A's publisher opens the name and stays silent; B's subscriber opens and
    subscribes; then the burst."""
    a, b = pair(cluster)
    p = publisher(cluster, a, "burst/silent", mode)
    wait_for("B to learn the name", lambda: [
        c for c in b.request("list")["remote"] if c["name"] == "burst/silent"])
    s, _ = subscriber(cluster, b, "burst/silent", mode)
    knows_subscriber(a, "burst/silent", "B")
    check(burst(p, s), mode)


@pytest.mark.parametrize("mode", ["reliable", "lossy"])
def test_burst_link_after_both(cluster, mode):
    """Row 4 (attached before the link): B's subscriber and A's silent publisher both wait
    while their daemons have no link; the link comes up; then the burst."""
    port, gate = free_port(), free_port()
    a = cluster.node("A", "--peer-listen", f"127.0.0.1:{port}")
    b = cluster.node("B", "--peer", f"127.0.0.1:{gate}")   # nothing listens there yet
    s, status = subscriber(cluster, b, "burst/late", mode)
    assert status == "local"
    p = publisher(cluster, a, "burst/late", mode)
    assert not b.peer()["links"]
    proxy = Proxy(port, gate)   # the link comes up now
    try:
        knows_subscriber(a, "burst/late", "B")
        check(burst(p, s), mode)
    finally:
        proxy.close()


@pytest.mark.parametrize("mode", ["reliable", "lossy"])
def test_burst_publisher_first(cluster, mode):
    """Row 3: A publishes first (a burst nobody reads: A's ring wraps many times); B's
    subscriber attaches (a replica positioned at A's tail); once A has heard of it, a second
    publisher's burst reaches B whole, whether B's mirror is up yet or not."""
    a, b = pair(cluster)
    name = "burst/pubfirst"
    p = publisher(cluster, a, name, mode)
    p.stdin.write("go\n")
    p.stdin.flush()
    wait_line(p, "done", timeout=60)
    p.stdin.write("bye\n")
    p.stdin.flush()
    p.wait(20)
    p = publisher(cluster, a, name, mode)
    s, _ = subscriber(cluster, b, name, mode)
    knows_subscriber(a, name, "B")
    check(burst(p, s), mode)


@pytest.mark.parametrize("mode", ["reliable", "lossy"])
def test_burst_publisher_group(cluster, mode):
    """A publisher group: B's subscriber waits on the group's name; A's publisher joins the
    group (a new member ring) and bursts."""
    a, b = pair(cluster)
    s, _ = subscriber(cluster, b, "burst/group", mode, group=4)
    knows_subscriber(a, "burst/group", "B")
    p = publisher(cluster, a, "burst/group", mode, group=4)
    check(burst(p, s), mode)


def test_burst_interest_gone_releases_hold(cluster):
    """A peer whose subscriber left before its mirror asked holds nothing: A's publisher bursts
    at once (no wait for peer_hold), and A holds no slot for B."""
    a, b = pair(cluster, *cluster.config("A", peer_hold=60.0))
    s, _ = subscriber(cluster, b, "burst/gone", "reliable")
    knows_subscriber(a, "burst/gone", "B")
    s.kill()
    s.wait(5)
    def forgotten():
        reply = a.request("list")
        entries = [c for c in reply.get("remote", []) if c["name"] == "burst/gone"]
        return not entries or "B" not in entries[0]["subscribed_on"]
    wait_for("A to hear that B's subscriber left", forgotten)
    p = publisher(cluster, a, "burst/gone", "reliable")
    local = cluster.burst(a, "sub", a.socket, "burst/gone", "reliable", str(N), "1")
    wait_line(local, "ready")
    t0 = time.monotonic()
    check(burst(p, local), "reliable")
    assert time.monotonic() - t0 < 30, "the publisher waited for a peer that left"
    assert not [h for h in a.peer()["held"] if h["name"] == "burst/gone"]


def test_burst_group_open_without_subscriber_is_not_held(cluster):
    """A node that has a publisher group's name open but no subscriber is not interest: it never
    asks for the new member ring's mirror, so A's publisher must not wait for it (it used to be
    held for every peer with the group open, and waited peer_hold once its ring was full)."""
    a, b = pair(cluster, *cluster.config("A", peer_hold=60.0))
    opened = cluster.burst(b, "open", b.socket, "burst/idle", "reliable", "0", "4")
    wait_line(opened, "ready")
    wait_for("A to learn that B has the group open", lambda: [
        c for c in a.request("list")["remote"] if c["name"] == "burst/idle"])
    local, _ = subscriber(cluster, a, "burst/idle", "reliable", group=4)
    p = publisher(cluster, a, "burst/idle", "reliable", group=4)
    t0 = time.monotonic()
    check(burst(p, local), "reliable")
    assert time.monotonic() - t0 < 30, "the publisher waited for a peer without a subscriber"
    assert not a.peer()["held"], a.peer()["held"]


def worker_open(sock: str, name: str, mode: str, n: int, group: int) -> None:
    """Open ``name`` and keep it open (no subscriber, no publisher) until stdin closes."""
    import shimmy
    ch = shimmy.Channel(name, daemon=sock, mode=mode, capacity=CAP,
                        **({"max_publishers": group} if group > 1 else {}))
    print("ready", flush=True)
    sys.stdin.readline()
    ch.close()


if __name__ == "__main__":
    role, args = sys.argv[1], sys.argv[2:]
    fn = {"pub": worker_pub, "sub": worker_sub, "open": worker_open}[role]
    fn(args[0], args[1], args[2], int(args[3]), int(args[4]))
