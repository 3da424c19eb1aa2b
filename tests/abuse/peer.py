"""Peer-port abuse run: a flood of connections that never speak, connections that send random
bytes, and a legitimate peer that must link up meanwhile.

    python tests/abuse/peer.py [--silent 60] [--garbage 40] [--seconds 10]

Starts node A (own IPC and mount namespace, private /dev/shm; needs root) listening on
127.0.0.1, opens ``--silent`` connections that send nothing and keeps ``--garbage`` connections
sending random bytes for ``--seconds``, and meanwhile starts node B dialing A.  Reports, as one
JSON object: whether A survived, B's link-up time under the flood and without it, A's RSS and
open descriptors before and after, and A's peer counters.  Bounded in time and count; everything
started here is stopped here, by pid.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from test_peer_mirror import Node, free_port  # noqa: E402


def _proc_figures(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as fh:
        rss = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
    return {"rss_kib": rss, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def _link_time(a: Node, b: Node, timeout: float) -> float | None:
    """Seconds from B's daemon being ready (its socket answers) to A listing the link."""
    b.start()
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if any(lk["node"] == "B" for lk in a.peer()["links"]):
            return time.monotonic() - t0
        time.sleep(0.01)
    return None


def _still_open(s: socket.socket) -> bool:
    """The peer has not closed this connection (no EOF, no reset, waiting to be read)."""
    try:
        s.setblocking(False)
        return s.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def run(silent: int = 60, garbage: int = 40, seconds: float = 10.0) -> dict:
    from shimmy.daemon.peer.auth import random_key_file
    keydir = tempfile.mkdtemp(prefix="shimmy-abuse-key-")
    key = os.path.join(keydir, "cluster.key")
    random_key_file(key)
    port = free_port()
    cfg = os.path.join(keydir, "a.toml")
    with open(cfg, "w") as fh:   # a slow handshake deadline: a stall would show plainly
        fh.write("peer_handshake_timeout = 30.0\n")
    a = Node("A", key, "--peer-listen", f"127.0.0.1:{port}", "--config", cfg)
    b = Node("B", key, "--peer", f"127.0.0.1:{port}")
    socks: list[socket.socket] = []
    stop = threading.Event()
    out: dict = {"silent": silent, "garbage": garbage, "seconds": seconds}
    try:
        a.start()
        out["link_s_quiet"] = _link_time(a, b, 30)
        b.stop()
        time.sleep(0.3)
        out["before"] = _proc_figures(a.pid)

        def garbage_sender():
            rng = random.Random(7)
            while not stop.is_set():
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                        s.sendall(rng.randbytes(rng.randint(1, 4096)))
                        s.settimeout(0.5)
                        s.recv(64)
                except OSError:
                    pass
        senders = [threading.Thread(target=garbage_sender, daemon=True) for _ in range(garbage)]
        for t in senders:
            t.start()
        for _ in range(silent):
            try:
                socks.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            except OSError:
                break
        # Bounded well inside A's 30 s handshake deadline: a daemon whose handshake slots the
        # silent connections could hold until that deadline never links B in this window.
        out["link_s_flood"] = _link_time(a, b, 15)
        out["silent_open_at_link"] = sum(1 for s in socks if _still_open(s))
        time.sleep(max(0.0, seconds - (out["link_s_flood"] or 15)))
        stop.set()
        for t in senders:
            t.join(5)
        out["during"] = _proc_figures(a.pid)
        for s in socks:
            s.close()
        time.sleep(1.0)
        out["after"] = _proc_figures(a.pid)
        out["daemon_alive"] = a.alive() and bool(a.stat())
        peer = a.peer()
        out["counters"] = {k: peer["counters"][k] for k in (
            "protocol_errors", "evicted_pending", "auth_failures", "links_accepted")}
        out["link_b_up"] = any(lk["node"] == "B" for lk in peer["links"])
    finally:
        stop.set()
        for s in socks:
            s.close()
        for n in (a, b):
            n.close()
            shutil.rmtree(n.dir, ignore_errors=True)
        shutil.rmtree(keydir, ignore_errors=True)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--silent", type=int, default=60)
    ap.add_argument("--garbage", type=int, default=40)
    ap.add_argument("--seconds", type=float, default=10.0)
    opts = ap.parse_args()
    print(json.dumps(run(opts.silent, opts.garbage, opts.seconds), indent=2))
