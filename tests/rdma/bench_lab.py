"""Lab benchmark (run in both guests by ``tools/rdma-lab/bench.sh``): perftest and shimmy's RDMA
mirror over the same rxe link, in one job, so the ratios compare like with like.

1. ``ib_write_bw`` 64 KiB and 1 MiB, ``ib_write_lat`` 64 B (A serves, B measures);
2. shimmy throughput A -> B: reliable channel (8 MiB ring) mirrored over RDMA, 64 KiB and 1 MiB
   messages, MB/s at the subscriber from its first to its last message (median of 3 runs);
3. the same shimmy measurements over TCP on the same link (64 KiB throughput, round trip);
4. shimmy 64 B round trip: A publishes on ``ping``, B answers on ``pong`` (both mirrored over
   RDMA), A times 300 round trips (median), with the small-write threshold at 512 (mailbox CPU
   path) and at 0 (RDMA WRITE for every range).
Each guest writes ``bench.json`` to its LAB_OUT; bench.sh prints the ratios.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import test_two_node as lab  # noqa: E402  (Daemon, barrier, role)

ROLE, PEER = lab.ROLE, lab.PEER
OUT: dict = {}


def gid_index() -> int:
    from shimmy.daemon.peer import rdma
    return rdma.gid_index(*rdma.select_port(""))


def perftest(tool: str, port: int, *args: str) -> str:
    base = [tool, "-d", "rxe0", "-x", str(gid_index()), "-F", "-p", str(port), *args]
    if ROLE == "a":
        return subprocess.run(base, capture_output=True, text=True, timeout=300).stdout
    for _ in range(60):
        p = subprocess.run([*base, PEER], capture_output=True, text=True, timeout=300)
        if p.returncode == 0:
            return p.stdout
        time.sleep(0.5)
    raise RuntimeError(f"{tool} failed: {p.stdout[-2000:]} {p.stderr[-2000:]}")


def result_row(text: str, size: int) -> list[float]:
    for line in text.splitlines():
        cols = line.split()
        if len(cols) >= 4 and cols[0] == str(size) and re.match(r"^\d+$", cols[1]):
            return [float(c) for c in cols[2:]]
    raise RuntimeError(f"no result row for {size} in:\n{text}")


def run_perftest() -> None:
    # (perftest's -e, sleeping on completion events, is not available for WRITE: polling only)
    for size, n in ((65536, 2000), (1 << 20, 200)):
        text = perftest("ib_write_bw", 18600 + size % 97, "-s", str(size), "-n", str(n),
                        "--report_gbits")
        if ROLE == "b":
            peak, avg = result_row(text, size)[:2]
            OUT[f"ib_write_bw_{size}_MBps"] = avg * 1e9 / 8 / 1e6
            print(text)
        lab.barrier(f"bw-{size}")
    text = perftest("ib_write_lat", 18700, "-s", "64", "-n", "1000")
    if ROLE == "b":
        row = result_row(text, 64)   # t_min t_max t_typical t_avg ... (one-way = RTT / 2)
        OUT["ib_write_lat_64_rtt_us"] = 2 * row[2]
        print(text)
    lab.barrier("lat")


def throughput(d, size: int, count: int, tag: str) -> None:
    import shimmy
    name = f"bench/{tag}"
    if ROLE == "a":
        ch = shimmy.Channel(name, daemon=d.socket, mode="reliable", capacity=8 << 20,
                            publish_timeout=120)
        ch.publish(b"x" * 16)
        lab.barrier(f"{tag}-sub")
        body = b"\xab" * size
        for _ in range(count):
            ch.publish(body)
        lab.barrier(f"{tag}-done", timeout=600)
        ch.close()
        return
    deadline = time.monotonic() + 60
    from shimmy.sdk.client import get_client
    while name not in {c["name"] for c in get_client(d.socket).request("list")["remote"]}:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    ch = shimmy.Channel(name, daemon=d.socket)
    sub = ch.subscribe()
    while sub.status == "down":
        time.sleep(0.05)
    lab.barrier(f"{tag}-sub")
    msg = sub.receive(timeout=120)
    t0 = time.perf_counter()
    msg.release()
    for _ in range(count - 1):
        sub.receive(timeout=120).release()
    dt = time.perf_counter() - t0
    key = f"shimmy_{size}_MBps_runs" + ("_tcp" if tag.startswith("tcp") else "")
    OUT.setdefault(key, []).append((count - 1) * size / dt / 1e6)
    lab.barrier(f"{tag}-done")
    ch.close()


def round_trips(d, n: int, tag: str) -> None:
    import shimmy
    mine, theirs = (f"ping/{tag}", f"pong/{tag}") if ROLE == "a" else \
        (f"pong/{tag}", f"ping/{tag}")
    pub = shimmy.Channel(mine, daemon=d.socket, mode="reliable", capacity=1 << 16)
    pub.publish(b"hello")
    from shimmy.sdk.client import get_client
    deadline = time.monotonic() + 60
    while theirs not in {c["name"] for c in get_client(d.socket).request("list")["remote"]}:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    ch = shimmy.Channel(theirs, daemon=d.socket)
    sub = ch.subscribe()
    while sub.status == "down":
        time.sleep(0.05)
    lab.barrier(f"{tag}-ready")
    body = b"p" * 64
    if ROLE == "a":
        rtts = []
        for _ in range(n):
            t0 = time.perf_counter()
            pub.publish(body)
            sub.receive(timeout=30).release()
            rtts.append(time.perf_counter() - t0)
        OUT[f"shimmy_rtt_64_{tag}_us"] = statistics.median(rtts) * 1e6
    else:
        for _ in range(n):
            sub.receive(timeout=30).release()
            pub.publish(body)
    lab.barrier(f"{tag}-done")
    ch.close()
    pub.close()


def main() -> None:
    run_perftest()
    d = lab.node("bench", 7710)
    try:
        for rep in range(3):
            throughput(d, 65536, 512, f"64k-{rep}")
            throughput(d, 1 << 20, 32, f"1m-{rep}")
        round_trips(d, 300, "t512")
        OUT["stat"] = d.stat()["peer"]
    finally:
        d.stop()
    lab.barrier("rtt0-start")
    d = lab.node("bench0", 7711, rdma_small_write_threshold=0)
    try:
        round_trips(d, 300, "t0")
    finally:
        d.stop()
    lab.barrier("tcp-start")
    d = lab.node("benchtcp", 7712, transport="tcp")    # shimmy over TCP on the same link
    try:
        throughput(d, 65536, 512, "tcp-64k")
        round_trips(d, 300, "tcp")
    finally:
        d.stop()
    with open(os.path.join(os.environ["LAB_OUT"], "bench.json"), "w") as fh:
        json.dump(OUT, fh, indent=1)
    print(json.dumps({k: v for k, v in OUT.items() if k != "stat"}, indent=1))


if __name__ == "__main__":
    main()
