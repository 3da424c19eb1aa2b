"""Across nodes, a reliable publisher waits for room mostly for its remote replica's credits: the
source daemon posts the ring's room semaphore when a credit reaches what the publisher waits
for (spec/ring.md, "Waiting for room").  Two daemons, each in its own IPC and mount namespace
with a private /dev/shm, peered over 127.0.0.1 (the harness of test_peer_mirror.py).

The publisher makes 1 MiB messages in place (``Channel.loan``) in bursts of four rings, with its
bounded sleep stretched to seconds: the bursts finish in time only when the credits' posts wake
it.  Its CPU time per MiB, with the room semaphore and with the polling it replaces (alternated
in one process), is printed as a measurement (``pytest -s``), not asserted: on a shared machine
a CPU ratio is not a test that cannot flake.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from test_peer_mirror import HAVE_NS, cluster_nodes, free_port, wait_for, wait_line

pytestmark = pytest.mark.skipif(not HAVE_NS, reason="needs root, unshare and nsenter (a "
                                                     "private IPC namespace and /dev/shm)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 1 << 20
CAP = 4 << 20
BURST = 4 * CAP // SIZE      # messages per burst: four rings
ROUNDS = 2                   # bursts per way (room semaphore, polling), alternated

PUBLISHER = textwrap.dedent("""
    import json, resource, struct, sys, time, shimmy
    from shimmy import ring
    sock, name, size, cap, burst, rounds = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
    ch = shimmy.Channel(name, daemon=sock, mode="reliable", capacity=cap, publish_timeout=120)
    writer = ch._become_publisher()
    room = writer._room_name
    with ch.loan(size) as buf:      # announces the channel to the peers
        struct.pack_into("<Q", buf, 0, 0)
    print("ready", room is not None, flush=True)
    sys.stdin.readline()
    q, i, out = ch._view.q, 1, []
    for r in range(2 * rounds):
        way = "room" if r % 2 == 0 else "poll"
        # room: a post must end each wait (a missed one costs 5 s); poll: as before the room
        # semaphore (every 20-50 us for 10 ms, then every 1 ms)
        writer._room_name, writer._room = (room, None) if way == "room" else (None, None)
        writer._backoff_max = 5.0 if way == "room" else 0.001
        # (polling sleeps time.sleep, never the room semaphore: timeouts count the room way's)
        waits = q[ring.W_WAITS]
        ru = resource.getrusage(resource.RUSAGE_SELF)
        t0, c0 = time.monotonic(), ru.ru_utime + ru.ru_stime
        for _ in range(burst):
            with ch.loan(size) as buf:
                struct.pack_into("<Q", buf, 0, i)
            i += 1
        ru = resource.getrusage(resource.RUSAGE_SELF)
        out.append({"way": way, "seconds": time.monotonic() - t0,
                    "cpu_us_per_mib": (ru.ru_utime + ru.ru_stime - c0) * 1e6 * (1 << 20) /
                                      (burst * size),
                    "waits": q[ring.W_WAITS] - waits, "room_wait": q[ring.W_ROOM_WAIT],
                    "timeouts": writer.room_timeouts})
    print(json.dumps(out), flush=True)
    sys.stdin.readline()
    ch.close()
""")

SUBSCRIBER = textwrap.dedent("""
    import struct, sys, time, shimmy
    sock, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ch = shimmy.Channel(name, daemon=sock)
    sub = ch.subscribe("oldest")
    while sub.status != "up":   # the mirror streams: the source holds the ring for it
        time.sleep(0.01)
    print("ready", flush=True)
    expect, bad, seen = None, 0, []   # the announcement (0) may precede the replica's start
    while expect != n:
        try:
            msg = sub.receive(timeout=60)
        except shimmy.ReceiveTimeout:
            break
        got = struct.unpack_from("<Q", msg.data)[0]
        seen.append((got, len(msg.data)))
        if expect is None and got <= 1:
            expect = got
        if got != expect or len(msg.data) != %d:
            bad += 1
        expect = got + 1
    print("got to", expect - 1, "bad", bad, flush=True)
    if bad:
        print("first received:", seen[:4], file=sys.stderr)
    ch.close()
""" % SIZE)


@pytest.fixture
def cluster():
    yield from cluster_nodes()


def test_credits_wake_the_remote_publisher(cluster):
    port = free_port()
    a = cluster.node("A", "--peer-listen", f"127.0.0.1:{port}")
    b = cluster.node("B", "--peer", f"127.0.0.1:{port}")
    wait_for("link A-B", lambda: a.peer()["links"] and b.peer()["links"])
    name = "x/room"
    env = {**os.environ, "PYTHONPATH": ROOT}
    n = 1 + 2 * ROUNDS * BURST
    pub = subprocess.Popen([*a.enter(), sys.executable, "-c", PUBLISHER, a.socket, name,
                            str(SIZE), str(CAP), str(BURST), str(ROUNDS)], env=env,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    sub = None
    try:
        assert wait_line(pub, "ready").split() == ["ready", "True"]
        wait_for("B to learn the published name", lambda: [
            c for c in b.request("list").get("remote", [])
            if c["name"] == name and c.get("published")])
        sub = subprocess.Popen([*b.enter(), sys.executable, "-c", SUBSCRIBER, b.socket, name,
                                str(n)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        wait_line(sub, "ready")
        pub.stdin.write("go\n")
        pub.stdin.flush()
        out, err = sub.communicate(timeout=180)
        assert sub.returncode == 0 and out.strip() == f"got to {n - 1} bad 0", out + err
        runs = json.loads(wait_line(pub, "[", timeout=60))
        for run in runs:
            assert run["room_wait"] == 0, run
            assert run["waits"] > 0, f"the publisher never waited for room: {run}"
        # Every wait ended by a credit's post, none by the bound (the credit path fences: it
        # never misses; the bound would have cost 5 s each).
        assert runs[-1]["timeouts"] == 0, runs
        med = {way: sorted(r["cpu_us_per_mib"] for r in runs if r["way"] == way)
               for way in ("room", "poll")}
        print(f"\npublisher CPU per MiB while a remote replica paces it (1 MiB loans): room "
              f"semaphore {[round(x) for x in med['room']]} us, polling "
              f"{[round(x) for x in med['poll']]} us; runs: {runs}")
        pub.stdin.write("bye\n")
        pub.stdin.flush()
        pub.wait(30)
    finally:
        for p in (pub, sub):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(5)
