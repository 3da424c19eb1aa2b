"""Scale run of the peer module: N daemons on one machine, each in its own IPC and mount
namespace with a private /dev/shm, found through DNS discovery on loopback (a name bound in each
node's /etc/hosts resolving to 127.0.0.11, .12, ...), full mesh.

    python tests/abuse/peer_scale.py [--nodes 8] [--channels 4] [--idle 10]

Measures, and prints as one JSON object:

* ``mesh_s``: from the last daemon ready to every node holding N-1 links;
* ``visible_s``: a channel opened and published on one node, until every other node lists it
  as published (median and max over one channel per node);
* ``join_s``: a new node (node N+1) started, until it lists every channel of the cluster;
* ``idle_control``: control traffic per link while idle (bytes/s and messages/s, both ways);
* ``memory``: RSS of a daemon with no link and with N links (per-link difference), directory
  entries per node;
* ``restart_third``: a third of the nodes restarted at once (SIGTERM, start): time until the
  mesh is whole again and every surviving channel is visible on every node again.

Bounded in time (every wait has a deadline) and count; everything started here is stopped here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from test_peer_mirror import Node, free_port  # noqa: E402

NAME = "shimmy-peers"


def _ip(i: int) -> str:
    return f"127.0.0.{11 + i}"


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


def _wait(what: str, cond, timeout: float) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)
    return time.monotonic() - t0


def _published(node: Node) -> set[str]:
    reply = node.request("list")
    names = {c["name"] for c in reply["channels"]}
    names |= {c["name"] for c in reply["remote"] if c.get("published")}
    return names


def _links(node: Node) -> int:
    return len(node.peer()["links"])


def _open(node: Node, names: list[str]) -> None:
    """Open and publish one message on each channel, from a client inside the node."""
    code = ("import shimmy, sys\nfor n in sys.argv[2:]:\n"
            "    shimmy.Channel(n, daemon=sys.argv[1], capacity=65536).publish(b'x')\n")
    subprocess.run([*node.enter(), sys.executable, "-c", code, node.socket, *names],
                   check=True, timeout=60)


class Cluster:
    def __init__(self, n: int, spare: int = 1):
        from shimmy.daemon.peer.auth import random_key_file
        self.dir = tempfile.mkdtemp(prefix="shimmy-scale-")
        self.key = os.path.join(self.dir, "cluster.key")
        random_key_file(self.key)
        self.port = free_port()
        hosts = os.path.join(self.dir, "hosts")
        with open(hosts, "w") as fh:
            fh.write("127.0.0.1 localhost\n")
            for i in range(n + spare):
                fh.write(f"{_ip(i)} {NAME}\n")
        cfg = os.path.join(self.dir, "node.toml")
        with open(cfg, "w") as fh:
            fh.write("peer_dns_interval = 1.0\n")
        self.nodes = [Node(f"n{i:02d}", self.key, "--peer-listen", f"{_ip(i)}:{self.port}",
                           "--peer-dns", f"{NAME}:{self.port}", "--config", cfg, hosts=hosts)
                      for i in range(n + spare)]

    def close(self) -> None:
        for node in self.nodes:
            node.close()
            shutil.rmtree(node.dir, ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def run(n: int = 8, channels: int = 4, idle: float = 10.0) -> dict:
    c = Cluster(n)
    live, spare = c.nodes[:n], c.nodes[n]
    out: dict = {"nodes": n, "channels_per_node": channels}
    try:
        live[0].start()
        time.sleep(0.5)
        rss_alone = _rss_kib(live[0].pid)
        for node in live[1:]:
            node.start()
        out["mesh_s"] = round(_wait("full mesh", lambda: all(_links(x) == n - 1 for x in live),
                                    120), 3)
        # a new channel, one per node: time until every other node lists it
        times = []
        for i, node in enumerate(live):
            name = f"scale/new{i}"
            _open(node, [name])     # returns once the client published and exited
            times.append(_wait(name, lambda m=name: all(m in _published(x) for x in live), 60))
        out["visible_s"] = {"median": round(statistics.median(times), 3),
                            "max": round(max(times), 3)}
        for node in live:
            _open(node, [f"scale/{node.name}/{k}" for k in range(channels - 1)])
        every = set().union(*(_published(x) for x in live))
        out["channels_total"] = len(every)
        # idle control traffic per link
        before = {x.name: x.peer()["links"] for x in live}
        time.sleep(idle)
        after = {x.name: x.peer()["links"] for x in live}
        sent = ctrl = 0
        nlinks = 0
        for name in before:
            b0 = {lk["node"]: lk for lk in before[name]}
            for lk in after[name]:
                if lk["node"] in b0:
                    sent += lk["bytes_sent"] - b0[lk["node"]]["bytes_sent"]
                    ctrl += lk["control_sent"] - b0[lk["node"]]["control_sent"]
                    nlinks += 1
        out["idle_control"] = {"bytes_per_s_per_link_each_way": round(sent / nlinks / idle, 1),
                               "control_msgs_per_s_per_link_each_way":
                                   round(ctrl / nlinks / idle, 3)}
        # memory: a lone daemon vs one in the mesh
        rss = [_rss_kib(x.pid) for x in live]
        out["memory"] = {"rss_kib_alone": rss_alone,
                         "rss_kib_median_in_mesh": statistics.median(rss),
                         "rss_kib_per_link": round((statistics.median(rss) - rss_alone) / (n - 1)),
                         "directory_entries_per_node": live[0].peer()["directory"]["entries"]}
        # a new node learns every channel
        t0 = time.monotonic()
        spare.start()
        ready = time.monotonic() - t0
        out["join_s"] = {"daemon_start_s": round(ready, 3), "learn_all_s": round(_wait(
            "new node learns every channel", lambda: every <= _published(spare), 60), 3)}
        out["memory"]["rss_kib_new_node_after_join"] = _rss_kib(spare.pid)
        out["memory"]["threads_per_link"] = 2
        # a third of the nodes restart at once
        third = live[1:1 + max(1, n // 3)]
        gone = {f"scale/new{live.index(x)}" for x in third} | {
            f"scale/{x.name}/{k}" for x in third for k in range(channels - 1)}
        survivors = every - gone
        allnodes = live + [spare]
        t0 = time.monotonic()
        for x in third:
            x.stop(signal.SIGTERM)
        for x in third:
            x.start()
        restart = time.monotonic() - t0
        mesh = _wait("mesh after restart", lambda: all(_links(x) == n for x in allnodes), 120)
        seen = _wait("survivors visible everywhere again",
                     lambda: all(survivors <= _published(x) for x in allnodes), 60)
        lingering = [x.name for x in allnodes if gone & _published(x)]
        out["restart_third"] = {"restarted": len(third), "restart_s": round(restart, 3),
                                "mesh_whole_after_s": round(restart + mesh, 3),
                                "channels_visible_after_s": round(restart + mesh + seen, 3),
                                "nodes_still_listing_lost_channels": lingering}
        out["daemons_alive"] = all(x.alive() for x in allnodes)
    finally:
        c.close()
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--idle", type=float, default=10.0)
    opts = ap.parse_args()
    print(json.dumps(run(opts.nodes, opts.channels, opts.idle), indent=2))
