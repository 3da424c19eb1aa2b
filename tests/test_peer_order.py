"""The start-order table of docs/peering.md, one test per row: real daemons, each in its own IPC
and mount namespace with a private /dev/shm, peered over 127.0.0.1; real client processes.

Every row asserts what each party sees: the messages (checksummed, in order, loss counted
exactly), the subscriber's ``status`` along the way, and the daemons' books (links, replicas,
conflicts).  The harness (nodes, workers, proxy) is the one of test_peer_mirror.py.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from test_peer_mirror import (CARRY, HAVE_NS, Proxy, check, cluster_nodes, free_port, wait_for,
                              wait_line)

pytestmark = pytest.mark.skipif(not HAVE_NS, reason="needs root, unshare and nsenter "
                                                     "(a private IPC namespace and /dev/shm)")

@pytest.fixture
def cluster():
    yield from cluster_nodes()


CAP = 4 << 20   # holds every message of these streams: nothing is lapped before a mirror starts


def pub(c, node, name, mode, n, pace=0.0, announce=1, links=0, capacity=CAP):
    return c.client(node, "pub", node.socket, name, mode, str(n), str(pace), str(capacity),
                    str(announce), str(links))


def sub(c, node, name, n, idle=15.0, wait_known=1, mode=""):
    return c.client(node, "sub", node.socket, name, str(n), str(idle), str(wait_known), mode)


def go(p):
    p.stdin.write("go\n")
    p.stdin.flush()


def finish(p):
    wait_line(p, "done", timeout=120)
    p.stdin.write("bye\n")
    p.stdin.flush()
    p.wait(20)


def result(p, timeout=120):
    return json.loads(wait_line(p, "{", timeout=timeout))


def pair(c):
    port = free_port()
    a = c.node("A", "--peer-listen", f"127.0.0.1:{port}")
    b = c.node("B", "--peer", f"127.0.0.1:{port}")
    wait_for("link A-B", lambda: a.peer()["links"] and b.peer()["links"])
    return a, b


@pytest.mark.parametrize("mode", ["reliable", "lossy"])
def test_subscriber_first(cluster, mode):
    """Row 1: B's subscriber opens a name no node knows (a local channel, status 'local'); A's
    publisher appears later: B's channel becomes A's replica and the subscriber receives every
    message from the first, without reopening."""
    a, b = pair(cluster)
    n = 3000
    s_b = sub(cluster, b, "o/first", n, wait_known=0, mode=mode)
    assert wait_line(s_b, "ready").split()[1] == "local"
    s_a = sub(cluster, a, "o/first", n, wait_known=0, mode=mode)
    wait_line(s_a, "ready")
    p = pub(cluster, a, "o/first", mode, n, announce=0)
    wait_line(p, "ready")
    go(p)
    r_b, r_a = result(s_b), result(s_a)
    finish(p)
    for r in (r_a, r_b):
        check(r, n, reliable=True)   # nothing lapped: the ring holds the whole stream
    assert r_b["statuses"][0] == "local" and r_b["statuses"][-1] == "up", r_b
    assert b.peer()["counters"]["replicas_converted"] == 1
    assert b.peer()["replicas"][0]["from"] == "A"


def test_publisher_attached_but_silent(cluster):
    """Row 2: A's publisher opens the channel but publishes nothing; the name is known on B at
    once (``ls`` of B lists it, not published); B's subscriber opens it, then A publishes."""
    a, b = pair(cluster)
    n = 2000
    p = pub(cluster, a, "o/silent", "reliable", n, announce=0)
    wait_line(p, "ready")

    def listed():
        return [c for c in b.request("list")["remote"] if c["name"] == "o/silent"]
    (entry,) = wait_for("B to learn the open name", listed)
    assert entry["published"] is False and entry["open_on"] == ["A"], entry
    s_b = sub(cluster, b, "o/silent", n, wait_known=0)
    wait_line(s_b, "ready")
    go(p)
    r = result(s_b)
    finish(p)
    check(r, n, reliable=True)
    assert r["statuses"][-1] == "up"


def test_publisher_first(cluster):
    """Row 3: A publishes before B's subscriber exists: B creates a replica positioned at A's
    tail; the subscriber gets every message published after it subscribed ("next")."""
    a, b = pair(cluster)
    n = 2000
    p = pub(cluster, a, "o/pubfirst", "reliable", n)
    wait_line(p, "ready")
    s_b = sub(cluster, b, "o/pubfirst", n)
    assert wait_line(s_b, "ready").split()[1] == "up"
    go(p)
    r = result(s_b)
    finish(p)
    check(r, n, reliable=True)


def test_link_after_both(cluster):
    """Row 4: publisher on A publishes its whole stream and B's subscriber waits, before the
    link between A and B exists; when the link comes up, B's channel becomes the replica and
    the subscriber receives everything A's ring still holds (here: all of it)."""
    port, gate = free_port(), free_port()
    a = cluster.node("A", "--peer-listen", f"127.0.0.1:{port}")
    b = cluster.node("B", "--peer", f"127.0.0.1:{gate}")   # nothing listens there yet
    n = 2000
    s_b = sub(cluster, b, "o/late", n, idle=30, wait_known=0)
    wait_line(s_b, "ready")
    p = pub(cluster, a, "o/late", "reliable", n)
    wait_line(p, "ready")
    go(p)
    wait_line(p, "done", timeout=60)
    assert not b.peer()["links"]
    proxy = Proxy(port, gate)   # the link comes up now
    try:
        r = result(s_b)
        check(r, n, reliable=True)
        assert r["statuses"][0] == "local" and r["statuses"][-1] == "up", r
    finally:
        proxy.close()
    p.stdin.write("bye\n")
    p.stdin.flush()
    p.wait(20)


def test_both_sides_dial_one_link(cluster):
    """Row 5: A and B each list the other as ``--peer``: exactly one link stays (the one dialed
    by the node whose name sorts first), it does not flap, and messages flow."""
    pa, pb = free_port(), free_port()
    a = cluster.node("A", "--peer-listen", f"127.0.0.1:{pa}", "--peer", f"127.0.0.1:{pb}")
    b = cluster.node("B", "--peer-listen", f"127.0.0.1:{pb}", "--peer", f"127.0.0.1:{pa}")
    wait_for("link A-B", lambda: a.peer()["links"] and b.peer()["links"])
    time.sleep(3.0)   # longer than peer_backoff_max: a flapping pair would redial by now
    la, lb = a.peer()["links"], b.peer()["links"]
    assert len(la) == 1 and len(lb) == 1, (la, lb)
    assert la[0]["dialed"] and not lb[0]["dialed"], (la, lb)   # A < B: A's dial is kept
    assert la[0]["up_s"] >= 2.5, la   # the same link all along
    n = 2000
    p = pub(cluster, a, "o/mutual", "reliable", n)
    wait_line(p, "ready")
    s_b = sub(cluster, b, "o/mutual", n)
    wait_line(s_b, "ready")
    go(p)
    check(result(s_b), n, reliable=True)
    finish(p)


def test_second_publisher_elsewhere_is_busy(cluster):
    """Row 6: A publishes; a publisher on B gets PublisherBusy naming node A."""
    a, b = pair(cluster)
    p = pub(cluster, a, "o/busy", "reliable", 10)
    wait_line(p, "ready")
    wait_for("B to learn the publisher",
             lambda: [c for c in b.request("list")["remote"] if c.get("published")])
    out = subprocess.run(
        [*b.enter(), sys.executable, "-c",
         "import shimmy, sys\n"
         "ch = shimmy.Channel('o/busy', daemon=sys.argv[1])\n"
         "try:\n    ch.publish(b'x')\nexcept shimmy.ShimmyError as e:\n"
         "    print(type(e).__name__, e)\n", b.socket],
        capture_output=True, text=True, timeout=30)
    # (the SDK maps the daemon's publisher_busy code to ShimmyError, as for two local publishers)
    assert "is published on node 'A'" in out.stdout, out
    go(p)
    finish(p)


def test_two_publishers_before_the_link_is_a_reported_conflict(cluster):
    """Row 6b: A and B each publish the name while their link is down; when it comes up,
    neither stream is silently merged or dropped: both daemons report the conflict (``ls``,
    ``stat``, the log) and both keep their own publisher."""
    port, gate = free_port(), free_port()
    a = cluster.node("A", "--peer-listen", f"127.0.0.1:{port}")
    b = cluster.node("B", "--peer", f"127.0.0.1:{gate}")
    p_a = pub(cluster, a, "o/twice", "reliable", 10)
    p_b = pub(cluster, b, "o/twice", "reliable", 10)
    wait_line(p_a, "ready")
    wait_line(p_b, "ready")
    proxy = Proxy(port, gate)
    try:
        for node, other in ((a, "B"), (b, "A")):
            (ch,) = wait_for(f"conflict on {node.name}", lambda n=node: [
                c for c in n.request("list")["channels"]
                if c["name"] == "o/twice" and "conflict" in c])
            assert f"node {other!r}" in ch["conflict"], ch
            assert ch["publisher"] is not None and "replica" not in ch, ch
            assert "peer conflict" in node.log()
    finally:
        proxy.close()
    for p in (p_a, p_b):
        go(p)
        finish(p)


def test_mode_conflict_is_reported(cluster):
    """Row 7: B's subscriber waits on a lossy channel; A publishes the name as reliable: B's
    channel is not split silently: the subscriber's status is 'conflict', ``ls`` and the log
    say why."""
    a, b = pair(cluster)
    s_b = cluster.client(b, "sub_mode", b.socket, "o/clash", "lossy")
    wait_line(s_b, "ready")
    p = pub(cluster, a, "o/clash", "reliable", 10)
    wait_line(p, "ready")
    assert wait_line(s_b, "status").split()[1] == "conflict"
    (ch,) = [c for c in b.request("list")["channels"] if c["name"] == "o/clash"]
    assert "mode='reliable'" in ch["conflict"] and "node 'A'" in ch["conflict"], ch
    assert "peer conflict" in b.log()
    out = subprocess.run([sys.executable, "-m", "shimmy.cli", "ls", "--daemon", b.socket],
                         capture_output=True, text=True, timeout=20).stdout
    assert "conflict" in out, out
    go(p)
    finish(p)


@pytest.mark.parametrize("mode", ["reliable", "lossy"])
def test_source_daemon_restart_keeps_subscription(cluster, mode):
    """Row 8 (and the integrity run of issue 9): 50,000 checksummed messages; A's daemon is
    restarted (SIGTERM, start) mid-stream.  B's subscriber keeps its Subscription: status goes
    'down' then 'up'; reliable: every message arrives once, in order, none lost; lossy: every
    gap equals Message.lost exactly.  A's publisher reopens after the restart and publishes the
    index that failed again."""
    a, b = pair(cluster)
    n = 50_000
    p = pub(cluster, a, "o/restart", mode, n, pace=0.004, links=1, capacity=1 << 20)
    wait_line(p, "ready")
    s_b = sub(cluster, b, "o/restart", n, idle=30)
    wait_line(s_b, "ready")
    go(p)
    time.sleep(1.0)
    a.stop(signal.SIGTERM)
    time.sleep(0.3)
    a.start()
    r = result(s_b, timeout=180)
    finish(p)
    check(r, n, reliable=mode == "reliable")
    assert r["last"] == n - 1, r
    assert "down" in r["statuses"] and r["statuses"][-1] == "up", r
    assert b.peer()["counters"]["replica_resets"] == 0
    assert a.peer()["counters"]["streams_continued"] == 1


@pytest.mark.parametrize("mode", ["reliable", "lossy"])
def test_source_daemon_restart_publisher_reopens_first(cluster, mode):
    """Row 8b: as row 8, but A's publisher reopens (and publishes) before B's link to the
    restarted A is back (the link goes through a proxy held closed meanwhile): A's new ring
    starts a new stream at position 0; B's replica continues it above its own tail, renumbering
    its messages after its own.  S keeps its Subscription: every message once and in order
    (reliable; the graceful restart delivered everything the old ring held), exact ``lost``
    (lossy)."""
    port, gate = free_port(), free_port()
    a = cluster.node("A", "--peer-listen", f"127.0.0.1:{port}")
    proxy = Proxy(port, gate)
    b = cluster.node("B", "--peer", f"127.0.0.1:{gate}")
    wait_for("link", lambda: b.peer()["links"])
    n = 20_000
    # 16 MiB: A's new ring holds everything published while B is away (reliable: nothing may
    # be lost; a wrapped ring would be a counted gap, as for any late mirror)
    # pace: >= 4 s of stream, so the restart (at 1 s) and the outage land mid-stream
    p = pub(cluster, a, "o/restart2", mode, n, pace=0.02, links=-1, capacity=16 << 20)
    wait_line(p, "ready")
    s_b = sub(cluster, b, "o/restart2", n, idle=30)
    wait_line(s_b, "ready")
    go(p)
    time.sleep(1.0)
    a.stop(signal.SIGTERM)   # drains its mirror through the proxy
    proxy.close()            # B cannot reach A again until the proxy reopens
    a.start()
    try:
        wait_for("A's publisher back", lambda: [c for c in a.request("list")["channels"]
                                                if c["name"] == "o/restart2" and c["tail"] > 0])
    except AssertionError:
        dump = subprocess.run([".venv/bin/py-spy", "dump", "-p", str(p.pid)], capture_output=True,
                              text=True).stdout
        p.kill()
        raise AssertionError("publisher: " + p.stderr.read()[-2000:] + dump) from None
    time.sleep(0.5)
    proxy = Proxy(port, gate)
    try:
        r = result(s_b, timeout=180)
        finish(p)
    finally:
        proxy.close()
    check(r, n, reliable=mode == "reliable")
    assert r["last"] == n - 1, r
    assert "down" in r["statuses"] and r["statuses"][-1] == "up", r
    (replica,) = b.peer()["replicas"]
    assert replica["rebases"] == 1 and b.peer()["counters"]["replica_resets"] == 0, replica


@pytest.mark.parametrize("mode", ["reliable", "lossy"])
def test_source_daemon_sigkill_exact(cluster, mode):
    """Row 8c (issue 9, exact loss after a SIGKILL of the source daemon): 50,000 checksummed
    messages; A's daemon is SIGKILLed mid-stream (no drain: what A's ring held but had not
    mirrored is only in the publisher's old mapping) and started again.  A's publisher keeps
    publishing into its old ring until the new daemon retires it, then ``Channel.reopen``
    carries the stream over.  B's subscriber keeps its Subscription (``down``, ``up``);
    reliable: every message once, in order, none lost (the ring holds all that was unmirrored);
    lossy: received + lost == published, every gap equal to ``Message.lost``."""
    a, b = pair(cluster)
    n = 50_000
    p = pub(cluster, a, "o/kill", mode, n, pace=0.004, links=CARRY, capacity=1 << 20)
    wait_line(p, "ready")
    s_b = sub(cluster, b, "o/kill", n, idle=30)
    wait_line(s_b, "ready")
    go(p)
    time.sleep(1.0)
    a.stop(signal.SIGKILL)
    a.start()
    r = result(s_b, timeout=180)
    done = wait_line(p, "done", timeout=120)
    p.stdin.write("bye\n")
    p.stdin.flush()
    p.wait(20)
    check(r, n, reliable=mode == "reliable")
    assert r["last"] == n - 1, r
    # (the outage can be shorter than the subscriber's 0.2 s polls of ``status``: the replica's
    # reconnect count is the proof that the link went down)
    assert r["statuses"][-1] == "up", r
    (replica,) = b.peer()["replicas"]
    assert replica["reconnects"] >= 1, replica
    assert int(done.split()[1]) >= 1, done   # the publisher did reopen
    assert b.peer()["counters"]["replica_resets"] == 0
    counters = a.peer()["counters"]
    assert counters["streams_carried"] + counters["streams_continued"] >= 1, counters


@pytest.mark.parametrize("kill", ["SIGTERM", "SIGKILL"])
def test_unfed_replica_survives_source_restart(cluster, kill):
    """Row 8d: B's replica was made (B's subscriber is ``up``) but never received a message
    when A's daemon restarts; it survives like a fed one: the subscriber keeps its
    Subscription and receives every message A's publisher publishes afterwards, and B's
    replica is never retired."""
    a, b = pair(cluster)
    n = 3000
    p = pub(cluster, a, "o/unfed", "reliable", n, links=CARRY)
    wait_line(p, "ready")
    s_b = sub(cluster, b, "o/unfed", n, idle=30)
    assert wait_line(s_b, "ready").split()[1] == "up"
    a.stop(getattr(signal, kill))
    a.start()
    wait_for("B's link to A back", lambda: a.peer()["links"] and b.peer()["links"])
    go(p)
    r = result(s_b)
    finish(p)
    check(r, n, reliable=True)
    assert r["statuses"][-1] == "up", r
    assert b.peer()["counters"]["replica_resets"] == 0


@pytest.mark.parametrize("given", [None, 8 << 20])
def test_open_before_publish_adopts_capacity(cluster, given):
    """Row 2b: A's publisher opens a channel with a capacity other than the default and stays
    silent; B's subscriber opens the name without a capacity (or with the same one): B's
    channel gets A's capacity, so it becomes A's replica when A publishes (no conflict) and
    the subscriber receives every message."""
    a, b = pair(cluster)
    n = 2000
    p = pub(cluster, a, "o/cap", "reliable", n, announce=0, capacity=8 << 20)
    wait_line(p, "ready")
    wait_for("B to learn the open name",
             lambda: [c for c in b.request("list")["remote"] if c["name"] == "o/cap"])
    s_b = cluster.client(b, "sub", b.socket, "o/cap", str(n), "15", "0", "", str(given or 0))
    wait_line(s_b, "ready")
    (ch,) = [c for c in b.request("list")["channels"] if c["name"] == "o/cap"]
    assert ch["capacity"] == 8 << 20 and "conflict" not in ch, ch
    go(p)
    r = result(s_b)
    finish(p)
    check(r, n, reliable=True)
    assert r["statuses"][-1] == "up", r
    assert b.peer()["counters"]["replicas_converted"] == 1 and not b.peer()["conflicts"]


def test_replica_node_restart(cluster):
    """Row 9: B's daemon restarts (its subscribers go with it: a restart is a clean slate on
    that node); a new subscriber on B gets a fresh replica and the stream from then on."""
    a, b = pair(cluster)
    n = 20_000
    # pace: >= 4 s of stream, so B's restart and the new subscriber land mid-stream
    p = pub(cluster, a, "o/rrestart", "reliable", n, pace=0.02)
    wait_line(p, "ready")
    go(p)
    time.sleep(0.5)
    b.stop(signal.SIGKILL)
    b.start()
    s_b = sub(cluster, b, "o/rrestart", n)
    wait_line(s_b, "ready")
    r = result(s_b)
    finish(p)
    check(r, n, reliable=True, allow_start_after=True)
    assert r["got"] > 0


@pytest.mark.parametrize("mode", ["reliable", "lossy"])
def test_replica_node_sigkill_subscriber_continues(cluster, mode):
    """Row 9b: B's daemon is SIGKILLed mid-stream and started again.  B's subscriber gets
    ChannelClosed (its daemon restarted), calls ``Channel.reopen()`` once B knows the channel
    again and keeps its Subscription: what was published while B was away is missing, and the
    first message after the reopen counts exactly that in ``Message.lost`` (the replica's
    numbers are A's).  A's publisher is undisturbed."""
    a, b = pair(cluster)
    n = 20_000
    p = pub(cluster, a, "o/rkill", mode, n, pace=0.02)
    wait_line(p, "ready")
    s_b = cluster.client(b, "sub", b.socket, "o/rkill", str(n), "30", "1", "", "0", "1")
    wait_line(s_b, "ready")
    go(p)
    time.sleep(1.0)
    b.stop(signal.SIGKILL)
    b.start()
    r = result(s_b, timeout=180)
    finish(p)
    check(r, n, reliable=False)   # every gap equals lost
    assert r["first"] == 0 and r["last"] == n - 1 and r["reopens"] == 1, r
    assert r["lost"] > 0, r       # B was away for a while: a clean slate on B, counted


def test_forgotten_peer(cluster):
    """Row 10: a node that leaves for good is forgotten after peer_forget_after: its name leaves
    ``ls`` on the others, and their replicas of its channels become local channels (a new
    publisher on B may then take the name)."""
    port = free_port()
    a = cluster.node("A", "--peer-listen", f"127.0.0.1:{port}")
    b = cluster.node("B", "--peer", f"127.0.0.1:{port}",
                     *cluster.config("B", peer_forget_after=2.0))
    wait_for("link", lambda: b.peer()["links"])
    p = pub(cluster, a, "o/gone", "reliable", 10)
    wait_line(p, "ready")
    s_b = sub(cluster, b, "o/gone", 10)
    wait_line(s_b, "ready")
    go(p)
    assert result(s_b)["got"] == 10
    finish(p)
    a.close()
    wait_for("B to forget A", lambda: b.peer()["counters"]["nodes_forgotten"] == 1, timeout=20)
    assert b.peer()["directory"]["nodes"] == []
    out = subprocess.run(
        [*b.enter(), sys.executable, "-c",
         "import shimmy, sys\nch = shimmy.Channel('o/gone', daemon=sys.argv[1])\n"
         "print(ch.publish(b'mine now'))\n", b.socket],
        capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "11", out
