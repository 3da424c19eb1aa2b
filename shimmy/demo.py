"""``shimmy demo``: an embedded daemon, one publisher and two subscriber processes, live progress,
then the same workload over ZeroMQ ipc for comparison.  Needs no config and no root; everything
it creates lives in a temporary directory (and the daemon's rings, which it unlinks on exit).

Each transport runs two phases with the same processes:
  1. throughput - the publisher sends as fast as the transport lets it (reliable delivery: every
     subscriber must get every message), for half the time;
  2. latency - the publisher sends one message every 200 µs carrying its send time; subscribers
     record receive time minus send time (CLOCK_MONOTONIC is shared by all processes).
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

STAMP = struct.Struct("<qq")   # phase-1 counter or -1 for phase 2, send time in ns
LATENCY_GAP = 0.0002
END = -2
PHASE = -3    # end of the throughput phase: subscribers report, the publisher waits for both


def _latency_ratio(shimmy_us: float, peer_us: float) -> str:
    """'2.5x lower' or '1.2x higher': shimmy's latency against the peer's, never a ratio below 1
    called lower."""
    if not shimmy_us or not peer_us:
        return "-"
    if peer_us >= shimmy_us:
        return f"{peer_us / shimmy_us:.1f}x lower"
    return f"{shimmy_us / peer_us:.1f}x higher"


def _percentiles(samples: list[int]) -> dict:
    if not samples:
        return {"p50": 0.0, "p99": 0.0, "p999": 0.0}
    s = sorted(samples)

    def pick(q: float) -> float:
        return s[min(len(s) - 1, int(q * len(s)))] / 1000.0
    return {"p50": pick(0.50), "p99": pick(0.99), "p999": pick(0.999)}


# -- the workload, whatever carries it -------------------------------------------------------
def _run_publisher(send, size: int, seconds: float, progress) -> None:
    payload = bytearray(size)
    n = 0
    end = time.monotonic() + seconds / 2
    while time.monotonic() < end:
        for _ in range(256):
            STAMP.pack_into(payload, 0, n, 0)
            send(payload)
            n += 1
        progress[0] = n
    _end_throughput_phase(send, payload, progress)
    _latency_phase(send, payload, seconds / 2)
    STAMP.pack_into(payload, 0, END, 0)
    send(payload)


def _run_subscriber(next_data, index: int, progress, results) -> None:
    """Count phase-1 messages, collect phase-2 latencies; ``next_data()`` returns a message's
    bytes (any buffer) or None when nothing came for a long time."""
    got, lat, t_first, t_last = 0, [], None, None
    while True:
        data = next_data()
        if data is None:
            break
        counter, sent = STAMP.unpack_from(data)
        if counter == END:
            break
        if counter == PHASE:
            progress[index] = got
            progress[index + 2] = 1
        elif counter >= 0:
            got += 1
            t_last = time.perf_counter()
            t_first = t_first or t_last
            if got % 4096 == 0:
                progress[index] = got
        else:
            lat.append(time.monotonic_ns() - sent)
    progress[index] = got
    results.put((index, got, (t_last or 0) - (t_first or 0), lat))


def _end_throughput_phase(send, payload: bytearray, progress) -> None:
    """Mark the end of phase 1 and wait (bounded) until both subscribers drained it, so that
    latency samples measure delivery, not the backlog."""
    STAMP.pack_into(payload, 0, PHASE, 0)
    send(payload)
    deadline = time.monotonic() + 60
    while not (progress[3] and progress[4]) and time.monotonic() < deadline:
        time.sleep(0.01)


def _latency_phase(send, payload: bytearray, seconds: float) -> None:
    """One message every LATENCY_GAP (slept, not spun: the publisher must not hog a core)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(LATENCY_GAP)
        STAMP.pack_into(payload, 0, -1, time.monotonic_ns())
        send(payload)


# -- shimmy ------------------------------------------------------------------------------------
def _shimmy_pub(sock: str, size: int, seconds: float, progress) -> None:
    import shimmy
    with shimmy.Channel("demo/stream", daemon=sock) as ch:
        _run_publisher(ch.publish, size, seconds, progress)


def _shimmy_sub(sock: str, index: int, ready, progress, results) -> None:
    import shimmy
    with shimmy.Channel("demo/stream", daemon=sock) as ch, ch.subscribe() as sub:
        ready.set()

        def next_data():
            try:
                return sub.receive(timeout=10).data
            except TimeoutError:
                return None
        _run_subscriber(next_data, index, progress, results)


# -- ZeroMQ: the same workload, PUB/SUB over ipc with a high-water mark of 0 (no drops) -------
def _zmq_pub(endpoint: str, size: int, seconds: float, progress, subs_ready) -> None:
    import zmq
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUB)
    s.setsockopt(zmq.SNDHWM, 0)
    s.bind(endpoint)
    subs_ready.wait(10)
    time.sleep(0.3)  # slow-joiner: let subscriptions propagate
    _run_publisher(lambda b: s.send(b, copy=True), size, seconds, progress)
    s.close(linger=5000)
    ctx.term()


def _zmq_sub(endpoint: str, index: int, ready, progress, results) -> None:
    import zmq
    ctx = zmq.Context()
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.RCVHWM, 0)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.connect(endpoint)
    ready.set()
    _run_subscriber(lambda: s.recv(copy=False).buffer if s.poll(10_000) else None, index,
                    progress, results)
    s.close(0)
    ctx.term()


def _run_transport(label: str, pub_target, pub_args, sub_target, sub_arg, size: int,
                   seconds: float) -> dict:
    ctx = mp.get_context("spawn")
    progress = ctx.Array("q", 5, lock=False)  # published, received x2, phase-1 done x2
    results = ctx.Queue()
    readies = [ctx.Event() for _ in range(2)]
    subs = [ctx.Process(target=sub_target, args=(sub_arg, i + 1, readies[i], progress, results),
                        daemon=True) for i in range(2)]
    for p in subs:
        p.start()
    for ev in readies:
        if not ev.wait(30):
            raise RuntimeError(f"{label}: a subscriber did not start")
    all_ready = ctx.Event()
    all_ready.set()
    extra = (all_ready,) if pub_target is _zmq_pub else ()
    pub = ctx.Process(target=pub_target, args=(*pub_args, size, seconds, progress, *extra),
                      daemon=True)
    t0 = time.monotonic()
    pub.start()
    tty = sys.stdout.isatty()
    while pub.is_alive():
        pub.join(0.5)
        line = (f"  {label:<8} {time.monotonic() - t0:5.1f}s  published {progress[0]:>10,}  "
                f"received {progress[1]:>10,} / {progress[2]:>10,}")
        print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
    if tty:
        print()
    out = {}
    for _ in subs:
        index, got, span, lat = results.get(timeout=60)
        out[index] = (got, span, lat)
    for p in subs:
        p.join(10)
    published = progress[0]
    rates = [got / span if span > 0 else 0.0 for got, span, _ in out.values()]
    lat_all = [x for _, _, lat in out.values() for x in lat]
    complete = all(got == published for got, _, _ in out.values())
    return {"published": published, "complete": complete,
            "rate": min(rates) if rates else 0.0,
            "bytes_per_s": (min(rates) if rates else 0.0) * size,
            "latency_us": _percentiles(lat_all)}


def run_demo(seconds: float = 3.0, size: int = 256) -> int:
    workdir = tempfile.mkdtemp(prefix="shimmy-demo-")
    sock = os.path.join(workdir, "shimmyd.sock")
    print(f"shimmy demo: embedded daemon at {sock}; 1 publisher + 2 subscribers, "
          f"{size}-byte messages, {seconds:g} s per transport")
    log = open(os.path.join(workdir, "daemon.log"), "wb")
    daemon = subprocess.Popen([sys.executable, "-m", "shimmy.cli", "daemon", "--socket", sock],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(sock + ".session"):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the embedded daemon did not start; see " + log.name)
            time.sleep(0.02)
        shimmy_r = _run_transport("shimmy", _shimmy_pub, (sock,), _shimmy_sub, sock, size,
                                  seconds)
        zmq_r = None
        if importlib.util.find_spec("zmq") is not None:   # pyzmq: the `demo` extra
            zmq_r = _run_transport("zeromq", _zmq_pub, ("ipc://" + os.path.join(workdir, "zmq"),),
                                   _zmq_sub, "ipc://" + os.path.join(workdir, "zmq"), size, seconds)
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(10)
        except subprocess.TimeoutExpired:
            daemon.kill()
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)
    _print_table(shimmy_r, zmq_r)
    if zmq_r is None:
        print("(no ZeroMQ column: pyzmq is not installed; pip install 'shimmy[demo]')")
    return 0 if shimmy_r["complete"] else 1


def _print_table(a: dict, b: dict | None) -> None:
    rows = [
        ("", "shimmy", "zeromq ipc", "ratio"),
        ("messages/s per subscriber", f"{a['rate']:,.0f}", *(
            (f"{b['rate']:,.0f}", f"{a['rate'] / b['rate']:.1f}x" if b["rate"] else "-")
            if b else ("-", "-"))),
        ("MB/s per subscriber", f"{a['bytes_per_s'] / 1e6:,.1f}",
         f"{b['bytes_per_s'] / 1e6:,.1f}" if b else "-", ""),
        ("all messages delivered", str(a["complete"]), str(b["complete"]) if b else "-", ""),
    ]
    for q in ("p50", "p99", "p999"):
        x = a["latency_us"][q]
        if b:
            y = b["latency_us"][q]
            rows.append((f"latency {q} (µs)", f"{x:,.1f}", f"{y:,.1f}", _latency_ratio(x, y)))
        else:
            rows.append((f"latency {q} (µs)", f"{x:,.1f}", "-", "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print()
    for r in rows:
        print("  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                               enumerate(zip(r, widths, strict=True))))
    print("\n(one run on a shared machine: `shimmy bench` repeats and reports medians)")
