"""Peer and mirror metrics: two real daemons peered over 127.0.0.1, a publisher process on node
A, a subscriber process on node B; both daemons' /metrics scraped while the mirror carries the
messages."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

pytest.importorskip("prometheus_client")

from test_metrics import WAIT_FOR, _metrics_daemon, _wait, scrape, value  # noqa: E402
from workers import until  # noqa: E402

PEER_WORKER = r"""
import os, sys, time
import shimmy
from shimmy.sdk.client import get_client
role, sock, name, count, work = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
""" + WAIT_FOR + r"""
if role == "pub":
    ch = shimmy.Channel(name, daemon=sock, mode="reliable", capacity=1 << 20)
    ch.publish(b"announce")   # announced to peers once it has a publisher
    wait_for(os.path.join(work, "go"))
    for _ in range(count):
        ch.publish(b"m" * 1000, timeout=60)
    wait_for(os.path.join(work, "exit"))
    ch.close()
else:
    end = time.monotonic() + 60
    # published, not only opened (a name is announced at open): opening it here earlier would
    # make a default-capacity local channel that conflicts with the source's
    while not any(c["name"] == name and c.get("published")
                  for c in get_client(sock).request("list").get("remote", [])):
        if time.monotonic() > end:
            raise SystemExit(f"{name} never announced as published to node B")
        time.sleep(0.02)
    ch = shimmy.Channel(name, daemon=sock)
    sub = ch.subscribe()
    while sub.status != "up":
        if time.monotonic() > end:
            raise SystemExit("mirror never came up")
        time.sleep(0.01)
    open(os.path.join(work, "sub.ready"), "w").close()
    got = 0
    while got < count:
        if len(sub.receive_bytes(timeout=30)) == 1000:
            got += 1
    open(os.path.join(work, "sub.done"), "w").close()
    wait_for(os.path.join(work, "exit"))
    sub.close()
    ch.close()
"""


def test_peer_and_mirror_metrics_follow_a_mirrored_channel(daemon_factory, tmp_path):
    from shimmy.daemon.peer.auth import random_key_file
    key = tmp_path / "cluster.key"
    random_key_file(str(key))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, url_a = _metrics_daemon(daemon_factory, tmp_path / "a", node="node-a",
                               peer_listen=f"127.0.0.1:{port}", cluster_key_file=str(key))
    b, url_b = _metrics_daemon(daemon_factory, tmp_path / "b", node="node-b",
                               peers=[f"127.0.0.1:{port}"], cluster_key_file=str(key))
    linked = until(lambda: (lambda s: s if value(s, "shimmy_peer_links") == 1 else None)(
        scrape(url_b)), 30.0, "node B linked to node A")
    assert value(linked, "shimmy_peer_transport_info", transport="auto",
                 rdma="unavailable") == 1 or value(linked, "shimmy_peer_transport_info",
                                                   transport="auto", rdma="available") == 1

    name, count, frame = "xm/mirrored", 500, 1024     # 1000 B + 16 B header, 16-aligned
    work = tmp_path / "work"
    work.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", PEER_WORKER, "pub", a.socket, name,
                               str(count), str(work)])]
    try:
        procs.append(subprocess.Popen([sys.executable, "-c", PEER_WORKER, "sub", b.socket, name,
                                       str(count), str(work)]))
        _wait(work / "sub.ready", procs[1])
        before_a = scrape(url_a)
        sent_before = value(before_a, "shimmy_peer_bytes_sent_total", peer="node-b") or 0
        (work / "go").touch()
        _wait(work / "sub.done", procs[1])

        sa, sb = scrape(url_a), scrape(url_b)
        src = dict(channel=name, peer="node-b", role="source")
        rep = dict(channel=name, peer="node-a", role="replica")
        assert value(sa, "shimmy_mirror_bytes_total", **src) >= count * frame
        assert value(sa, "shimmy_mirror_batches_total", **src) >= 1
        assert value(sb, "shimmy_mirror_bytes_total", **rep) >= count * frame
        assert value(sb, "shimmy_mirror_batches_total", **rep) >= 1
        assert value(sb, "shimmy_mirror_gaps_total", **rep) == 0
        assert value(sb, "shimmy_mirror_reconnects_total", channel=name, peer="node-a") == 0
        assert value(sa, "shimmy_peer_bytes_sent_total", peer="node-b") - sent_before >= \
            count * frame
        assert value(sb, "shimmy_peer_bytes_received_total", peer="node-a") >= count * frame
        assert value(sb, "shimmy_peer_batches_received_total", peer="node-a") >= 1
        assert value(sb, "shimmy_channel_replica_link_up", channel=name) == 1
        assert value(sa, "shimmy_channel_replica_link_up", channel=name) is None   # local
        published = value(sa, "shimmy_channel_messages_published_total", channel=name)
        assert published == count + 1                                           # + announce
        until(lambda: value(scrape(url_b), "shimmy_channel_messages_published_total",
                            channel=name) == published, 30.0,
              "the replica ring's message count at the source's")
        (work / "exit").touch()
        for p in procs:
            assert p.wait(30) == 0
    finally:
        (work / "exit").touch()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert os.path.exists(a.socket) and os.path.exists(b.socket)   # both daemons survived
