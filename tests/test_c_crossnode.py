"""Across nodes: a C subscriber (shimmy-c) on node B receives what a Python publisher on node A
publishes, through the daemons' mirror.  Two daemons, each in its own IPC and mount namespace
with a private /dev/shm, peered over 127.0.0.1 (the harness of test_peer_mirror.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from test_peer_mirror import HAVE_NS, cluster_nodes, free_port, wait_for, wait_line
from tests.c_client import ROOT, SHIMMY_C, needs_c, needs_v2, wait_file

pytestmark = [needs_c, needs_v2,
              pytest.mark.skipif(not HAVE_NS, reason="needs root, unshare and nsenter (a "
                                                     "private IPC namespace and /dev/shm)")]

N = 20_000
SIZE = 3000

PUBLISHER = textwrap.dedent("""
    import sys, shimmy
    from tests.c_client import payload, size_of
    sock, name, mode, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    ch = shimmy.Channel(name, daemon=sock, mode=mode, capacity=1 << 22)
    ch.publish(payload(0, size_of(0, %d)))     # announces the channel to the peers
    print("ready", flush=True)
    sys.stdin.readline()
    for i in range(1, n):
        ch.publish(payload(i, size_of(i, %d)))
    print("done", flush=True)
    sys.stdin.readline()
    ch.close()
""" % (SIZE, SIZE))


@pytest.fixture
def cluster():
    yield from cluster_nodes()


@pytest.mark.parametrize("mode", ["reliable", "lossy"])
def test_c_subscriber_on_another_node(cluster, tmp_path, mode):
    port = free_port()
    a = cluster.node("A", "--peer-listen", f"127.0.0.1:{port}")
    b = cluster.node("B", "--peer", f"127.0.0.1:{port}")
    wait_for("link A-B", lambda: a.peer()["links"] and b.peer()["links"])
    name = f"x/c/{mode}"
    pub = subprocess.Popen([*a.enter(), sys.executable, "-c", PUBLISHER, a.socket, name, mode,
                            str(N)], env={**os.environ, "PYTHONPATH": str(ROOT)},
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    sub = None
    try:
        wait_line(pub, "ready")
        wait_for("B to learn the published name", lambda: [
            c for c in b.request("list").get("remote", [])
            if c["name"] == name and c.get("published")])
        ready = tmp_path / "ready"
        sub = subprocess.Popen([*b.enter(), str(SHIMMY_C), "sub", "--daemon", b.socket,
                                "--count", str(N - 1), "--size", str(SIZE), "--mixed",
                                "--ready", str(ready), name],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_file(ready, sub)
        pub.stdin.write("go\n")
        pub.stdin.flush()
        out, err = sub.communicate(timeout=120)
        assert sub.returncode == 0, out + err
        lines = out.splitlines()
        if mode == "reliable":
            assert lines == [f"received {N - 1} in order from #1"], out
        else:   # received + lost = published, exactly, across the mirror too
            got = int(lines[0].split()[1])
            lost = int(lines[1].split()[1]) if len(lines) > 1 else 0
            assert lines[0].startswith(f"received {got} in order from #") and \
                got + lost == N - 1, out
        replicas = b.peer()["replicas"]
        assert any(r["from"] == "A" for r in replicas), replicas
        wait_line(pub, "done")
    finally:
        for p in (sub, pub):
            if p is not None and p.poll() is None:
                if p is pub:
                    p.stdin.write("bye\n")
                    p.stdin.flush()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
