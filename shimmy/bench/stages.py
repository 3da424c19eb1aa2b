"""Where a round trip's time goes, stage by stage (a profile, not a suite of ``shimmy bench``).

``python -m shimmy.bench.stages [--size 1m] [--n 1000] [--reps 3] [copy zc busy iox ...]``

The bench's ping-pong (client pinned to CPU 0, echo to CPU 1, the bench's ring size), with a
CLOCK_MONOTONIC timestamp (``perf_counter_ns``, comparable across processes) around each stage:
the client's publish, the hand-over to the echo (its wake-up or spin and its copy out), the
echo's publish, the hand-over back.  Per process it also reads ``/proc/self/schedstat`` (time
on CPU, time waiting on a run queue), getrusage (context switches, minor page faults) and the
subscription's own counters (``stats()["sleeps"]``).  Modes, alternated round by round:

- ``copy``: the bench's copy path (``publish`` / ``receive_bytes``, default spin);
- ``zc``: loan on both sides, view on both sides (the echo copies the view into its loan);
- ``busy``: ``publish``, and the receiver polls ``has_data`` without pause, then takes bytes
  (what the ring and the copies cost without the wait path);
- ``iox``: iceoryx2 busy-poll, as in the bench.

Shimmy's channels here choose ``rewind=True`` (spec/ring.md, "Rewind"), as the bench's rewind rows.
Medians over the round trips of a repetition, then over repetitions (docs/performance.md).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import time
from typing import Any

from . import harness, peers
from .runner import Context, _size

MODES = ("copy", "zc", "busy", "iox")
WARMUP = 50


def _counters() -> list[int]:
    with open(f"/proc/{os.getpid()}/schedstat") as fh:
        run_ns, wait_ns, _ = map(int, fh.read().split())
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return [run_ns, wait_ns, ru.ru_nvcsw, ru.ru_nivcsw, ru.ru_minflt]


def _endpoint(side: str, mode: str, daemon: str, size: int, n: int, q, barrier) -> None:
    harness.pin(0 if side == "a" else 1)
    sub: Any = None
    if mode == "iox":
        link = peers.IceoryxLink("pair", side, "stages", max_size=size)
        barrier.wait()
        link.accept()
        send, recv = link.send, link.recv
    else:
        import shimmy
        cap = Context.capacity_for(size)   # the bench's ring size for this message size
        rx, tx = ("stages/b2a", "stages/a2b") if side == "a" else ("stages/a2b", "stages/b2a")
        rx_ch = shimmy.Channel(rx, daemon=daemon, mode="reliable", capacity=cap, rewind=True)
        sub = rx_ch.subscribe()
        tx_ch = shimmy.Channel(tx, daemon=daemon, mode="reliable", capacity=cap, rewind=True)
        tx_ch.publish(b"")   # the publisher role now, not in the loop
        barrier.wait()
        sub.receive_nowait()
        send, recv = _shimmy_ends(mode, sub, tx_ch)
    data = peers.payload(size)
    stamps: list[tuple[int, ...]] = []
    now = time.perf_counter_ns
    c0: list[int] = []
    sleeps0 = 0
    for i in range(n + WARMUP):
        if i == WARMUP:
            stamps.clear()
            c0 = _counters()
            sleeps0 = sub.stats()["sleeps"] if sub is not None else 0
        if side == "a":
            t0 = now()
            send(data)
            t1 = now()
            recv()
            stamps.append((t0, t1, now()))
        else:
            got = recv()
            r0 = now()
            send(got)
            stamps.append((r0, now()))
    counters = [b - a for a, b in zip(c0, _counters(), strict=True)]
    sleeps = (sub.stats()["sleeps"] - sleeps0) if sub is not None else 0
    q.put((side, stamps, counters, sleeps))
    barrier.wait()   # both sides done before either closes its channels


def _shimmy_ends(mode: str, sub, tx_ch):
    """``(send, recv)`` of a shimmy endpoint in ``mode`` (copy, zc or busy)."""
    def recv_view():
        msg = sub.receive()
        while not msg.data:
            msg = sub.receive()
        return msg.data

    def send_loan(data):
        with tx_ch.loan(len(data)) as buf:
            buf[:] = data

    has_data, take, receive_bytes = sub._has_data, sub._take_bytes, sub.receive_bytes

    def recv_busy():
        while True:
            if has_data():
                got = take()
                if got:
                    return got

    def recv_copy():
        got = receive_bytes()
        while not got:
            got = receive_bytes()
        return got

    if mode == "zc":
        return send_loan, recv_view
    return tx_ch.publish, recv_busy if mode == "busy" else recv_copy


def _median(xs: list) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def measure(mode: str, daemon: str, size: int, n: int) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_endpoint, args=(s, mode, daemon, size, n, q, barrier))
             for s in "ab"]
    for p in procs:
        p.start()
    got = {}
    try:
        for _ in procs:
            side, stamps, counters, sleeps = q.get(timeout=120)
            got[side] = (stamps, counters, sleeps)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    a, b = got["a"][0], got["b"][0]
    m = len(a)
    out = {"round trip p50": _median([t2 - t0 for t0, _, t2 in a]) / 1e3,
           "round trip p99": sorted(t2 - t0 for t0, _, t2 in a)[int(m * 0.99)] / 1e3,
           "A publish": _median([t1 - t0 for t0, t1, _ in a]) / 1e3,
           "A->B (B waits, copies out)": _median([r0 - t1 for (_, t1, _), (r0, _)
                                                  in zip(a, b, strict=True)]) / 1e3,
           "B publish": _median([r1 - r0 for r0, r1 in b]) / 1e3,
           "B->A (A waits, copies out)": _median([t2 - r1 for (_, _, t2), (_, r1)
                                                  in zip(a, b, strict=True)]) / 1e3}
    for side in "ab":
        _, (run_ns, wait_ns, vcsw, ivcsw, minflt), sleeps = got[side]
        s = side.upper()
        out[f"{s} on CPU /rt"] = run_ns / m / 1e3
        out[f"{s} run-queue wait /rt"] = wait_ns / m / 1e3
        out[f"{s} sleeps /rt"] = sleeps / m
        out[f"{s} voluntary switches /rt"] = vcsw / m
        out[f"{s} preemptions /rt"] = ivcsw / m
        out[f"{s} minor faults /rt"] = minflt / m
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m shimmy.bench.stages", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("modes", nargs="*", default=["copy", "zc", "iox"], choices=MODES)
    p.add_argument("--size", default="1m", help="message size (k/m suffix ok; default 1m)")
    p.add_argument("--n", type=int, default=1000, help="round trips per repetition")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    size = _size(args.size)
    if "iox" in args.modes and not peers.iceoryx2_status()[0]:
        p.error("iceoryx2 does not import (pip install iceoryx2), leave out iox")
    daemon = harness.Daemon().start()
    rows: dict[str, list[dict]] = {m: [] for m in args.modes}
    try:
        for _ in range(args.reps):
            for mode in args.modes:
                rows[mode].append(measure(mode, daemon.socket, size, args.n))
    finally:
        daemon.stop()
    print(f"size {size} B, {args.n} round trips x {args.reps}, load average {os.getloadavg()}")
    print(f"{'median (us unless /rt counts)':34}" + "".join(f"{m:>10}" for m in args.modes))
    for key in rows[args.modes[0]][0]:
        print(f"{key:34}" + "".join(f"{_median([r[key] for r in rows[m]]):10.2f}"
                                     for m in args.modes))


if __name__ == "__main__":
    main()
