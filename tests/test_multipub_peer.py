"""Publisher groups and peering: a multi-publisher channel is node-local (spec/ring.md,
"Publisher groups"); a single-publisher channel of the same name on another node never turns it
into a replica, and opening a group under a name another node publishes is refused, naming the
node.  Real daemons, each in its own IPC and mount namespace, over 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from test_peer_mirror import HAVE_NS, cluster_nodes, free_port, wait_for, wait_line
from test_peer_order import finish, go, pair, pub

pytestmark = pytest.mark.skipif(not HAVE_NS, reason="needs root, unshare and nsenter "
                                                     "(a private IPC namespace and /dev/shm)")

GROUP_CLIENT = """
import shimmy, sys
try:
    pubs = [shimmy.Channel('o/grp', daemon=sys.argv[1], max_publishers=2) for _ in range(2)]
except shimmy.ShimmyError as exc:
    print('refused', type(exc).__name__, exc, flush=True)
    sys.exit(0)
sub = pubs[0].subscribe()
print('ready', flush=True)
sys.stdin.readline()
for i in range(50):
    for k, ch in enumerate(pubs):
        ch.publish(b'%d:%d' % (k, i))
got = sorted(bytes(sub.receive(timeout=10)) for _ in range(100))
want = sorted(b'%d:%d' % (k, i) for k in range(2) for i in range(50))
print('ok' if got == want else 'bad', sub.status, flush=True)
"""


@pytest.fixture
def cluster():
    yield from cluster_nodes()


def group_client(node) -> subprocess.Popen:
    return subprocess.Popen([*node.enter(), sys.executable, "-c", GROUP_CLIENT, node.socket],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_group_under_a_name_published_elsewhere_is_refused(cluster):
    a, b = pair(cluster)
    p = pub(cluster, a, "o/grp", "reliable", 10)
    wait_line(p, "ready")
    wait_for("B to learn the publisher",
             lambda: [c for c in b.request("list")["remote"] if c.get("published")])
    out, err = group_client(b).communicate(timeout=60)
    assert out.startswith("refused ChannelConflict") and "node 'A'" in out, (out, err)
    assert "max_publishers" in out
    go(p)
    finish(p)


def test_group_stays_local_when_a_publisher_appears_elsewhere(cluster):
    a, b = pair(cluster)
    g = group_client(b)
    wait_line(g, "ready")
    p = pub(cluster, a, "o/grp", "reliable", 10)
    wait_line(p, "ready")
    (ch,) = wait_for("the conflict on B", lambda: [
        c for c in b.request("list")["channels"] if c["name"] == "o/grp" and "conflict" in c])
    assert "multi-publisher" in ch["conflict"] and "node 'A'" in ch["conflict"], ch
    assert "replica" not in ch and ch["max_publishers"] == 2, ch
    g.stdin.write("go\n")
    g.stdin.flush()
    out, err = g.communicate(timeout=60)
    assert out.split() == ["ok", "local"], (out, err)
    go(p)
    finish(p)


WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_multipub.py")


def worker(node, role: str, *args: str, pubs: int | None = 4) -> subprocess.Popen:
    """A publisher or subscriber process of channel "fan" on ``node`` (``pubs``: the
    max_publishers it opens with; None: it does not say)."""
    say = [] if pubs is None else ["--max-publishers", str(pubs)]
    return subprocess.Popen([*node.enter(), sys.executable, WORKER, role, "--daemon", node.socket,
                             "--channel", "fan", *say, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def outcome(p: subprocess.Popen, timeout: float = 120) -> dict:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, f"worker failed ({p.returncode}):\n{err[-3000:]}"
    return json.loads(out.strip().splitlines()[-1])


def test_fan_in_from_publishers_on_two_nodes_to_subscribers_on_a_third(cluster, tmp_path):
    """Two publishers on node A and two on node B publish 3000 checksummed messages each to one
    channel; two subscribers on node C get every message of every publisher, each publisher's
    in its order, and know which node sent it."""
    pa, pb = free_port(), free_port()
    a = cluster.node("A", "--peer-listen", f"127.0.0.1:{pa}")
    b = cluster.node("B", "--peer-listen", f"127.0.0.1:{pb}", "--peer", f"127.0.0.1:{pa}")
    c = cluster.node("C", "--peer", f"127.0.0.1:{pa}", "--peer", f"127.0.0.1:{pb}")
    wait_for("C linked to A and B", lambda: len(c.peer()["links"]) == 2)
    count = 3000
    want = ",".join(f"{t}:{count}" for t in range(4))
    ready = [str(tmp_path / f"sub{k}.ready") for k in range(2)]
    subs = [worker(c, "sub", "--want", want, "--ready", r, "--timeout", "90") for r in ready]
    for r in ready:
        wait_for(f"{r}", lambda r=r: os.path.exists(r))
    hold = str(tmp_path / "hold")
    pubs = [worker(node, "pub", "--tag", str(t), "--count", str(count), "--rate", "3000",
                   "--hold", hold) for t, node in enumerate((a, a, b, b))]
    try:
        outs = [outcome(s) for s in subs]
    finally:
        open(hold, "w").close()
    published = [outcome(p) for p in pubs]
    assert all(r["published"] == count for r in published)
    for out in outs:
        assert out["got"] == {str(t): count for t in range(4)}, out
        assert out["lost"] == {str(t): 0 for t in range(4)}
        assert out["first"] == {str(t): 0 for t in range(4)}
        assert out["nodes"] == {"0": "A", "1": "A", "2": "B", "3": "B"}
        assert len(set(out["pubs"].values())) == 4
    listed = [ch for ch in c.request("list")["channels"] if ch["name"] == "fan"]
    assert len(listed) == 1 and all(p["remote"] for p in listed[0]["publishers"])
    assert {p["node"] for p in listed[0]["publishers"]} <= {"A", "B"}

    def publishers(node):
        return [p for ch in node.request("list")["channels"] if ch["name"] == "fan"
                for p in ch["publishers"]]
    # Every publisher left: each node reclaims its members once their readers (the mirrors)
    # drained them, and C its replicas once they are no longer announced.
    for node in (a, b, c):
        wait_for(f"the members reclaimed on {node.name}", lambda n=node: not publishers(n))


def test_remote_publisher_killed_mid_stream(cluster, tmp_path):
    """A publisher on node A is SIGKILLed while it publishes: the subscriber on node C gets an
    unbroken run of its messages from the first (nothing torn, nothing out of order) and every
    message of the publishers that live on, on A and on B."""
    pa, pb = free_port(), free_port()
    a = cluster.node("A", "--peer-listen", f"127.0.0.1:{pa}")
    b = cluster.node("B", "--peer-listen", f"127.0.0.1:{pb}", "--peer", f"127.0.0.1:{pa}")
    c = cluster.node("C", "--peer", f"127.0.0.1:{pa}", "--peer", f"127.0.0.1:{pb}")
    wait_for("C linked to A and B", lambda: len(c.peer()["links"]) == 2)
    count = 2000
    ready = str(tmp_path / "sub.ready")
    sub = worker(c, "sub", "--want", f"0:{count},1:{count}", "--ready", ready, "--timeout", "90")
    wait_for("the subscriber", lambda: os.path.exists(ready))
    hold = str(tmp_path / "hold")
    steady = [worker(node, "pub", "--tag", str(t), "--count", str(count), "--rate", "2000",
                     "--hold", hold) for t, node in enumerate((a, b))]
    victim_ready = str(tmp_path / "victim.ready")
    victim = worker(a, "pub", "--tag", "7", "--count", "0", "--ready", victim_ready)
    wait_for("the victim publishing", lambda: os.path.exists(victim_ready))
    time.sleep(0.3)
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    try:
        out = outcome(sub)
    finally:
        open(hold, "w").close()
    assert all(outcome(p)["published"] == count for p in steady)
    assert out["got"]["0"] == out["got"]["1"] == count
    assert out["first"]["7"] == 0 and out["got"]["7"] == out["last"]["7"] + 1 > 0, out
    assert out["nodes"]["7"] == "A"


HOLDER = """
import os, sys, time, shimmy
ch = shimmy.Channel('fan', daemon=sys.argv[1], max_publishers=4)
print('open', flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.02)
ch.close()
"""


def test_subscriber_that_does_not_say_max_publishers_takes_the_peers_group(cluster, tmp_path):
    """Subscribers need not know how many publishers a channel has, or where: node A holds
    "fan" open as a group of 4 (nobody publishes yet); subscribers on node C open it without
    max_publishers and get a group too (the peers' announcement decides), then receive every
    message of publishers on A and B."""
    pa, pb = free_port(), free_port()
    a = cluster.node("A", "--peer-listen", f"127.0.0.1:{pa}")
    b = cluster.node("B", "--peer-listen", f"127.0.0.1:{pb}", "--peer", f"127.0.0.1:{pa}")
    c = cluster.node("C", "--peer", f"127.0.0.1:{pa}", "--peer", f"127.0.0.1:{pb}")
    wait_for("C linked to A and B", lambda: len(c.peer()["links"]) == 2)
    hold = str(tmp_path / "hold")
    holder = subprocess.Popen([*a.enter(), sys.executable, "-c", HOLDER, a.socket, hold],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        wait_for("C to learn of the group", lambda: any(
            e["name"] == "fan" for e in c.request("list")["remote"]))
        count = 2000
        ready = str(tmp_path / "sub.ready")
        sub = worker(c, "sub", "--want", f"0:{count},1:{count}", "--ready", ready,
                     "--timeout", "90", pubs=None)
        wait_for("the subscriber", lambda: os.path.exists(ready))
        listed = [ch for ch in c.request("list")["channels"] if ch["name"] == "fan"]
        assert len(listed) == 1 and listed[0]["max_publishers"] == 4, listed
        pubs = [worker(node, "pub", "--tag", str(t), "--count", str(count), "--rate", "3000",
                       "--hold", hold) for t, node in enumerate((a, b))]
        out = outcome(sub)
    finally:
        open(hold, "w").close()
        holder.wait(30)
    assert all(outcome(p)["published"] == count for p in pubs)
    assert out["got"] == {"0": count, "1": count} and out["first"] == {"0": 0, "1": 0}, out
    assert out["nodes"] == {"0": "A", "1": "B"}
