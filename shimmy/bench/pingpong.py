"""Ping-pong round trip: a client sends a message, an echo server sends it back, the client times
the round trip with ``perf_counter_ns``.  Client on one core, server on the other.

Each repetition runs for ``ctx.seconds`` (bounded by an iteration cap); per repetition we keep
p50 / p99 / p99.9 of the round trips and the CPU seconds both processes used (getrusage, all
threads), and report medians over repetitions.  Repetitions are interleaved across transports
(rep 1 of every transport, then rep 2, ...) so slow phases of a shared machine hit all alike.
"""

from __future__ import annotations

import time

from . import harness, peers


MAX_ITERS = 200_000


def variants(ctx) -> list[dict]:
    out: list[dict] = [
        dict(transport="shimmy", variant="default", label="shimmy (default spin)", opts={}),
        dict(transport="shimmy", variant="spin0", label="shimmy spin_us=0", opts={"spin_us": 0}),
        # Zero copy on both sides: the client fills a loan from its prepared buffer and reads
        # the echo as a view (len only); the echo server copies the view it got into its own
        # loan.  Two copies per round trip where every other row makes four: what the ring
        # costs without the receivers' copies.
        dict(transport="shimmy", variant="zero-copy", label="shimmy loan/view (zero-copy)",
             opts={"zero_copy": True}),
        # The publishers' rewind=True (spec/ring.md, "Rewind"): from 64 KiB on, each message
        # goes back to the warm start of the ring when the other side has kept up.
        dict(transport="shimmy", variant="rewind", label="shimmy rewind=True (copy)",
             opts={"rewind": True}),
        dict(transport="shimmy", variant="zero-copy-rewind",
             label="shimmy loan/view, rewind=True (zero-copy)",
             opts={"zero_copy": True, "rewind": True}),
    ]
    if ctx.iceoryx2_ok:
        out.append(dict(transport="iceoryx2", variant="busy-poll", label="iceoryx2 busy-poll",
                        opts={"max_size": max(ctx.sizes)}))
    out += [
        dict(transport="zmq-ipc", variant="PAIR", label="ZeroMQ ipc PAIR", opts={}),
        dict(transport="zmq-tcp", variant="PAIR", label="ZeroMQ tcp PAIR", opts={}),
        dict(transport="tcp", variant="raw", label="raw TCP 127.0.0.1", opts={}),
        dict(transport="udp", variant="datagram", label="UDP 127.0.0.1", opts={},
             max_size=peers.UDP_MAX),
        dict(transport="unix", variant="stream", label="unix socket", opts={}),
        dict(transport="pipe", variant="fifo", label="os.pipe (FIFO)", opts={}),
    ]
    if ctx.redis_ok:
        out.append(dict(transport="redis", variant="pub/sub", label="Redis pub/sub", opts={}))
    return out


# -- worker side --------------------------------------------------------------------------------

def server(ctl, transport: str, name: str, opts: dict):
    link = peers.accepted_link(ctl, transport, "pair", "b", name, opts)
    recv, send = link.recv, link.send
    n = 0
    c0 = harness.cpu_seconds()
    while True:
        m = recv()
        if len(m) == 1:
            break
        send(m)
        n += 1
    return {"n": n, "cpu_s": harness.cpu_seconds() - c0}


def client(ctl, transport: str, name: str, opts: dict, size: int, seconds: float, warmup: int,
           address=None):
    link = peers.connected_link(ctl, transport, "pair", "a", name, opts, address)
    data = peers.payload(size)
    recv, send, now = link.recv, link.send, time.perf_counter_ns
    for _ in range(warmup):
        send(data)
        if len(recv()) != size:
            raise RuntimeError(f"{transport}: echo of wrong size")
    lat: list[int] = []
    append = lat.append
    c0 = harness.cpu_seconds()
    t_start = now()
    t_end = t_start + int(seconds * 1e9)
    i = 0
    while i < MAX_ITERS:
        t0 = now()
        send(data)
        recv()
        t1 = now()
        append(t1 - t0)
        i += 1
        if t1 > t_end:
            break
    wall = now() - t_start
    cpu = harness.cpu_seconds() - c0
    send(peers.END)
    lat.sort()
    return {"iters": i, "wall_s": wall / 1e9, "cpu_s": cpu, "warmup": warmup,
            "p50_us": harness.percentile(lat, 50) / 1e3,
            "p99_us": harness.percentile(lat, 99) / 1e3,
            "p999_us": harness.percentile(lat, 99.9) / 1e3,
            "min_us": lat[0] / 1e3, "mean_us": sum(lat) / len(lat) / 1e3}


# -- parent side ----------------------------------------------------------------------------------

def measure(ctx, v, pair, size: int, rep: int) -> dict:
    cli, srv = pair
    name = f"bench/pp/{v['variant']}/{size}"
    opts = ctx.link_opts(v, size)
    warmup = 20 if size >= 1 << 20 else 300
    c, s = harness.run_pair(srv, cli, __name__, "server", "client",
                            dict(transport=v["transport"], name=name, opts=opts),
                            dict(transport=v["transport"], name=name, opts=opts, size=size,
                                 seconds=ctx.seconds, warmup=warmup), ctx.seconds)
    c["server_cpu_s"] = s["cpu_s"]
    c["server_n"] = s["n"]
    return c


def run(ctx) -> dict:
    vs = variants(ctx)
    rows, failed = harness.measure_pairs(
        ctx, "pingpong", vs, lambda key: (f"pp-client-{key[0]}-{key[1]}",
                                          f"pp-server-{key[0]}-{key[1]}"),
        lambda v, pair, size, rep: measure(ctx, v, pair, size, rep))
    med = harness.median
    results = [{
        "transport": v["transport"], "variant": v["variant"], "label": v["label"],
        "size": size, "reps": len(runs),
        "p50_us": med([r["p50_us"] for r in runs]),
        "p99_us": med([r["p99_us"] for r in runs]),
        "p999_us": med([r["p999_us"] for r in runs]),
        "wall_us_per_rt": med([r["wall_s"] / r["iters"] * 1e6 for r in runs]),
        "cpu_us_per_rt_client": med([r["cpu_s"] / r["iters"] * 1e6 for r in runs]),
        "cpu_us_per_rt_server": med([r["server_cpu_s"] / max(r["server_n"], 1) * 1e6
                                     for r in runs]),
        "iters": [r["iters"] for r in runs],
        "runs": runs,
    } for v, size, runs in rows]
    return {"results": results, "failed": failed,
            "placement": f"client pinned to CPU {ctx.cpu_a}, echo server to CPU {ctx.cpu_b}"}
