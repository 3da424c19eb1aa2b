"""A replica recorded on another node: node A publishes, node B (its own IPC namespace and
/dev/shm, peered over 127.0.0.1) records its replica; the recording equals A's stream.  The
harness is test_peer_mirror.py's."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_peer_mirror import (HAVE_NS, cluster_nodes, free_port, make_payload,  # noqa: E402
                              wait_for, wait_line)
from test_record import read_track, track, wait_recorded  # noqa: E402


pytestmark = pytest.mark.skipif(not HAVE_NS, reason="needs root, unshare and nsenter "
                                                     "(a private IPC namespace and /dev/shm)")


@pytest.fixture
def cluster():
    yield from cluster_nodes()


@pytest.mark.timeout(180)
def test_a_replica_recorded_on_node_b_equals_the_source_stream(cluster):
    port = free_port()
    a = cluster.node("A", "--peer-listen", f"127.0.0.1:{port}")
    b = cluster.node("B", "--peer", f"127.0.0.1:{port}")
    wait_for("link A-B", lambda: a.peer()["links"] and b.peer()["links"])
    n = 20_000
    name = "x/rec"
    # A 256 KiB ring: the stream wraps it dozens of times; reliable back-pressure crosses nodes.
    pub = cluster.client(a, "pub", a.socket, name, "reliable", str(n), "0", str(1 << 18), "1",
                         "0")
    wait_line(pub, "ready")            # published b"announce" (seq 0)
    wait_for("B knows the channel", lambda: any(
        r["name"] == name for r in b.request("list").get("remote", [])))
    with tempfile.TemporaryDirectory(prefix="shimmy-rec-") as root:
        rec = subprocess.Popen([*b.enter(), sys.executable, "-m", "shimmy.cli", "record", name,
                                "--dir", root, "--daemon", b.socket],
                               stderr=subprocess.PIPE, text=True)
        try:
            wait_recorded(root, name, 0)      # the recorder holds its slot in B's replica
            wait_for("A mirrors the channel to B", lambda: any(
                c["name"] == name and c.get("mirrors") for c in a.request("list")["channels"]))
            pub.stdin.write("go\n")
            pub.stdin.flush()
            wait_line(pub, "done", timeout=120)
            summary = wait_recorded(root, name, n + 1, timeout=120)
        finally:
            rec.terminate()
            _, err = rec.communicate(timeout=20)
        pub.stdin.write("bye\n")
        pub.stdin.flush()
        pub.wait(20)
        assert rec.returncode == 0, err
        rng = random.Random(1234)            # the publisher's payloads, in its order
        want = [b"announce"] + [make_payload(i, rng) for i in range(n)]
        # The replica starts at the source's tail when it is made (docs/peering.md): after the
        # announcement, or at it; from there on the recording is the source's stream.
        msgs = read_track(track(root, name))
        assert all(lost == 0 for _, _, lost in msgs)
        got = [(seq, data) for seq, data, _ in msgs]
        first = got[0][0]
        assert first in (0, 1)
        assert [s for s, _ in got] == list(range(first, n + 1))
        assert [d for _, d in got] == want[first:]
        assert summary["lost"] == 0 and summary["messages"] == n + 1 - first
