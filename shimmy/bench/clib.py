"""The C client (libshimmy, driven through ``shimmy-c``'s benchmark commands) next to the Python
SDK, on the same daemon and channels: round trips C<->C, C<->Python, Python<->Python (and
iceoryx2 busy-poll where installed), and one-way throughput C->C (per-message copy, loan +
zero-copy view, batches), C->Python, Python->C and Python->Python.

The measurements are those of the pingpong and throughput suites (same protocol: an empty
message takes the publisher role, a 1-byte message ends a run; same statistics: nearest-rank
percentiles of every round trip, msgs/s at the receiver from its first message to the end
marker).  A C side runs as a ``shimmy-c`` process started by a pinned worker (it inherits the
worker's CPU) and released by it at the same instant as the Python side; repetitions alternate
across the rows.  Targets: C 64 B round trip p50 <= iceoryx2 busy-poll's; C 64 B one-way
(per-message publish and copy receive) >= 10M msgs/s; C 1 MiB loan + view >= the Python SDK's.

Needs libshimmy built (``make c``; ``$SHIMMY_C`` names another shimmy-c binary).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from . import harness, pingpong, report, throughput

SHIMMY_C = Path(os.environ.get("SHIMMY_C") or
                Path(__file__).resolve().parents[2] / "libshimmy" / "build" / "shimmy-c")
if not SHIMMY_C.exists():
    raise ImportError(f"{SHIMMY_C} is not built (make c builds libshimmy and shimmy-c; "
                      f"$SHIMMY_C may name another binary)")

TP_TARGET = 10e6   # msgs/s, C 64 B one-way


def rtt_variants(ctx) -> list[dict]:
    out = [dict(variant="C<->C", client="c", server="c"),
           dict(variant="C<->Python", client="c", server="py"),
           dict(variant="Python<->C", client="py", server="c"),
           dict(variant="Python<->Python", client="py", server="py")]
    if ctx.iceoryx2_ok:
        out.append(dict(variant="iceoryx2 busy-poll", client="ice", server="ice"))
    for v in out:
        v["transport"], v["label"] = "rtt", f"round trip {v['variant']}"
    return out


def tp_variants(ctx) -> list[dict]:
    out: list[dict] = [
           dict(variant="C->C copy", tx="c", rx="c", tx_args=[], rx_args=["--receive", "copy"]),
           dict(variant="C->C loan+view", tx="c", rx="c", tx_args=["--loan"],
                rx_args=["--receive", "view"]),
           dict(variant="C->C batch 64/256", tx="c", rx="c", tx_args=["--batch", "64"],
                rx_args=["--receive", "many"]),
           dict(variant="C->Python copy", tx="c", rx="py", tx_args=[], zero_copy=False),
           dict(variant="Python->C copy", tx="py", rx="c", rx_args=["--receive", "copy"],
                zero_copy=False),
           dict(variant="Python->Python copy", tx="py", rx="py", zero_copy=False),
           dict(variant="Python->Python loan+view", tx="py", rx="py", zero_copy=True)]
    for v in out:
        v["transport"], v["label"] = "one-way", f"one-way {v['variant']}"
    return out


# -- worker side --------------------------------------------------------------------------------

def c_side(ctl, args: list[str], seconds: float, address=None) -> dict:
    """Run one shimmy-c benchmark command: set up (``--ready``), report ready, release it on
    the parent's go (``--go-stdin``), return the JSON line it prints."""
    with tempfile.TemporaryDirectory(prefix="shimmy-bench-c-") as tmp:
        ready = os.path.join(tmp, "ready")
        proc = subprocess.Popen([str(SHIMMY_C), *args, "--ready", ready, "--go-stdin"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(ready):
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    out, err = proc.communicate()
                    raise harness.BenchError(f"shimmy-c {args[0]} did not set up: {err[-500:]}")
                time.sleep(0.002)
            ctl.ready(None)
            assert proc.stdin is not None
            proc.stdin.write("g\n")
            proc.stdin.flush()
            out, err = proc.communicate(timeout=seconds + 60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if proc.returncode != 0:
        raise harness.BenchError(f"shimmy-c {args[0]} exited {proc.returncode}: {err[-500:]}")
    return json.loads(out.strip().splitlines()[-1])


def py_echo(ctl, transport: str, name: str, opts: dict) -> dict:
    return pingpong.server(ctl, transport, name, opts)


def py_ping(ctl, transport: str, name: str, opts: dict, size: int, seconds: float, warmup: int,
            address=None) -> dict:
    return pingpong.client(ctl, transport, name, opts, size, seconds, warmup, address)


def py_recv(ctl, name: str, opts: dict) -> dict:
    return throughput.receiver(ctl, "shimmy", name, opts)


def py_send(ctl, name: str, opts: dict, size: int, seconds: float, address=None) -> dict:
    return throughput.sender(ctl, "shimmy", name, opts, size, seconds, address)


# -- parent side ----------------------------------------------------------------------------------

def _c_common(ctx, size: int) -> list[str]:
    cap = ctx.capacity_for(size)
    return ["--daemon", ctx.daemon] + (["--capacity", str(cap)] if cap else [])


def measure_rtt(ctx, v: dict, pair, size: int) -> dict:
    cli, srv = pair
    name = f"bench/c-rtt/{v['variant'].replace('<->', '-')}/{size}".replace(" ", "_")
    warmup = 20 if size >= 1 << 20 else 300
    transport = "iceoryx2" if v["client"] == "ice" else "shimmy"
    opts = ctx.link_opts({"transport": transport, "opts": {"max_size": max(ctx.sizes)}
                          if transport == "iceoryx2" else {}}, size)
    if v["server"] == "c":
        s_func, s_kw = "c_side", dict(args=["echo", *_c_common(ctx, size), name],
                                      seconds=ctx.seconds)
    else:
        s_func, s_kw = "py_echo", dict(transport=transport, name=name, opts=opts)
    if v["client"] == "c":
        c_func, c_kw = "c_side", dict(args=["ping", *_c_common(ctx, size), "--size", str(size),
                                            "--seconds", str(ctx.seconds), "--warmup",
                                            str(warmup), name], seconds=ctx.seconds)
    else:
        c_func, c_kw = "py_ping", dict(transport=transport, name=name, opts=opts, size=size,
                                       seconds=ctx.seconds, warmup=warmup)
    c, s = harness.run_pair(srv, cli, __name__, s_func, c_func, s_kw, c_kw, ctx.seconds)
    c["server_n"] = s["n"]
    return c


def measure_tp(ctx, v: dict, pair, size: int) -> dict:
    tx, rx = pair
    name = f"bench/c-tp/{v['variant'].replace('->', '-').replace(' ', '_').replace('/', '_')}" \
           f"/{size}".replace("+", "_")
    opts = ctx.link_opts({"transport": "shimmy", "opts": {"zero_copy": v.get("zero_copy")}},
                         size)
    if v["rx"] == "c":
        r_func, r_kw = "c_side", dict(args=["drain", *_c_common(ctx, size), *v["rx_args"], name],
                                      seconds=ctx.seconds)
    else:
        r_func, r_kw = "py_recv", dict(name=name, opts=opts)
    if v["tx"] == "c":
        s_func, s_kw = "c_side", dict(args=["blast", *_c_common(ctx, size), "--size", str(size),
                                            "--seconds", str(ctx.seconds), *v["tx_args"], name],
                                      seconds=ctx.seconds)
    else:
        s_func, s_kw = "py_send", dict(name=name, opts=opts, size=size, seconds=ctx.seconds)
    s, r = harness.run_pair(rx, tx, __name__, r_func, s_func, r_kw, s_kw, ctx.seconds)
    if r["n"] != s["n"]:
        raise harness.BenchError(f"{v['label']} {size} B: sent {s['n']}, received {r['n']}")
    return {"n": r["n"], "rx_elapsed_s": r["elapsed_s"], "tx_cpu_s": s["cpu_s"],
            "rx_cpu_s": r["cpu_s"]}


def _find(results: list[dict], variant: str, size: int) -> dict | None:
    return next((r for r in results if r["variant"] == variant and r["size"] == size), None)


def run(ctx) -> dict:
    rtt_vs, tp_vs = rtt_variants(ctx), tp_variants(ctx)
    pairs: dict = {}
    results: list[dict] = []
    med = harness.median
    try:
        for v in rtt_vs + tp_vs:
            key = (v["transport"], v["variant"])
            pairs[key] = (harness.Worker(f"c-a-{len(pairs)}", ctx.cpu_a),
                          harness.Worker(f"c-b-{len(pairs)}", ctx.cpu_b))
        reps, failed = harness.repeat_measurements(
            ctx, "c", rtt_vs, pairs, lambda v, pair, size, rep: measure_rtt(ctx, v, pair, size))
        tp_reps, tp_failed = harness.repeat_measurements(
            ctx, "c", tp_vs, pairs, lambda v, pair, size, rep: measure_tp(ctx, v, pair, size))
        failed.update(tp_failed)
        for v in rtt_vs:
            for size in ctx.sizes:
                runs = reps.get((("rtt", v["variant"]), size))
                if runs:
                    results.append({
                        "transport": "rtt", "variant": v["variant"], "label": v["label"],
                        "size": size, "reps": len(runs),
                        "p50_us": med([r["p50_us"] for r in runs]),
                        "p99_us": med([r["p99_us"] for r in runs]),
                        "p999_us": med([r["p999_us"] for r in runs]),
                        "iters": [r["iters"] for r in runs], "runs": runs})
        for v in tp_vs:
            for size in ctx.sizes:
                runs = tp_reps.get((("one-way", v["variant"]), size))
                if runs:
                    rate = med([r["n"] / r["rx_elapsed_s"] for r in runs])
                    results.append({
                        "transport": "one-way", "variant": v["variant"], "label": v["label"],
                        "size": size, "reps": len(runs), "msgs_per_s": rate,
                        "mb_per_s": rate * size / 1e6,
                        "cpu_us_per_msg_tx": med([r["tx_cpu_s"] / r["n"] * 1e6 for r in runs]),
                        "cpu_us_per_msg_rx": med([r["rx_cpu_s"] / r["n"] * 1e6 for r in runs]),
                        "messages": [r["n"] for r in runs], "runs": runs})
    finally:
        for p in pairs.values():
            harness.close_all(p)
    targets = _targets(results)
    return {"results": results, "failed": failed, "targets": targets,
            "table": _table(results, failed),
            "placement": f"client/sender pinned to CPU {ctx.cpu_a}, server/receiver to CPU "
                         f"{ctx.cpu_b} (a shimmy-c process inherits its worker's CPU)"}


def _targets(results: list[dict]) -> list[dict]:
    cc, ice = _find(results, "C<->C", 64), _find(results, "iceoryx2 busy-poll", 64)
    tp = _find(results, "C->C copy", 64)
    loan, py_loan = (_find(results, v, 1 << 20) for v in ("C->C loan+view",
                                                          "Python->Python loan+view"))
    get = report._get
    return [
        report._target("c-rtt64-vs-iceoryx2", "C 64 B round trip p50 <= 1.0x iceoryx2 busy-poll",
                       get(cc, "p50_us"), get(ice, "p50_us"), "<=", 1.0, "us",
                       "" if ice else "iceoryx2 not measured (see skipped)"),
        report._target("c-tp64-10M", "C 64 B one-way msgs/s (publish / copy receive) >= 10M",
                       get(tp, "msgs_per_s"), TP_TARGET if tp else None, ">=", 1.0, "msg/s"),
        report._target("c-tp1M-loan-vs-python", "C 1 MiB loan + view msgs/s >= 1.0x the Python "
                       "SDK's", get(loan, "msgs_per_s"), get(py_loan, "msgs_per_s"), ">=", 1.0,
                       "msg/s"),
    ]


def _table(results: list[dict], failed: dict) -> str:
    n = report._n
    rtt = [[r["variant"], report.fmt_size(r["size"]), n(r["p50_us"], 2), n(r["p99_us"], 2),
            n(r["p999_us"], 1)] for r in results if r["transport"] == "rtt"]
    tp = [[r["variant"], report.fmt_size(r["size"]), n(r["msgs_per_s"], 0), n(r["mb_per_s"], 0),
           n(r["cpu_us_per_msg_tx"], 3), n(r["cpu_us_per_msg_rx"], 3)]
          for r in results if r["transport"] == "one-way"]
    parts = ["\nC CLIENT (libshimmy) ROUND TRIP (medians, us)\n" +
             report._table(rtt, ["client<->server", "size", "p50", "p99", "p99.9"]),
             "\nC CLIENT (libshimmy) ONE-WAY (medians)\n" +
             report._table(tp, ["sender->receiver", "size", "msgs/s", "MB/s", "cpu/msg tx",
                                "cpu/msg rx"])]
    for k, why in failed.items():
        parts.append(f"  FAILED {k}: {why.splitlines()[-1] if why else ''}")
    return "\n".join(parts)
