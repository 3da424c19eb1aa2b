"""Many publishers on one channel (spec/ring.md, "Publisher groups").

Three measurements, each against its reference in the same run:

* ``single``: one publisher, one subscriber, one-way, copy path (``publish(bytes)`` /
  ``receive_bytes``), on an exclusive channel (``max_publishers=1``) and on a multi-publisher
  channel (``max_publishers=4``) with that one publisher; alternated repetition by repetition.
  Target: the group costs at most 5% (msgs/s ratio >= 0.95).
* ``fan-in``: 4 publisher processes -> 1 subscriber for ``ctx.seconds`` each, shimmy reliable vs
  ZeroMQ ipc PUSH/PULL with 4 PUSH sockets connected to one PULL; shimmy twice: one call per
  message (``publish`` / ``receive_bytes``, like the ZeroMQ side) and the batch API
  (``publish_many`` of 32 / ``receive_many(256)``; ZeroMQ's Python API has no equivalent).
  Rate = messages received / (last end marker - first message); every message must arrive
  (counts checked per sender).
  Target: shimmy >= 3x ZeroMQ.
* ``wake-up``: a subscriber with ``spin_us=0`` (so it sleeps on its semaphore) receives a
  timestamp every 2 ms from one publisher while P-1 other publishers stay attached and idle;
  latency = receive time - send time (both CLOCK_MONOTONIC).  Target: p50 with 16 publishers
  <= 1.5x p50 with 1 (it must not grow with the number of publishers).

Senders are pinned to the first usable CPU, the receiver to the second.
"""

from __future__ import annotations

import os
import struct
import tempfile
import time

from . import harness, peers, report

SIZES = [64, 4096]
FANIN = 4
WAKE_PUBLISHERS = [1, 4, 16]
WAKE_SAMPLES = 200
WAKE_GAP = 0.002
STAMP = struct.Struct("<dQ")   # send time, sample number (+ padding to 64 B)


# -- worker side --------------------------------------------------------------------------------
# The measured loops below are written out once per transport, alike on purpose: each calls its
# transport's own receive or send method directly, where a loop shared through a wrapper (a
# lambda, functools.partial) would add one call per message to the very figure it measures.

def _channel(name: str, daemon: str, pubs: int, spin_us: int | None = None):
    import shimmy
    return shimmy.Channel(name, daemon=daemon, mode="reliable", max_publishers=pubs,
                          spin_us=spin_us)


def shimmy_receiver(ctl, name: str, daemon: str, pubs: int, senders: int, batch: bool = False):
    ch = _channel(name, daemon, pubs)
    sub = ch.subscribe()
    ctl.ready()
    now = time.perf_counter
    c0 = harness.cpu_seconds()
    if batch:   # receive_many: up to 256 committed messages of one publisher a call
        take = sub.receive_many
        got = take(256, peers.RECV_TIMEOUT)
        t_first = now()
        n = ends = 0
        while True:
            for m in got:
                if len(m) == 1:
                    ends += 1
                else:
                    n += 1
            if ends == senders:
                break
            got = take(256, peers.RECV_TIMEOUT)
        t_end = now()
    else:
        recv = sub.receive_bytes
        m = recv(peers.RECV_TIMEOUT)
        t_first = now()
        n = 0
        ends = 0
        while True:
            if len(m) == 1:
                ends += 1
                if ends == senders:
                    break
            else:
                n += 1
            m = recv(peers.RECV_TIMEOUT)
        t_end = now()
    out = {"n": n, "elapsed_s": t_end - t_first, "cpu_s": harness.cpu_seconds() - c0,
           "lost": sub.lost}
    sub.close()
    ch.close()
    return out


def shimmy_sender(ctl, name: str, daemon: str, pubs: int, size: int, seconds: float,
                  batch: bool = False):
    ch = _channel(name, daemon, pubs)
    data = peers.payload(size)
    publish = ch.publish
    group = [data] * 32
    publish_many = ch.publish_many
    ctl.ready()
    c0 = harness.cpu_seconds()
    now = time.perf_counter
    end = now() + seconds
    n = 0
    while True:
        if batch:   # publish_many: one commit for the 32
            publish_many(group)
        else:
            for _ in range(32):
                publish(data)
        n += 32
        if now() >= end:
            break
    cpu = harness.cpu_seconds() - c0
    publish(peers.END)
    ch.close()
    return {"n": n, "cpu_s": cpu}


def zmq_receiver(ctl, senders: int):
    import zmq
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(peers.RECV_TIMEOUT * 1000))
    d = tempfile.mkdtemp(prefix="shimmy-bench-fanin-")
    path = os.path.join(d, "pull")
    sock.bind("ipc://" + path)
    ctl.ready("ipc://" + path)
    recv = sock.recv
    now = time.perf_counter
    c0 = harness.cpu_seconds()
    m = recv()
    t_first = now()
    n = ends = 0
    while True:
        if len(m) == 1:
            ends += 1
            if ends == senders:
                break
        else:
            n += 1
        m = recv()
    t_end = now()
    sock.close(0)
    ctx.term()
    os.unlink(path)
    os.rmdir(d)
    return {"n": n, "elapsed_s": t_end - t_first, "cpu_s": harness.cpu_seconds() - c0,
            "lost": 0}


def zmq_sender(ctl, address: str, size: int, seconds: float):
    import zmq
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 10_000)
    sock.connect(address)
    data = peers.payload(size)
    send = sock.send
    ctl.ready()
    c0 = harness.cpu_seconds()
    now = time.perf_counter
    end = now() + seconds
    n = 0
    while True:
        for _ in range(32):
            send(data)
        n += 32
        if now() >= end:
            break
    send(peers.END)
    sock.close()   # lingers until everything is handed over
    ctx.term()     # (so the CPU below includes the I/O thread's work for these messages)
    return {"n": n, "cpu_s": harness.cpu_seconds() - c0}


def idle_publisher(ctl, name: str, daemon: str, pubs: int):
    ch = _channel(name, daemon, pubs)
    ch.publish(b"")   # attaches its member ring; the subscriber skips empty messages
    ctl.ready()
    while not ctl.poll_stop():
        time.sleep(0.02)
    ch.close()
    return {}


def stamp_publisher(ctl, name: str, daemon: str, pubs: int):
    ch = _channel(name, daemon, pubs)
    ch.publish(b"")
    ctl.ready()
    buf = bytearray(64)
    for i in range(WAKE_SAMPLES):
        time.sleep(WAKE_GAP)
        STAMP.pack_into(buf, 0, time.perf_counter(), i)
        ch.publish(buf)
    ch.publish(peers.END)
    ch.close()
    return {"n": WAKE_SAMPLES}


def wake_subscriber(ctl, name: str, daemon: str, pubs: int):
    ch = _channel(name, daemon, pubs, spin_us=0)
    sub = ch.subscribe()
    ctl.ready()
    lat = []
    while True:
        m = sub.receive_bytes(peers.RECV_TIMEOUT)
        t = time.perf_counter()
        if len(m) == 1:
            break
        if len(m) == 64:
            lat.append((t - STAMP.unpack_from(m)[0]) * 1e6)
    sub.close()
    ch.close()
    lat.sort()
    return {"n": len(lat), "p50_us": harness.percentile(lat, 50),
            "p99_us": harness.percentile(lat, 99)}


# -- parent side ----------------------------------------------------------------------------------

def _fan(ctx, rx, txs, system: str, pubs: int, size: int, tag: str) -> dict:
    senders = len(txs)
    if system.startswith("shimmy"):
        name = f"bench/fanin/{system}/{tag}"
        batch = system == "shimmy-batch"
        rx.start_call(__name__, "shimmy_receiver", name=name, daemon=ctx.daemon, pubs=pubs,
                      senders=senders, batch=batch)
        rx.wait_ready()
        for tx in txs:
            tx.start_call(__name__, "shimmy_sender", name=name, daemon=ctx.daemon, pubs=pubs,
                          size=size, seconds=ctx.seconds, batch=batch)
    else:
        rx.start_call(__name__, "zmq_receiver", senders=senders)
        address = rx.wait_ready()
        for tx in txs:
            tx.start_call(__name__, "zmq_sender", address=address, size=size, seconds=ctx.seconds)
    for tx in txs:
        tx.wait_ready()
    rx.go()
    for tx in txs:
        tx.go()
    outs = [tx.result(timeout=ctx.seconds + 60) for tx in txs]
    sent = [o["n"] for o in outs]
    r = rx.result(timeout=60)
    if system.startswith("shimmy"):
        _delete(ctx, name)
    if r["n"] != sum(sent) or r["lost"]:
        raise harness.BenchError(f"fan-in {system} {size} B: sent {sum(sent)}, received "
                                 f"{r['n']} (lost {r['lost']})")
    return {"n": r["n"], "rate": r["n"] / r["elapsed_s"], "rx_cpu_us": r["cpu_s"] / r["n"] * 1e6,
            "tx_cpu_us": sum(o["cpu_s"] for o in outs) / sum(sent) * 1e6}


def _wake(ctx, workers, pubs: int, rep: int) -> dict:
    name = f"bench/fanin/wake/{pubs}/{rep}"
    sub, stamper, idle = workers[0], workers[1], workers[2:2 + pubs - 1]
    group = max(pubs, 2)   # a multi-publisher channel even with one publisher
    sub.start_call(__name__, "wake_subscriber", name=name, daemon=ctx.daemon, pubs=group)
    sub.wait_ready()
    for w in idle:
        w.start_call(__name__, "idle_publisher", name=name, daemon=ctx.daemon, pubs=group)
        w.wait_ready()
        w.go()
    stamper.start_call(__name__, "stamp_publisher", name=name, daemon=ctx.daemon, pubs=group)
    stamper.wait_ready()
    sub.go()
    stamper.go()
    stamper.result(timeout=60)
    r = sub.result(timeout=60)
    for w in idle:
        w.stop_signal()
        w.result(timeout=30)
    _delete(ctx, name)
    return r


def _delete(ctx, name: str) -> None:
    """Delete a measured channel: every repetition uses new names, and the bench daemon's
    tenant quota (quota_channels, 64 by default) counts channels nobody holds any more too."""
    from shimmy.sdk.client import get_client
    get_client(ctx.daemon).request("delete", name=name)


def run(ctx) -> dict:
    med = harness.median
    reps = max(ctx.reps, 3)
    rx = harness.Worker("fanin-rx", ctx.cpu_b)
    txs = [harness.Worker(f"fanin-tx{i}", ctx.cpu_a) for i in range(FANIN)]
    idle = [harness.Worker(f"fanin-idle{i}", ctx.cpu_a) for i in range(max(WAKE_PUBLISHERS))]
    workers = [rx, *txs, *idle]
    single: dict = {}
    fan: dict = {}
    wake: dict = {}
    try:
        for rep in range(reps):
            for size in SIZES:
                for pubs in (1, FANIN):   # exclusive, then the group: alternated per repetition
                    r = _fan(ctx, rx, txs[:1], "shimmy", pubs, size, f"single/{pubs}/{size}/{rep}")
                    single.setdefault((size, pubs), []).append(r)
            for system in ("shimmy", "shimmy-batch", "zmq-ipc"):
                r = _fan(ctx, rx, txs, system, FANIN, 64, f"fan/{rep}")
                fan.setdefault(system, []).append(r)
            for pubs in WAKE_PUBLISHERS:
                wake.setdefault(pubs, []).append(_wake(ctx, [rx, *idle], pubs, rep))
    finally:
        harness.close_all(workers)
    results = []
    rows = []
    targets = []
    for size in SIZES:
        ex = med([r["rate"] for r in single[(size, 1)]])
        gr = med([r["rate"] for r in single[(size, FANIN)]])
        results.append({"what": "single", "size": size, "exclusive_msgs_per_s": ex,
                        "group_msgs_per_s": gr, "ratio": gr / ex})
        rows.append([f"1 publisher msgs/s: max_publishers={FANIN} (A) vs 1 (B)",
                     report.fmt_size(size), f"{gr:,.0f}", f"{ex:,.0f}", f"{gr / ex:.3f}x"])
        targets.append(_target(f"fanin-single-{size}", f"1 publisher on a max_publishers={FANIN} "
                               f"channel, {report.fmt_size(size)} one-way: >= 0.95x exclusive",
                               gr, ex, 0.95, "msgs/s"))
    sh = med([r["rate"] for r in fan["shimmy"]])
    zq = med([r["rate"] for r in fan["zmq-ipc"]])
    sh_cpu = med([r["rx_cpu_us"] for r in fan["shimmy"]])
    zq_cpu = med([r["rx_cpu_us"] for r in fan["zmq-ipc"]])
    sh_tx = med([r["tx_cpu_us"] for r in fan["shimmy"]])
    zq_tx = med([r["tx_cpu_us"] for r in fan["zmq-ipc"]])
    results.append({"what": "fan-in", "size": 64, "publishers": FANIN, "shimmy_msgs_per_s": sh,
                    "zmq_msgs_per_s": zq, "ratio": sh / zq, "all_delivered": True,
                    "shimmy_rx_cpu_us_per_msg": sh_cpu, "zmq_rx_cpu_us_per_msg": zq_cpu,
                    "shimmy_tx_cpu_us_per_msg": sh_tx, "zmq_tx_cpu_us_per_msg": zq_tx})
    rows.append([f"fan-in {FANIN} -> 1 msgs/s (all delivered): shimmy (A) vs ZeroMQ ipc "
                 f"PUSH/PULL (B)", "64 B", f"{sh:,.0f}", f"{zq:,.0f}", f"{sh / zq:.2f}x"])
    sb = med([r["rate"] for r in fan["shimmy-batch"]])
    results.append({"what": "fan-in-batch", "size": 64, "publishers": FANIN,
                    "shimmy_msgs_per_s": sb, "zmq_msgs_per_s": zq, "ratio": sb / zq,
                    "all_delivered": True})
    rows.append([f"fan-in {FANIN} -> 1 msgs/s, batch API (publish_many of 32 / receive_many): "
                 f"shimmy (A) vs ZeroMQ ipc (B)", "64 B", f"{sb:,.0f}", f"{zq:,.0f}",
                 f"{sb / zq:.2f}x"])
    rows.append([f"fan-in {FANIN} -> 1 receiver CPU us/msg: shimmy (A) vs ZeroMQ (B)", "64 B",
                 f"{sh_cpu:.3f}", f"{zq_cpu:.3f}", f"{sh_cpu / zq_cpu:.2f}x"])
    rows.append([f"fan-in {FANIN} -> 1 senders' CPU us/msg: shimmy (A) vs ZeroMQ (B)", "64 B",
                 f"{sh_tx:.3f}", f"{zq_tx:.3f}", f"{sh_tx / zq_tx:.2f}x"])
    targets.append(_target("fanin-vs-zmq", f"fan-in {FANIN} publishers -> 1 subscriber, 64 B: "
                           f">= 3x ZeroMQ ipc PUSH/PULL msgs/s", sh, zq, 3.0, "msgs/s"))
    p50 = {p: med([r["p50_us"] for r in wake[p]]) for p in WAKE_PUBLISHERS}
    p99 = {p: med([r["p99_us"] for r in wake[p]]) for p in WAKE_PUBLISHERS}
    for p in WAKE_PUBLISHERS:
        results.append({"what": "wake-up", "publishers": p, "p50_us": p50[p], "p99_us": p99[p]})
        rows.append([f"idle wake-up us, {p} publisher(s) attached: p50 (A) / p99 (B)", "64 B",
                     f"{p50[p]:.1f}", f"{p99[p]:.1f}", f"{p50[p] / p50[1]:.2f}x of 1"])
    most = max(WAKE_PUBLISHERS)
    targets.append(_target("fanin-wake", f"idle wake-up p50 with {most} publishers <= 1.5x with 1",
                           p50[most], p50[1], 1.5, "us", op="<="))
    table = "\nMANY PUBLISHERS ON ONE CHANNEL (medians)\n" + report._table(
        rows, ["measurement", "size", "A", "B", "ratio"])
    return {"results": results, "targets": targets, "table": table,
            "raw": {"single": {f"{k[0]}/{k[1]}": v for k, v in single.items()},
                    "fan": fan, "wake": {str(k): v for k, v in wake.items()}},
            "placement": f"senders pinned to CPU {ctx.cpu_a}, receiver to CPU {ctx.cpu_b}"}


def _target(tid: str, text: str, value: float, ref: float, threshold: float, unit: str,
            op: str = ">=") -> dict:
    """A ratio target (value / reference ``op`` threshold), shaped like
    report.evaluate_targets'."""
    ratio = value / ref if ref else None
    ok = ratio is not None and (ratio >= threshold if op == ">=" else ratio <= threshold)
    return {"id": tid, "target": text, "status": "PASS" if ok else "MISS", "value": value,
            "reference": ref, "ratio": ratio, "op": op, "threshold": threshold, "unit": unit}
