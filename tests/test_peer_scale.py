"""Bounded CI version of the peer scale run (tests/abuse/peer_scale.py): 5 daemons, each in its
own IPC and mount namespace, found through DNS discovery on loopback (a name that resolves to
127.0.0.11..15 in each node's /etc/hosts), one channel published on each.  Functional waits
with generous deadlines, not speed assertions: every node links every other (one link per
pair), and every channel is listed as published on every node within 60 s."""

from __future__ import annotations

import os
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "abuse"))

from test_peer_mirror import HAVE_NS  # noqa: E402

pytestmark = pytest.mark.skipif(not HAVE_NS, reason="needs root, unshare and nsenter")


def test_five_nodes_dns_full_mesh_every_channel_everywhere():
    import peer_scale as scale   # tests/abuse/peer_scale.py
    c = scale.Cluster(5, spare=0)
    try:
        for node in c.nodes:
            node.start()
        scale._wait("full mesh", lambda: all(scale._links(x) == 4 for x in c.nodes), 60)
        for node in c.nodes:
            scale._open(node, [f"ci/{node.name}"])
        want = {f"ci/{x.name}" for x in c.nodes}
        scale._wait("every channel on every node",
                    lambda: all(want <= scale._published(x) for x in c.nodes), 60)
        time.sleep(2.5)   # past peer_backoff_max: no extra links appear, none flap
        for node in c.nodes:
            links = node.peer()["links"]
            assert sorted(lk["node"] for lk in links) == sorted(
                x.name for x in c.nodes if x is not node), links
            assert all(lk["up_s"] >= 2.0 for lk in links), links
    finally:
        c.close()
