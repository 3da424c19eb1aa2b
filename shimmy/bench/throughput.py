"""One-way throughput: a sender pushes messages of one size as fast as the transport accepts
them for ``ctx.seconds``, then a one-byte end marker; the receiver counts them.

msgs/s is measured at the receiver, from its first message to the end marker (what was
delivered, not what was queued).  Every transport here is lossless (shimmy reliable mode,
ZeroMQ PUSH/PULL, TCP), and the receiver checks the count against what the sender sent.
CPU per message is each process's getrusage CPU over its loop divided by the message count.

Variants of shimmy: ``copy`` (``publish(bytes)`` / ``bytes(msg)``) and ``loan+view``
(``with ch.loan(n) as buf: buf[:] = data`` / ``msg.data`` without copying: the receiver only
takes ``len``).  The sender fills the loan from a prepared buffer, so ``loan+view`` still has one
memcpy per message (into the ring); a producer that builds its data in place saves that too.
"""

from __future__ import annotations

import time

from . import harness, peers


def variants(ctx) -> list[dict]:
    out: list[dict] = [
        dict(transport="shimmy", variant="copy", label="shimmy publish/bytes(msg)", opts={}),
        dict(transport="shimmy", variant="loan+view", label="shimmy loan/msg.data",
             opts={"zero_copy": True}),
        dict(transport="zmq-ipc", variant="PUSH/PULL", label="ZeroMQ ipc PUSH/PULL", opts={}),
        dict(transport="zmq-tcp", variant="PUSH/PULL", label="ZeroMQ tcp PUSH/PULL", opts={}),
        dict(transport="tcp", variant="raw", label="raw TCP 127.0.0.1", opts={}),
        dict(transport="udp", variant="datagram", label="UDP 127.0.0.1 (lossy)", opts={},
             max_size=peers.UDP_MAX, lossy=True),
        dict(transport="unix", variant="stream", label="unix socket", opts={}),
        dict(transport="pipe", variant="fifo", label="os.pipe (FIFO)", opts={}),
    ]
    if ctx.iceoryx2_ok:
        # iceoryx2 0.10 from Python drops samples when a subscriber's buffer is full, even with
        # BackpressureStrategy.RetryUntilDelivered (seen: gaps right after the 8th sample), so
        # it is measured like UDP: the receiver's rate, with the loss reported.
        out.append(dict(transport="iceoryx2", variant="busy-poll",
                        label="iceoryx2 busy-poll (lossy here)",
                        opts={"max_size": max(ctx.sizes)}, lossy=True))
    if ctx.redis_ok:
        out.append(dict(transport="redis", variant="pub/sub", label="Redis pub/sub", opts={}))
    return out


# -- worker side --------------------------------------------------------------------------------

def receiver(ctl, transport: str, name: str, opts: dict):
    link = peers.accepted_link(ctl, transport, "pipe", "rx", name, opts)
    recv, now = link.recv, time.perf_counter
    c0 = harness.cpu_seconds()
    m = recv()
    t_first = now()
    n = 0
    nbytes = 0
    size = len(m)
    while len(m) != 1:
        n += 1
        m = recv()
    t_end = now()
    nbytes = n * size
    return {"n": n, "bytes": nbytes, "elapsed_s": t_end - t_first,
            "cpu_s": harness.cpu_seconds() - c0}


def sender(ctl, transport: str, name: str, opts: dict, size: int, seconds: float, address=None):
    link = peers.connected_link(ctl, transport, "pipe", "tx", name, opts, address)
    data = peers.payload(size)
    send, now = link.send, time.perf_counter
    step = 1 if size >= 1 << 18 else 32
    c0 = harness.cpu_seconds()
    t0 = now()
    end = t0 + seconds
    n = 0
    while True:
        for _ in range(step):
            send(data)
        n += step
        if now() >= end:
            break
    t1 = now()
    cpu = harness.cpu_seconds() - c0
    send(peers.END)
    return {"n": n, "elapsed_s": t1 - t0, "cpu_s": cpu}


# -- parent side ----------------------------------------------------------------------------------

def measure(ctx, v, pair, size: int) -> dict:
    tx, rx = pair
    name = f"bench/tp/{v['transport']}/{v['variant'].replace('+', '_').replace('/', '_')}/{size}"
    opts = ctx.link_opts(v, size)
    s, r = harness.run_pair(rx, tx, __name__, "receiver", "sender",
                            dict(transport=v["transport"], name=name, opts=opts),
                            dict(transport=v["transport"], name=name, opts=opts, size=size,
                                 seconds=ctx.seconds), ctx.seconds)
    if r["n"] != s["n"] and not v.get("lossy"):
        raise harness.BenchError(f"{v['label']} {size} B: sent {s['n']}, received {r['n']}")
    return {"n": r["n"], "sent": s["n"], "rx_elapsed_s": r["elapsed_s"],
            "tx_elapsed_s": s["elapsed_s"], "tx_cpu_s": s["cpu_s"], "rx_cpu_s": r["cpu_s"]}


def run(ctx) -> dict:
    vs = variants(ctx)
    rows, failed = harness.measure_pairs(
        ctx, "throughput", vs, lambda key: (f"tp-tx-{key[0]}", f"tp-rx-{key[0]}"),
        lambda v, pair, size, rep: measure(ctx, v, pair, size))
    med = harness.median
    results = []
    for v, size, runs in rows:
        rate = med([r["n"] / r["rx_elapsed_s"] for r in runs])
        results.append({
            "transport": v["transport"], "variant": v["variant"], "label": v["label"],
            "size": size, "reps": len(runs), "msgs_per_s": rate,
            "mb_per_s": rate * size / 1e6,
            "wall_us_per_msg": 1e6 / rate if rate else None,
            "cpu_us_per_msg_tx": med([r["tx_cpu_s"] / r["n"] * 1e6 for r in runs]),
            "cpu_us_per_msg_rx": med([r["rx_cpu_s"] / r["n"] * 1e6 for r in runs]),
            "loss_pct": med([100.0 * (1 - r["n"] / r["sent"]) for r in runs]),
            "messages": [r["n"] for r in runs], "runs": runs,
        })
    return {"results": results, "failed": failed,
            "placement": f"sender pinned to CPU {ctx.cpu_a}, receiver to CPU {ctx.cpu_b}"}
