"""Cross-node one-way throughput and round trip: a publisher on daemon A, a subscriber on daemon
B, the two daemons peered over 127.0.0.1 (TCP transport, and RDMA too where this host has a
usable device), against a raw TCP stream and ZeroMQ tcp carrying the same messages in the same
run, with the CPU time every process of each path spends per MiB.  The measurements live in
``shimmy.bench.xnode``; this module alternates them, takes medians and draws the tables."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from functools import partial

from . import report

SIZES = [64, 65536, 1 << 20]
LOAN_SIZES = (65536, 1 << 20)   # the loan rows: where a zero-copy publisher is worth its loan
RAW_TCP, ZMQ, ZMQ_PAIR = "raw TCP 127.0.0.1", "ZeroMQ tcp PUSH/PULL", "ZeroMQ tcp PAIR"
CPU_COLUMNS = ("sender", "daemon_a", "daemon_b", "receiver")


def loan_label(label: str) -> str:
    """'shimmy (2 daemons)' -> 'shimmy (2 daemons, loan)'."""
    return label[:-1] + ", loan)"


def batch_label(label: str) -> str:
    return label[:-1] + f", batch {report.XN_BATCH})"


def _daemon_pairs(xnode) -> dict:
    """The shimmy rows: daemons mirroring over TCP, plus a pair over RDMA when a device exists."""
    from shimmy.daemon.peer import rdma
    pairs = {"shimmy (2 daemons)": xnode.TwoDaemons("tcp")}
    if rdma.available()[0]:
        pairs["shimmy (2 daemons, RDMA)"] = xnode.TwoDaemons("rdma")
    return pairs


def _one_way_rows(ctx, xnode, pairs: dict) -> list[dict]:
    """Every row of every size; the rows of a size alternate within each repetition, so a
    neighbour's load falls on all of them alike."""
    budget = (32 << 20) if ctx.quick else (1 << 30)
    results = []
    for size in SIZES:
        count = xnode._count_for(size, budget_bytes=budget, cap=50_000 if ctx.quick else 200_000)
        systems: list[tuple[str, Callable]] = []
        for label, pair in pairs.items():
            systems.append((label, partial(xnode.cross_node, size, count, pair)))
            if size in LOAN_SIZES:
                systems.append((loan_label(label),
                                partial(xnode.cross_node, size, count, pair, "loan")))
            if size == 64:   # the batch API, where it is the natural client call
                systems.append((batch_label(label),
                                partial(xnode.cross_node, size, count, pair, "batch")))
        systems += [(RAW_TCP, partial(xnode.raw_tcp, size, count)),
                    (ZMQ, partial(xnode.zmq_tcp, size, count))]
        runs: dict[str, list] = {label: [] for label, _ in systems}
        for _ in range(ctx.reps):
            for label, fn in systems:
                runs[label].append(fn())
        for label, got in runs.items():
            secs = statistics.median(r.seconds for r in got)
            cpu = {k: statistics.median(r.cpu_us_per_mib[k] for r in got)
                   for k in got[0].cpu_us_per_mib}
            results.append({"transport": label, "size": size, "count": count,
                            "msgs_per_s": count / secs, "mb_per_s": count * size / secs / 1e6,
                            "cpu_us_per_mib": cpu,
                            "cpu_us_per_mib_total": statistics.median(
                                sum(r.cpu_us_per_mib.values()) for r in got)})
            ctx.log(f"  crossnode {label} {report.fmt_size(size)}: {count / secs:,.0f} msgs/s, "
                    f"{results[-1]['cpu_us_per_mib_total']:,.0f} CPU us/MiB")
    return results


def _rtt_rows(ctx, xnode, pairs: dict) -> list[dict]:
    """The 64 B round trip, every system once per repetition (alternating): p50 and p99 of each
    run, and their medians."""
    n = 300 if ctx.quick else 2000
    systems: list[tuple[str, Callable[[], list]]] = [
        (label, partial(xnode.cross_node_rtt, 64, n, pair)) for label, pair in pairs.items()]
    systems += [(RAW_TCP, partial(xnode.raw_tcp_rtt, 64, n)),
                (ZMQ_PAIR, partial(xnode.zmq_tcp_rtt, 64, n))]
    runs: dict[str, list[dict]] = {label: [] for label, _ in systems}
    for _ in range(ctx.reps):
        for label, fn in systems:
            samples = sorted(fn()[n // 10:])            # the first tenth warms up
            runs[label].append({"p50_us": samples[len(samples) // 2] / 1e3,
                                "p99_us": samples[int(len(samples) * 0.99)] / 1e3})
    rtt = []
    for label, got in runs.items():
        rtt.append({"transport": label, "size": 64, "count": n - n // 10,
                    "p50_us": statistics.median(r["p50_us"] for r in got),
                    "p99_us": statistics.median(r["p99_us"] for r in got), "runs": got})
        p50s = ", ".join(f"{r['p50_us']:.1f}" for r in got)
        ctx.log(f"  crossnode rtt {label}: p50 {p50s} us")
    return rtt


CPU_HEADER = ["transport", "size", "sender / publisher", "daemon A", "daemon B",
              "receiver / subscriber", "total", "total vs raw TCP"]
CPU_TITLE = ("CPU per MiB end to end: CPU time (user + system, every thread, from /proc) of each "
             "process of the path over the whole transfer, µs per MiB of payload")
RTT_TITLE = ("round trip, 64 B (A publishes, B echoes on a channel of its own): p50 / p99 µs, "
             "the median and each run (the runs alternate between the systems)")


def _vs_raw(results: list[dict], r: dict, key: str) -> str:
    base = next((x for x in results if x["transport"] == RAW_TCP and x["size"] == r["size"]),
                None)
    return f"{r[key] / base[key]:.2f}x" if base and base.get(key) else "-"


def _cpu_cells(results: list[dict]) -> list[list[str]]:
    """A row per path of 64 KiB and more (per MiB says little of 64 B messages)."""
    return [[r["transport"], report.fmt_size(r["size"]),
             *(f"{r['cpu_us_per_mib'][k]:,.0f}" if k in r["cpu_us_per_mib"] else "-"
               for k in CPU_COLUMNS),
             f"{r['cpu_us_per_mib_total']:,.0f}", _vs_raw(results, r, "cpu_us_per_mib_total")]
            for r in results if r["size"] >= 65536]


def _rtt_cells(rtt: list[dict]) -> tuple[list[str], list[list[str]]]:
    n_runs = max((len(r.get("runs", [])) for r in rtt), default=0)
    header = ["transport", "median", *(f"run {i + 1}" for i in range(n_runs))]
    return header, [[r["transport"], f"{r['p50_us']:,.1f} / {r['p99_us']:,.1f}",
                     *(f"{x['p50_us']:,.1f} / {x['p99_us']:,.1f}" for x in r.get("runs", []))]
                    for r in rtt]


def tables(results: list[dict], rtt: list[dict]) -> str:
    """The suite's text tables (the terminal report)."""
    rows = [[r["transport"], report.fmt_size(r["size"]), f"{r['msgs_per_s']:,.0f}",
             f"{r['mb_per_s']:,.1f}", _vs_raw(results, r, "msgs_per_s")] for r in results]
    rtt_header, rtt_rows = _rtt_cells(rtt)
    return ("CROSS-NODE one-way throughput, publisher on node A -> subscriber on node B\n" +
            report._table(rows, ["transport", "size", "msgs/s", "MB/s", "vs raw TCP"]) +
            f"\n\nCROSS-NODE {CPU_TITLE}\n" + report._table(_cpu_cells(results), CPU_HEADER) +
            f"\n\nCROSS-NODE {RTT_TITLE}\n" + report._table(rtt_rows, rtt_header))


def markdown(results: list[dict], rtt: list[dict]) -> list[str]:
    """The CPU and round-trip tables for the Markdown report (publish.py)."""
    def md(header: list[str], rows: list[list[str]]) -> list[str]:
        return ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1),
                *("| " + " | ".join(row) + " |" for row in rows), ""]
    rtt_header, rtt_rows = _rtt_cells(rtt)
    return (["### Cross-node " + CPU_TITLE, "", *md(CPU_HEADER, _cpu_cells(results)),
             "### Cross-node " + RTT_TITLE, "", *md(rtt_header, rtt_rows)])


def run(ctx) -> dict:
    from . import xnode
    if ctx.cpu_a != ctx.cpu_b:   # each node on a CPU of its own (xnode.py, "Placement")
        xnode.NODE_CPUS = (ctx.cpu_a, ctx.cpu_b)
    pairs = _daemon_pairs(xnode)
    try:
        results = _one_way_rows(ctx, xnode, pairs)
        rtt = _rtt_rows(ctx, xnode, pairs)
    finally:
        for pair in pairs.values():
            pair.close()
    placement = (f"node A (daemon A, publisher or pinger, the raw TCP and ZeroMQ senders) on CPU "
                 f"{ctx.cpu_a}, node B (daemon B, subscriber or echoer, the receivers) on CPU "
                 f"{ctx.cpu_b}" if ctx.cpu_a != ctx.cpu_b else "unpinned (one CPU)")
    return {"results": results, "rtt": rtt, "placement": placement,
            "table": tables(results, rtt) + f"\n  placement: {placement}"}
