"""Recorded channels (docs/recording.md): what recording costs, how fast it writes, how fast a
recording replays.  Four same-run ratios, repetitions interleaved, medians:

- recording cost: a publisher's msgs/s at 4 KiB into a reliable channel read by one subscriber,
  with a reliable ``shimmy record`` process attached (A) and without (B): A/B >= 0.8;
- disk rate: the recorder writing a full 256 MiB ring's backlog (its own writes, the ring's
  frames) vs a plain loop of ``os.write`` calls of the recorder's run size (1 MiB), as many
  bytes, into the same directory: >= 0.8;
- replay: reading a recording (``subscribe(start="recorded")``, every message copied out with
  ``receive_many`` in batches of 1,000, just after it was written) vs ``XRANGE`` over the same
  messages in a local redis-server (pages of 1,000; the Redis row is skipped, with the reason,
  when redis-server or redis-py is missing): >= 10x;
- warm replay: the same read again (the recording in the page cache) vs the live ring's copy
  path (``receive_many`` of the same messages from a full ring, no publisher running): >= 0.5x.

Processes: publisher, subscriber and recorder are separate processes (the publisher and the
subscriber pinned like the other suites); the replay and ring-copy readers run in this process.
The recordings go to a temporary directory on the filesystem of ``$TMPDIR``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from . import harness, peers, report

SIZE = 4096
PUBLISH_N = 50_000          # messages per recording-cost measurement (200 MiB at 4 KiB)
BACKLOG_RING = 1 << 28      # the disk-rate run records this much backlog
REPLAY_N = 50_000           # messages read back per replay measurement
RUN_BYTES = 1 << 20         # the recorder's run size (recorder.CHUNK_BYTES): the plain loop's

_PUBLISHER = """
import sys, time, shimmy
sock, name, n, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ch = shimmy.Channel(name, daemon=sock)
data = bytes(size)
sys.stdin.readline()                 # go
t0 = time.perf_counter()
for _ in range(n):
    ch.publish(data, timeout=60)
print(time.perf_counter() - t0, flush=True)
ch.close()
"""

_SUBSCRIBER = """
import sys, shimmy
sock, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
ch = shimmy.Channel(name, daemon=sock)
sub = ch.subscribe()
print("ready", flush=True)
got = 0
while got < n:
    got += len(sub.receive_many(1024, timeout=60))
print("done", flush=True)
ch.close()
"""


def _pinned(cpu: int, code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(["taskset", "-c", str(cpu), sys.executable, "-c", code, *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _recorder(sock: str, root: str, name: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shimmy.cli", "record", name, "--dir", root,
                             "--daemon", sock], stderr=subprocess.DEVNULL)


def _wait_catalog(root: str, name: str, want: int = 0, timeout: float = 120.0) -> dict:
    from shimmy import recording
    track = os.path.join(recording.channel_dir(root, name), recording.MAIN_TRACK)
    deadline = time.monotonic() + timeout
    while True:
        try:
            cat = recording.Catalog(track)
            s = cat.summary()
            cat.close()
            if s["next_seq"] >= want:
                return s
        except (OSError, recording.RecordingError):
            pass
        if time.monotonic() > deadline:
            raise harness.BenchError(f"recording of {name} did not reach {want} in {timeout} s")
        time.sleep(0.01)


def _delete(ctx, name: str) -> None:
    """Give the channel's ring back now (a closed channel lingers for idle_channel_ttl, and the
    quarter-GiB rings of several repetitions would pass the run's shm quota)."""
    from shimmy.sdk.client import get_client
    get_client(ctx.daemon).request("delete", name=name)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _publish_rate(ctx, root: str, tag: str, recorded: bool) -> float:
    """Publisher msgs/s at SIZE with one subscriber (and a recorder when ``recorded``)."""
    import shimmy
    name = f"bench.rec.{tag}"
    ch = shimmy.Channel(name, daemon=ctx.daemon, mode="reliable")
    rec = None
    try:
        if recorded:
            rec = _recorder(ctx.daemon, root, name)
            _wait_catalog(root, name)
        sub = _pinned(ctx.cpu_b, _SUBSCRIBER, ctx.daemon, name, str(PUBLISH_N))
        assert sub.stdout is not None and sub.stdin is not None
        sub.stdout.readline()
        pub = _pinned(ctx.cpu_a, _PUBLISHER, ctx.daemon, name, str(PUBLISH_N), str(SIZE))
        assert pub.stdout is not None and pub.stdin is not None
        pub.stdin.write("\n")
        pub.stdin.flush()
        elapsed = float(pub.stdout.readline())
        pub.wait(60)
        sub.stdout.readline()
        sub.wait(60)
        if rec is not None:
            _wait_catalog(root, name, PUBLISH_N)
        return PUBLISH_N / elapsed
    finally:
        if rec is not None:
            _stop(rec)
        ch.close()
        _delete(ctx, name)


def _recorder_rate(ctx, root: str, tag: str) -> tuple[float, int]:
    """(recorder bytes/s writing a full ring's backlog, bytes it wrote)."""
    import shimmy
    name = f"bench.disk.{tag}"
    # Reliable, and nobody subscribed yet: the publisher fills the ring without waiting.
    ch = shimmy.Channel(name, daemon=ctx.daemon, mode="reliable", capacity=BACKLOG_RING)
    data = bytes(SIZE)
    n = BACKLOG_RING // (SIZE + 16) - 64
    ch.publish_many(data for _ in range(n))
    try:
        rec = _recorder(ctx.daemon, root, name)
        try:
            first = _wait_catalog(root, name, 1)
            last = _wait_catalog(root, name, n)
            # From the first run's commit to the last's: the recorder's own pace, its start-up
            # (process, attach) left out.
            written = last["bytes"] - (first["bytes"])
            rate = written / ((last["newest_ns"] - first["newest_ns"]) / 1e9)
        finally:
            _stop(rec)
    finally:
        ch.close()
        _delete(ctx, name)
    return rate, written


def _plain_rate(root: str, nbytes: int, tag: str) -> float:
    """A plain loop of ``os.write`` calls of the recorder's run size, ``nbytes`` in all (the
    file is kept until the repetition ends, as the recording is: both leave dirty pages)."""
    path = os.path.join(root, f"plain-{tag}")
    buf = memoryview(bytes(RUN_BYTES))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        left = nbytes
        t = time.perf_counter()
        while left > 0:
            left -= os.write(fd, buf[:min(left, RUN_BYTES)])
        return nbytes / (time.perf_counter() - t)
    finally:
        os.close(fd)


def _disk_rates(ctx, root: str, tag: str, plain_first: bool) -> tuple[float, float]:
    """(recorder bytes/s, plain write loop bytes/s) over the same number of bytes, in the order
    given (alternated over repetitions: the page cache's writeback favours neither)."""
    nbytes = (BACKLOG_RING // (SIZE + 16) - 65) * (SIZE + 16)
    try:
        plain = _plain_rate(root, nbytes, tag) if plain_first else 0.0
        rec, written = _recorder_rate(ctx, root, tag)
        if not plain_first:
            plain = _plain_rate(root, written, tag)
    finally:
        os.unlink(os.path.join(root, f"plain-{tag}"))
    return rec, plain


BATCH = 1000   # messages per receive_many call (and per XRANGE page)


def _replay_rate(ctx, root: str, name: str) -> float:
    """A recording read back into a subscriber: ``subscribe(start="recorded")``, every message
    copied out with ``receive_many``."""
    import shimmy
    ch = shimmy.Channel(name, daemon=ctx.daemon)
    try:
        with ch.subscribe(start="recorded", recording=root) as sub:
            got = 0
            t = time.perf_counter()
            while got < REPLAY_N:
                got += len(sub.receive_many(min(BATCH, REPLAY_N - got), timeout=10))
            return got / (time.perf_counter() - t)
    finally:
        ch.close()


def _ring_copy_rate(ctx, tag: str) -> float:
    """The live ring's copy path over the same number of messages: a full ring (no publisher
    running) read with ``receive_many``."""
    import shimmy
    name = f"bench.copy.{tag}"
    ch = shimmy.Channel(name, daemon=ctx.daemon, mode="reliable",
                        capacity=1 << (((SIZE + 16) * REPLAY_N).bit_length()))
    try:
        sub = ch.subscribe()
        ch.publish_many(bytes(SIZE) for _ in range(REPLAY_N))
        got = 0
        t = time.perf_counter()
        while got < REPLAY_N:
            got += len(sub.receive_many(min(BATCH, REPLAY_N - got), timeout=10))
        rate = got / (time.perf_counter() - t)
        sub.close()
        return rate
    finally:
        ch.close()
        _delete(ctx, name)


def _redis_rate(n: int) -> tuple[float | None, str | None]:
    addr = peers.redis_address()
    if addr is None:
        return None, ("no redis-server in this run (apt-get install redis-server; pip install "
                      "redis)")
    import redis
    r = redis.Redis(host=addr[0], port=addr[1])
    key = f"shimmy-bench-record-{os.getpid()}"
    r.delete(key)
    data = bytes(SIZE)
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        pipe.xadd(key, {"d": data})
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()
    t = time.perf_counter()
    got, start = 0, "-"
    while got < n:
        page: Any = r.xrange(key, min=start, max="+", count=BATCH)
        if not page:
            break
        for _, fields in page:
            bytes(fields[b"d"])
        got += len(page)
        start = "(" + page[-1][0].decode()
    rate = got / (time.perf_counter() - t)
    r.delete(key)
    return rate, None


def run(ctx) -> dict:
    med = harness.median
    cost: dict[bool, list[float]] = {True: [], False: []}
    disk: list[tuple[float, float]] = []
    replay_first: list[float] = []
    replay_warm: list[float] = []
    ring_copy: list[float] = []
    redis_rates: list[float] = []
    redis_skip = None
    with tempfile.TemporaryDirectory(prefix="shimmy-bench-record-") as root:
        for rep in range(ctx.reps):
            for recorded in (False, True) if rep % 2 == 0 else (True, False):
                cost[recorded].append(_publish_rate(ctx, root, f"{rep}{int(recorded)}",
                                                    recorded))
            disk.append(_disk_rates(ctx, root, str(rep), plain_first=rep % 2 == 1))
            from shimmy import recording
            shutil.rmtree(recording.channel_dir(root, f"bench.disk.{rep}"))
            # Replay: the recording the cost run just wrote (PUBLISH_N messages of SIZE), read
            # once just after it was written, then again (warm: in the page cache).
            name = f"bench.rec.{rep}1"
            replay_first.append(_replay_rate(ctx, root, name))
            replay_warm.append(_replay_rate(ctx, root, name))
            from shimmy import recording
            for k in (0, 1):
                shutil.rmtree(recording.channel_dir(root, f"bench.rec.{rep}{k}"),
                              ignore_errors=True)
            ring_copy.append(_ring_copy_rate(ctx, str(rep)))
            rate, redis_skip = _redis_rate(REPLAY_N)
            if rate is not None:
                redis_rates.append(rate)
            ctx.log(f"  record rep {rep + 1}/{ctx.reps} done")
    with_rec, without = med(cost[True]), med(cost[False])
    rec_disk, plain = med([d[0] for d in disk]), med([d[1] for d in disk])
    first, warm, copy_rate = med(replay_first), med(replay_warm), med(ring_copy)
    redis_rate = med(redis_rates) if redis_rates else None
    rows = [
        ["publisher msgs/s, reliable recorder attached (A) vs not (B)", report.fmt_size(SIZE),
         f"{with_rec:,.0f}", f"{without:,.0f}", f"{with_rec / without:.3f}x"],
        ["recorder MB/s writing a ring's backlog (A) vs plain 1 MiB write loop (B)", "-",
         f"{rec_disk / 1e6:,.0f}", f"{plain / 1e6:,.0f}", f"{rec_disk / plain:.3f}x"],
        ["replay msgs/s, first read after recording (A) vs Redis XRANGE (B)",
         report.fmt_size(SIZE), f"{first:,.0f}", f"{redis_rate:,.0f}" if redis_rate else "skipped",
         f"{first / redis_rate:.2f}x" if redis_rate else "-"],
        ["warm replay msgs/s (A) vs live ring copy path (B)", report.fmt_size(SIZE),
         f"{warm:,.0f}", f"{copy_rate:,.0f}", f"{warm / copy_rate:.3f}x"],
    ]
    targets = [
        report._target("record-cost", "publisher at 4 KiB with a reliable recorder >= 0.8x "
                       "without", with_rec, without, ">=", 0.8, "msgs/s"),
        report._target("record-disk", "recorder disk rate >= 0.8x a plain sequential write "
                       "loop (same size, same filesystem)", rec_disk, plain, ">=", 0.8, "B/s"),
        report._target("record-replay-redis", "replay >= 10x Redis XRANGE over the same "
                       "messages" + (f" (skipped: {redis_skip})" if redis_skip else ""),
                       first, redis_rate, ">=", 10.0, "msgs/s", note=redis_skip or ""),
        report._target("record-replay-warm", "warm replay >= 0.5x the live ring's copy rate at "
                       "4 KiB", warm, copy_rate, ">=", 0.5, "msgs/s"),
    ]
    table = "\nRECORDED CHANNELS (medians)\n" + report._table(
        rows, ["measurement", "size", "A", "B", "ratio"])
    return {"results": [
        {"what": "cost", "size": SIZE, "with_recorder_msgs_per_s": with_rec,
         "without_msgs_per_s": without},
        {"what": "disk", "recorder_bytes_per_s": rec_disk, "plain_write_bytes_per_s": plain},
        {"what": "replay", "size": SIZE, "replay_msgs_per_s": first, "warm_msgs_per_s": warm,
         "redis_xrange_msgs_per_s": redis_rate, "ring_copy_msgs_per_s": copy_rate}],
        "targets": targets, "table": table, "failed": {},
        "raw": {"cost": {str(k): v for k, v in cost.items()}, "disk": disk,
                "replay_first": replay_first, "replay_warm": replay_warm, "ring_copy": ring_copy,
                "redis": redis_rates},
        "placement": f"publisher on CPU {ctx.cpu_a}, subscriber on CPU {ctx.cpu_b}, recorder "
                     f"and readers unpinned"}
