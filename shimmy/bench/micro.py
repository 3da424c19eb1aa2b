"""Single-process cost of shimmy's hot paths (no second process, no waiting), for profiling.

    python -m shimmy.bench.micro [--size 64] [--n 200000] [--profile publish|receive|loan|view]
    python -m shimmy.bench.micro --two-process --size 4096 [--seconds 1]

Starts a private daemon, opens one reliable channel, and times batches of ``publish`` followed
by the same number of ``receive_nowait``/``receive`` calls, so each phase is measured alone:
publish never waits for room (the batch fits the ring) and receive never waits for a message.
``--profile`` runs the chosen phase under cProfile and prints the top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time

from . import harness


def _phases(ch, sub, size: int, n: int, batch: int) -> dict:
    data = b"x" * size
    publish, receive, nowait = ch.publish, sub.receive, sub.receive_nowait
    t = {"publish": 0.0, "receive+bytes": 0.0, "receive_nowait+bytes": 0.0, "loan": 0.0,
         "receive+view": 0.0}
    done = 0
    pc = time.process_time  # CPU time: robust against other tenants on a shared machine
    while done < n:
        t0 = pc()
        for _ in range(batch):
            publish(data)
        t1 = pc()
        for _ in range(batch):
            bytes(receive(1.0))
        t2 = pc()
        for _ in range(batch):
            publish(data)
        t3 = pc()
        for _ in range(batch):
            bytes(nowait())
        t4 = pc()
        for _ in range(batch):
            with ch.loan(size) as buf:
                buf[:] = data
        t5 = pc()
        for _ in range(batch):
            len(receive(1.0).data)
        t6 = pc()
        t["publish"] += (t1 - t0) + (t3 - t2)
        t["receive+bytes"] += t2 - t1
        t["receive_nowait+bytes"] += t4 - t3
        t["loan"] += t5 - t4
        t["receive+view"] += t6 - t5
        done += batch
    per = {k: v / (2 * n if k == "publish" else n) * 1e6 for k, v in t.items()}
    return per


def _profile(ch, sub, size: int, n: int, batch: int, which: str) -> str:
    data = b"x" * size
    prof = cProfile.Profile()
    done = 0
    while done < n:
        if which == "loan":
            prof.enable()
            for _ in range(batch):
                with ch.loan(size) as buf:
                    buf[:] = data
            prof.disable()
        elif which == "publish":
            prof.enable()
            for _ in range(batch):
                ch.publish(data)
            prof.disable()
        else:
            for _ in range(batch):
                ch.publish(data)
        if which in ("receive", "view"):
            prof.enable()
            for _ in range(batch):
                m = sub.receive(1.0)
                bytes(m) if which == "receive" else len(m.data)
            prof.disable()
        else:
            for _ in range(batch):
                sub.receive(1.0)
        done += batch
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(14)
    return s.getvalue()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m shimmy.bench.micro")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--profile", choices=["publish", "receive", "loan", "view"])
    p.add_argument("--cpu", type=int, default=0)
    p.add_argument("--two-process", action="store_true",
                   help="profile both sides of the throughput suite (CPU 0 -> CPU 1) instead")
    p.add_argument("--seconds", type=float, default=1.0)
    args = p.parse_args(argv)
    if args.two_process:
        print(profile_throughput(args.size, args.seconds))
        return 0
    harness.pin(args.cpu)
    import shimmy
    daemon = harness.Daemon().start()
    try:
        capacity = 1 << 22 if args.size <= 4096 else 1 << 26
        batch = max(1, min(1000, (capacity // 2) // (args.size + 32)))
        with shimmy.Channel("bench/micro", daemon=daemon.socket, capacity=capacity) as ch:
            sub = ch.subscribe()
            _phases(ch, sub, args.size, min(args.n, 20 * batch), batch)  # warm-up
            if args.profile:
                print(_profile(ch, sub, args.size, args.n, batch, args.profile))
            else:
                per = _phases(ch, sub, args.size, args.n, batch)
                print(f"size {args.size} B, {args.n} messages per phase, batch {batch}, "
                      f"pinned to CPU {args.cpu}, python {sys.version.split()[0]}; "
                      f"CPU time per message")
                for k, v in per.items():
                    print(f"  {k:22s} {v:8.3f} us/message")
            sub.close()
    finally:
        daemon.stop()
        harness.cleanup_all()
    return 0



# -- two-process profiling: run a suite's worker function under cProfile -------------------------

def profiled(ctl, target_module: str, target_func: str, **kwargs):
    """Worker-side wrapper: run ``target_module.target_func(ctl, **kwargs)`` under cProfile;
    return its result and the top of the profile (sorted by internal time)."""
    import importlib
    fn = getattr(importlib.import_module(target_module), target_func)
    prof = cProfile.Profile()
    prof.enable()
    try:
        out = fn(ctl, **kwargs)
    finally:
        prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(12)
    return {"result": out, "profile": s.getvalue()}


def profile_throughput(size: int = 64, seconds: float = 1.0, zero_copy: bool = False) -> str:
    """Profile both sides of the shimmy throughput measurement (sender CPU 0, receiver CPU 1)."""
    daemon = harness.Daemon().start()
    tx, rx = harness.Worker("prof-tx", 0), harness.Worker("prof-rx", 1)
    try:
        opts = {"daemon": daemon.socket, "capacity": None, "zero_copy": zero_copy}
        name = f"bench/prof/{size}"
        common = dict(transport="shimmy", name=name, opts=opts)
        s, r = harness.run_pair(rx, tx, "shimmy.bench.micro", "profiled", "profiled",
                                dict(target_module="shimmy.bench.throughput",
                                     target_func="receiver", **common),
                                dict(target_module="shimmy.bench.throughput",
                                     target_func="sender", size=size, seconds=seconds, **common),
                                seconds)
        rate = r["result"]["n"] / r["result"]["elapsed_s"]
        return (f"shimmy throughput {size} B zero_copy={zero_copy}: {rate:,.0f} msgs/s under "
                f"cProfile\n--- sender ---\n{s['profile']}\n--- receiver ---\n{r['profile']}")
    finally:
        harness.close_all([tx, rx])
        daemon.stop()


if __name__ == "__main__":
    sys.exit(main())
