"""Cross-node one-way throughput: a publisher on daemon A, a subscriber on daemon B, the two
daemons peered over 127.0.0.1 (TCP transport, and RDMA too where this host has a usable device),
against a raw TCP stream and ZeroMQ tcp carrying the same messages in the same run.  The
measurement itself lives beside the peer module (``shimmy.daemon.peer.bench``), which can also be
run on its own."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from functools import partial
from typing import Any

from . import report

NAME = "crossnode"
SIZES = [64, 65536, 1 << 20]


def _daemon_pairs(xbench) -> dict:
    """The shimmy rows: daemons mirroring over TCP, plus a pair over RDMA when a device exists."""
    from shimmy.daemon.peer import rdma
    pairs = {"shimmy (2 daemons)": xbench.TwoDaemons("tcp")}
    if rdma.available()[0]:
        pairs["shimmy (2 daemons, RDMA)"] = xbench.TwoDaemons("rdma")
    return pairs


def run(ctx) -> dict:
    from shimmy.daemon.peer import bench as xbench
    budget = (32 << 20) if ctx.quick else (1 << 30)
    pairs = _daemon_pairs(xbench)
    results = []
    try:
        for size in SIZES:
            count = xbench._count_for(size, budget_bytes=budget,
                                      cap=50_000 if ctx.quick else 200_000)
            systems: list[tuple[str, Any, Callable[[], float]]] = [
                (label, pair, partial(xbench.cross_node, size, count, pair))
                for label, pair in pairs.items()]
            if size == 64:   # the batch API, where it is the natural client call
                systems += [(label[:-1] + f", batch {report.XN_BATCH})", pair,
                             partial(xbench.cross_node, size, count, pair, report.XN_BATCH))
                            for label, pair in pairs.items()]
            systems += [("raw TCP 127.0.0.1", None, partial(xbench.raw_tcp, size, count)),
                        ("ZeroMQ tcp PUSH/PULL", None, partial(xbench.zmq_tcp, size, count))]
            for label, pair, fn in systems:
                cpus = []
                times = []
                for _ in range(ctx.reps):
                    times.append(fn())
                    if pair is not None:
                        cpus.append(pair.last_cpu)
                secs = statistics.median(times)
                results.append({"transport": label, "size": size, "count": count,
                                "msgs_per_s": count / secs, "mb_per_s": count * size / secs / 1e6})
                if label.startswith("shimmy"):
                    results[-1]["cpu_us_per_msg"] = {
                        k: statistics.median(c[k] for c in cpus) for k in cpus[0]}
                ctx.log(f"  crossnode {label} {report.fmt_size(size)}: "
                        f"{count / secs:,.0f} msgs/s")
        rtt = []
        n = 300 if ctx.quick else 2000
        rtt_systems: list[tuple[str, Callable[[], list]]] = [
            (label, partial(xbench.cross_node_rtt, 64, n, pair)) for label, pair in pairs.items()]
        rtt_systems += [("raw TCP 127.0.0.1", partial(xbench.raw_tcp_rtt, 64, n)),
                        ("ZeroMQ tcp PAIR", partial(xbench.zmq_tcp_rtt, 64, n))]
        for label, rtt_fn in rtt_systems:
            samples = sorted(rtt_fn()[n // 10:])            # the first tenth warms up
            rtt.append({"transport": label, "size": 64, "count": len(samples),
                        "p50_us": samples[len(samples) // 2] / 1e3,
                        "p99_us": samples[int(len(samples) * 0.99)] / 1e3})
            ctx.log(f"  crossnode rtt {label}: p50 {rtt[-1]['p50_us']:.1f} us")
    finally:
        for pair in pairs.values():
            pair.close()
    rows = [[r["transport"], report.fmt_size(r["size"]), f"{r['msgs_per_s']:,.0f}",
             f"{r['mb_per_s']:,.1f}"] for r in results]
    table = "CROSS-NODE one-way throughput, publisher on node A -> subscriber on node B\n" + \
        report._table(rows, ["transport", "size", "msgs/s", "MB/s"])
    cpu_rows = [[report.fmt_size(r["size"]), *(f"{r['cpu_us_per_msg'][k]:.2f}" for k in (
        "publisher", "daemon_a", "daemon_b", "subscriber"))] for r in results
        if "cpu_us_per_msg" in r]
    table += "\n\nCROSS-NODE CPU per message (µs, user+sys of each process, all threads)\n" + \
        report._table(cpu_rows, ["size", "publisher", "daemon A", "daemon B", "subscriber"])
    rows = [[r["transport"], "64 B", f"{r['p50_us']:,.1f}", f"{r['p99_us']:,.1f}"] for r in rtt]
    table += "\n\nCROSS-NODE round trip (A publishes, B echoes on a channel of its own)\n" + \
        report._table(rows, ["transport", "size", "p50 us", "p99 us"])
    return {"results": results, "rtt": rtt, "table": table}
