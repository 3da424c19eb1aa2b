"""Fan-out: one publisher, N subscribers, 4 KiB messages for ``ctx.seconds``.

shimmy runs in reliable mode: every subscriber must get every message (checked: count equal to
what the publisher sent, sequence numbers contiguous, ``msg.lost == 0``).  ZeroMQ PUB/SUB over
ipc (default high-water marks) drops when a subscriber lags; we report what each subscriber got.

Per-subscriber rate = messages it received / (its last message - its first).  The publisher's
CPU per message (getrusage over the publishing loop / messages sent) is compared between 4 and
1 subscriber(s): the cost a subscriber adds to the publisher.

Handshake (also defeats ZeroMQ's slow joiner): the publisher sends 2-byte WARM messages every
millisecond until every subscriber has seen one, then the measured burst, then 1-byte END
messages until the parent says stop.  Subscribers skip anything before a WARM, so leftovers of a
previous repetition never count.
"""

from __future__ import annotations

import time

from . import harness, peers, report

SIZE = 4096


SUBSCRIBERS = [1, 2, 4, 8, 16]
QUICK_SUBSCRIBERS = [1, 4]


def variants(ctx) -> list[dict]:
    systems = [("shimmy", "shimmy reliable"), ("zmq-ipc", "ZeroMQ ipc PUB/SUB")]
    if ctx.redis_ok:
        systems.append(("redis", "Redis pub/sub"))
    counts = QUICK_SUBSCRIBERS if ctx.quick else SUBSCRIBERS
    return [dict(transport=t, variant=f"{n} sub" + ("s" if n > 1 else ""), subs=n, label=label)
            for n in counts for t, label in systems]


# -- worker side --------------------------------------------------------------------------------

def publisher(ctl, transport: str, name: str, opts: dict, size: int, seconds: float):
    link = peers.open_link(ctl, transport, "fanout", "tx", name, **opts)
    ctl.ready(link.address)
    send = link.send
    deadline = time.monotonic() + 30
    while not ctl.poll_stop():  # warm-up until the parent has heard from every subscriber
        send(peers.WARM)
        time.sleep(0.001)
        if time.monotonic() > deadline:
            raise TimeoutError("subscribers never became ready")
    data = peers.payload(size)
    now = time.perf_counter
    c0 = harness.cpu_seconds()
    t0 = now()
    end = t0 + seconds
    n = 0
    while True:
        for _ in range(16):
            send(data)
        n += 16
        if now() >= end:
            break
    t1 = now()
    cpu = harness.cpu_seconds() - c0
    deadline = time.monotonic() + 30
    while not ctl.poll_stop():  # END until every subscriber has reported
        send(peers.END)
        time.sleep(0.001)
        if time.monotonic() > deadline:
            break
    return {"n": n, "elapsed_s": t1 - t0, "cpu_s": cpu}


def subscriber(ctl, transport: str, name: str, opts: dict, size: int, address=None):
    link = peers.open_link(ctl, transport, "fanout", "rx", name, **opts)
    link.connect(address)
    shimmy_sub = link.sub if transport == "shimmy" else None
    recv = link.recv
    while len(recv()) != 2:  # skip leftovers until a WARM of this repetition
        pass
    ctl.ready()
    now = time.perf_counter
    c0 = harness.cpu_seconds()
    m = recv()
    while len(m) == 2:
        m = recv()
    t_first = now()
    n = 0
    gaps = 0
    lost = 0
    prev = None
    while len(m) == size:
        n += 1
        if shimmy_sub is not None:
            seq = shimmy_sub.last_seq       # the copy path returns bytes; the subscription
            if prev is not None and seq != prev + 1:   # knows the seq it handed out last
                gaps += 1
            prev = seq
        m = recv()
    t_last = now()
    if len(m) != 1:
        raise RuntimeError(f"unexpected {len(m)}-byte message in the measured burst")
    if shimmy_sub is not None:
        lost = shimmy_sub.lost
    return {"n": n, "elapsed_s": t_last - t_first, "cpu_s": harness.cpu_seconds() - c0,
            "seq_gaps": gaps, "lost": lost}


# -- parent side ----------------------------------------------------------------------------------

def measure(ctx, v, pub, subs) -> dict:
    opts = {"daemon": ctx.daemon} if v["transport"] == "shimmy" else {}
    name = f"bench/fan/{v['transport']}/{v['subs']}"
    pub.start_call(__name__, "publisher", transport=v["transport"], name=name, opts=opts,
                   size=SIZE, seconds=ctx.seconds)
    address = pub.wait_ready()
    chosen = subs[:v["subs"]]
    for s in chosen:
        s.start_call(__name__, "subscriber", transport=v["transport"], name=name, opts=opts,
                     size=SIZE, address=address)
    pub.go()
    for s in chosen:
        s.wait_ready(timeout=30)
    for s in chosen:
        s.go()
    pub.stop_signal()  # warm-up over: the measured burst starts
    got = [s.result(timeout=ctx.seconds + 60) for s in chosen]
    pub.stop_signal()  # stop sending END
    p = pub.result(timeout=30)
    return {"sent": p["n"], "pub_cpu_s": p["cpu_s"], "pub_elapsed_s": p["elapsed_s"], "subs": got}


def run(ctx) -> dict:
    vs = variants(ctx)
    sub_cpus = report.fanout_sub_cpus(ctx, max(v["subs"] for v in vs))
    results: list = []
    failed: dict = {}
    reps: dict = {}
    pub = harness.Worker("fan-pub", ctx.cpu_a)
    subs = [harness.Worker(f"fan-sub{i}", c) for i, c in enumerate(sub_cpus)]
    workers = [pub] + subs
    try:
        for rep in range(ctx.reps):
            for v in vs:
                key = (v["transport"], v["variant"])
                if f"{key[0]} {key[1]}" in failed:
                    continue
                try:
                    reps.setdefault(key, []).append(measure(ctx, v, pub, subs))
                except harness.BenchError as exc:
                    failed[f"{key[0]} {key[1]}"] = str(exc)[-2000:]
                    ctx.log(f"  fanout {v['label']} {v['variant']} failed: {str(exc)[-300:]}")
                    # a failed worker may be stuck mid-protocol: start over with fresh ones
                    harness.close_all(workers)
                    pub = harness.Worker("fan-pub", ctx.cpu_a)
                    subs = [harness.Worker(f"fan-sub{i}", c) for i, c in enumerate(sub_cpus)]
                    workers = [pub] + subs
            ctx.log(f"  fanout rep {rep + 1}/{ctx.reps} done")
        med = harness.median
        for v in vs:
            key = (v["transport"], v["variant"])
            runs = reps.get(key)
            if not runs:
                continue
            complete = all(s["n"] == r["sent"] and not s.get("seq_gaps") and not s.get("lost")
                           for r in runs for s in r["subs"])
            delivered = sum(s["n"] for r in runs for s in r["subs"])
            expected = sum(r["sent"] * len(r["subs"]) for r in runs)
            last = runs[-1]
            results.append({
                "transport": v["transport"], "variant": v["variant"], "subs": v["subs"],
                "label": v["label"], "size": SIZE, "reps": len(runs),
                "sent": med([r["sent"] for r in runs]),
                "delivered_each": [s["n"] for s in last["subs"]],
                "sent_last": last["sent"],
                "all_delivered": complete,
                "loss_pct": 100.0 * (1 - delivered / expected) if expected else 0.0,
                "check": ("count == sent, seq contiguous, lost == 0 for every subscriber in every "
                          "repetition" if v["transport"] == "shimmy" else "count == sent"),
                "per_sub_rate_min": med([min(s["n"] / s["elapsed_s"] for s in r["subs"])
                                         for r in runs]),
                "per_sub_rate_median": med([med([s["n"] / s["elapsed_s"] for s in r["subs"]])
                                            for r in runs]),
                "pub_rate": med([r["sent"] / r["pub_elapsed_s"] for r in runs]),
                "pub_cpu_us_per_msg": med([r["pub_cpu_s"] / r["sent"] * 1e6 for r in runs]),
                "sub_cpu_us_per_msg": med([med([s["cpu_s"] / max(s["n"], 1) * 1e6
                                                for s in r["subs"]]) for r in runs]),
                "runs": runs,
            })
    finally:
        harness.close_all(workers)
    return {"results": results, "failed": failed,
            "placement": f"publisher on CPU {ctx.cpu_a}; subscriber i on CPU {sub_cpus}[i] "
                         f"(1-subscriber runs use subscriber 0 on CPU {sub_cpus[0]})"}
