"""Many publishers on one channel, on one node: real publisher and subscriber processes, a real
daemon.  Every message is checksummed and names its publisher and its number, so a subscriber
checks integrity, per-publisher order and (lossy) per-publisher loss on its own.

Run as a script, this file is the worker: ``python test_multipub.py pub|sub ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
import zlib

HEAD = struct.Struct("<III")   # publisher tag, message number, crc32 of the filler


def make(tag: int, i: int) -> bytes:
    filler = bytes(((tag * 131 + i * 7 + k) & 0xFF) for k in range(8 + (i * 37) % 200))
    return HEAD.pack(tag, i, zlib.crc32(filler)) + filler


def check(data: bytes) -> tuple[int, int]:
    tag, i, crc = HEAD.unpack_from(data)
    filler = data[HEAD.size:]
    if zlib.crc32(filler) != crc or filler != make(tag, i)[HEAD.size:]:
        raise SystemExit(f"torn message: tag {tag} number {i}")
    return tag, i


def run_pub(a) -> None:
    import shimmy
    ch = shimmy.Channel(a.channel, daemon=a.daemon, mode=a.mode, capacity=a.capacity,
                        max_publishers=a.max_publishers)
    gap = 1.0 / a.rate if a.rate else 0.0
    i = 0
    try:
        while a.count == 0 or i < a.count:   # count 0: until killed
            ch.publish(make(a.tag, i))
            if i == 0 and a.ready:
                open(a.ready, "w").close()
            i += 1
            if gap:
                time.sleep(gap)
    except shimmy.PublisherBusy as exc:
        print(json.dumps({"busy": str(exc)}))
        return
    deadline = time.monotonic() + 120
    while a.hold and not os.path.exists(a.hold) and time.monotonic() < deadline:
        time.sleep(0.02)   # stay attached (and so published) until told
    print(json.dumps({"published": i, "publisher": ch.publisher_id}))
    ch.close()


def run_sub(a) -> None:
    import shimmy
    ch = shimmy.Channel(a.channel, daemon=a.daemon, mode=a.mode, capacity=a.capacity,
                        max_publishers=a.max_publishers)
    sub = ch.subscribe(a.start)
    if a.ready:
        open(a.ready, "w").close()
    want = {int(t): int(n) for t, n in (x.split(":") for x in a.want.split(","))} if a.want else {}
    last: dict[int, int] = {}        # tag -> message number received last
    first: dict[int, int] = {}
    got: dict[int, int] = {}
    pubs: dict[int, int] = {}        # tag -> publisher id
    nodes: dict[int, str | None] = {}
    deadline = time.monotonic() + a.timeout
    n = 0
    while time.monotonic() < deadline:
        if want and all(last.get(t, -1) == c - 1 for t, c in want.items()):
            break
        try:
            if a.mode == "lossy":
                # The copy path: a message overwritten while copied is skipped and counted lost.
                data = sub.receive_bytes(timeout=a.idle)
                seq, publisher = sub.last_seq, sub.last_publisher
            else:
                msg = sub.receive(timeout=a.idle)
                data, seq, publisher = bytes(msg), msg.seq, msg.publisher
                nodes[check(data)[0]] = msg.node
                if msg.lost:
                    raise SystemExit(f"publisher {publisher}: reliable channel lost {msg.lost}")
                msg.release()
        except shimmy.ReceiveTimeout:
            if want:
                continue
            break
        tag, i = check(data)
        if seq != i:
            raise SystemExit(f"tag {tag}: message {i} has seq {seq}")
        if pubs.setdefault(tag, publisher) != publisher:
            raise SystemExit(f"tag {tag}: publisher id changed {pubs[tag]} -> {publisher}")
        prev = last.get(tag)
        if prev is None:
            first[tag] = i
        elif a.mode == "reliable" and i != prev + 1:
            raise SystemExit(f"tag {tag}: {i} after {prev}")
        elif i <= prev:
            raise SystemExit(f"tag {tag}: {i} after {prev}: out of order")
        last[tag] = i
        got[tag] = got.get(tag, 0) + 1
        n += 1
        if a.slow and n % 100 == 0:
            time.sleep(a.slow)
    by_pub = sub.lost_by_publisher() if hasattr(sub, "lost_by_publisher") else {}
    lost = {tag: by_pub.get(p, 0) for tag, p in pubs.items()}   # the library's count
    print(json.dumps({"got": got, "lost": lost, "first": first, "last": last, "pubs": pubs,
                      "lost_total": sub.lost, "nodes": nodes}))
    ch.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=["pub", "sub"])
    p.add_argument("--daemon", required=True)
    p.add_argument("--channel", required=True)
    p.add_argument("--mode", default="reliable")
    p.add_argument("--capacity", type=int)
    p.add_argument("--max-publishers", type=int)
    p.add_argument("--tag", type=int, default=0)
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--want", default="", help="tag:count,... the subscriber waits for")
    p.add_argument("--start", default="next")
    p.add_argument("--idle", type=float, default=3.0)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--slow", type=float, default=0.0)
    p.add_argument("--ready")
    p.add_argument("--hold", help="publisher: stay attached until this file exists")
    a = p.parse_args()
    run_pub(a) if a.role == "pub" else run_sub(a)


if __name__ == "__main__":
    main()
    sys.exit(0)

import pytest  # noqa: E402

import shimmy  # noqa: E402
from shimmy.names import object_token  # noqa: E402

SELF = os.path.abspath(__file__)


def spawn(daemon, role: str, channel: str, *args: str, **kw) -> subprocess.Popen:
    cmd = [sys.executable, SELF, role, "--daemon", daemon.socket, "--channel", channel, *args]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result(proc: subprocess.Popen, timeout: float = 180) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{err[-3000:]}"
    return json.loads(out.strip().splitlines()[-1])


def wait_files(paths, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    for path in paths:
        while not os.path.exists(path):
            assert time.monotonic() < deadline, f"{path} never appeared"
            time.sleep(0.01)


def start_subs(daemon, tmp_path, channel: str, n: int, **kw) -> list[subprocess.Popen]:
    ready = [str(tmp_path / f"sub{k}.ready") for k in range(n)]
    subs = [spawn(daemon, "sub", channel, ready=r, **kw) for r in ready]
    wait_files(ready)
    return subs


def member_rings(daemon, channel: str) -> list[str]:
    """The rings of ``channel``'s publishers left in /dev/shm: every ring object of the daemon
    but the channel's own (member rings are named by the token of their peer alias)."""
    own = daemon.prefix + object_token(channel)
    return [e for e in daemon.shm_objects() if not e.startswith("sem.") and e != own]


def fan_in(daemon, tmp_path, pubs: int, count: int, mode: str, capacity: int, **sub_kw):
    want = ",".join(f"{t}:{count}" for t in range(pubs))
    common = dict(mode=mode, capacity=capacity, max_publishers=pubs)
    subs = start_subs(daemon, tmp_path, "fan", 3, want=want, **common, **sub_kw)
    procs = [spawn(daemon, "pub", "fan", tag=t, count=count, **common) for t in range(pubs)]
    published = [result(p) for p in procs]
    assert all(r["published"] == count for r in published)
    ids = {r["publisher"] for r in published}
    assert len(ids) == pubs, f"publisher ids not distinct: {published}"
    return [result(s) for s in subs], published


@pytest.mark.parametrize("pubs", [4, 16])
def test_fan_in_reliable_every_message_in_publisher_order(daemon, tmp_path, pubs):
    count = 10_000
    outs, published = fan_in(daemon, tmp_path, pubs, count, "reliable", 1 << 16)
    by_tag = {str(t): r["publisher"] for t, r in enumerate(published)}
    for out in outs:
        assert out["got"] == {str(t): count for t in range(pubs)}
        assert out["lost"] == {str(t): 0 for t in range(pubs)}
        assert out["first"] == {str(t): 0 for t in range(pubs)}
        assert out["pubs"] == by_tag   # Message.publisher is the id the publisher was given
    # Every publisher left and every subscriber drained its ring: the daemon reclaimed them.
    deadline = time.monotonic() + 10
    while member_rings(daemon, "fan") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert member_rings(daemon, "fan") == []


def test_fan_in_lossy_counts_each_publishers_losses_exactly(daemon, tmp_path):
    count = 10_000
    outs, _ = fan_in(daemon, tmp_path, 4, count, "lossy", 4096, slow=0.002)
    lapped = 0
    for out in outs:
        for t in map(str, range(4)):
            # Every number either arrived or is counted lost, exactly once.
            assert out["got"][t] + out["lost"][t] == count, (t, out)
            assert out["last"][t] == count - 1
            lapped += out["lost"][t]
        assert out["lost_total"] == sum(out["lost"].values())
    assert lapped > 0, "the slow subscribers were never lapped: the test checked nothing"


def test_publishers_join_and_leave_mid_stream(daemon, tmp_path):
    """Publishers start and finish at different times; an early subscriber gets all of each;
    a subscriber joining mid-stream gets, per publisher, an unbroken run up to its last."""
    common = dict(mode="reliable", capacity=1 << 16, max_publishers=3)
    counts = [3000, 800, 1500, 600, 2000]
    want = ",".join(f"{t}:{c}" for t, c in enumerate(counts))
    early = start_subs(daemon, tmp_path, "jl", 1, want=want, **common)[0]
    pubs = [spawn(daemon, "pub", "jl", tag=0, count=counts[0], rate=2000, **common)]
    time.sleep(0.3)
    late = spawn(daemon, "sub", "jl", want=want, **common)
    for t in range(1, len(counts)):
        # at most 3 at once: tag 0, and two of the short ones overlapping
        pubs.append(spawn(daemon, "pub", "jl", tag=t, count=counts[t], rate=2000, **common))
        if t >= 2:
            assert result(pubs[t - 1])["published"] == counts[t - 1]
    for p in pubs:
        p.wait(60)
    assert result(pubs[0])["published"] == counts[0]
    out = result(early)
    assert out["got"] == {str(t): c for t, c in enumerate(counts)}
    out = result(late)
    for t, c in enumerate(counts):
        assert out["last"][str(t)] == c - 1
        assert out["got"][str(t)] == c - out["first"][str(t)]   # no gap after its first


def test_sigkill_publishers_never_wedge_the_channel(daemon, tmp_path):
    """Publishers killed at random points: the others' messages all arrive in order, nothing
    torn arrives from the victims, their rings are reclaimed and their places freed."""
    rng = random.Random(11)
    common = dict(mode="reliable", capacity=1 << 14, max_publishers=3)
    steady_count = 4000
    want = f"0:{steady_count},1:{steady_count}"
    subs = start_subs(daemon, tmp_path, "kill", 2, want=want, idle=1.0, **common)
    steady = [spawn(daemon, "pub", "kill", tag=t, count=steady_count, rate=1500, **common)
              for t in range(2)]
    for k in range(8):
        ready = str(tmp_path / f"victim{k}.ready")
        victim = spawn(daemon, "pub", "kill", tag=100 + k, count=0, ready=ready, **common)
        wait_files([ready])
        time.sleep(rng.uniform(0.0, 0.05))
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        assert victim.returncode == -signal.SIGKILL
    for p in steady:
        assert result(p)["published"] == steady_count
    for s in subs:
        out = result(s)
        assert out["got"]["0"] == out["got"]["1"] == steady_count
        for k in range(8):   # each victim: an unbroken run from its first message (no lost)
            t = str(100 + k)
            assert out["first"][t] == 0 and out["got"][t] == out["last"][t] + 1
    deadline = time.monotonic() + 10
    while member_rings(daemon, "kill") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert member_rings(daemon, "kill") == []
    # ... and the channel still takes max_publishers new publishers.
    again = [spawn(daemon, "pub", "kill", tag=t, count=10, **common) for t in range(3)]
    assert all(result(p)["published"] == 10 for p in again)


def test_publisher_limit_refused_with_a_clear_error(daemon, tmp_path):
    common = dict(mode="reliable", capacity=1 << 14, max_publishers=2)
    ready = [str(tmp_path / f"p{k}.ready") for k in range(2)]
    holders = [spawn(daemon, "pub", "lim", tag=k, count=0, ready=ready[k], rate=100, **common)
                for k in range(2)]
    try:
        wait_files(ready)
        third = result(spawn(daemon, "pub", "lim", tag=2, count=5, **common))
        assert "max_publishers=2" in third["busy"] and "lim" in third["busy"]
    finally:
        for p in holders:
            p.kill()
            p.wait(10)
    # The limit is fixed at creation; asking for another is refused, naming both.
    with pytest.raises(shimmy.ChannelConflict, match="max_publishers=2.*max_publishers=5"):
        shimmy.Channel("lim", daemon=daemon.socket, max_publishers=5)
    # Above the daemon's ceiling: refused, naming the setting.
    with pytest.raises(shimmy.LimitExceeded, match="daemon setting max_publishers"):
        shimmy.Channel("big", daemon=daemon.socket, max_publishers=65)
    # A member ring's reserved name cannot be opened (it would stand in for a publisher's ring).
    with pytest.raises(shimmy.InvalidArgument, match="reserved"):
        shimmy.Channel("lim/.p1.somenode", daemon=daemon.socket)
    # max_publishers=1 keeps the exclusive channel and its error.
    ex = shimmy.Channel("ex", daemon=daemon.socket, max_publishers=1)
    ex.publish(b"x")
    other = spawn(daemon, "pub", "ex", tag=0, count=1, max_publishers=1)
    assert "max_publishers=1" in result(other)["busy"]
    ex.close()


def test_one_process_two_channel_objects_are_two_publishers(daemon):
    a = shimmy.Channel("two", daemon=daemon.socket, max_publishers=2)
    b = shimmy.Channel("two", daemon=daemon.socket)
    sub = a.subscribe()
    for i in range(3):
        a.publish(b"a%d" % i)
        b.publish(b"b%d" % i)
    got = []
    for _ in range(6):
        msg = sub.receive(timeout=5)
        got.append((bytes(msg), msg.publisher, msg.seq, msg.pid))
        msg.release()
    # Each publisher's messages in its order, numbered by its own seq; both merged.
    for ch, tag in ((a, b"a"), (b, b"b")):
        assert [(d, s) for d, p, s, _ in got if p == ch.publisher_id] == [
            (tag + b"%d" % i, i) for i in range(3)]
    assert all(pid == os.getpid() for *_, pid in got)
    ls = subprocess.run([sys.executable, "-m", "shimmy.cli", "ls", "--json", "--daemon",
                         daemon.socket], capture_output=True, text=True, timeout=30)
    assert ls.returncode == 0, ls.stderr
    (entry,) = [c for c in json.loads(ls.stdout) if c["name"] == "two"]
    assert sorted(p["id"] for p in entry["publishers"]) == sorted(
        [a.publisher_id, b.publisher_id])
    assert all(p["pid"] == os.getpid() and p["node"] and p["live"] for p in entry["publishers"])
    for ch in (a, b):
        ch.close()


def test_asyncio_subscriber_merges_publishers(daemon, tmp_path):
    """``async for`` on a group: the helper thread arms every member ring and sleeps on the one
    semaphore; messages of publishers that join while it waits arrive."""
    import asyncio

    ch = shimmy.Channel("aio", daemon=daemon.socket, max_publishers=3, mode="reliable")
    sub = ch.subscribe()
    counts = [50, 70]

    async def main():
        got: dict[int, list[int]] = {}
        procs = [spawn(daemon, "pub", "aio", tag=t, count=c, rate=500, max_publishers=3)
                 for t, c in enumerate(counts)]
        while sum(map(len, got.values())) < sum(counts):
            msg = await sub.receive_async(timeout=30)
            tag, i = check(bytes(msg))
            got.setdefault(tag, []).append(i)
            msg.release()
        return got, procs

    got, procs = asyncio.run(main())
    for p in procs:
        assert result(p)["published"] in counts
    assert got == {t: list(range(c)) for t, c in enumerate(counts)}
    ch.close()


def test_a_flooding_publisher_does_not_starve_a_slow_one(daemon, tmp_path):
    """One publisher publishes as fast as it can, without end; a second publishes 200 at a
    modest rate: the subscriber gets all 200 while the first is still flooding (members are read
    in turn, one batch each)."""
    common = dict(mode="reliable", capacity=1 << 16, max_publishers=2)
    sub = start_subs(daemon, tmp_path, "flood", 1, want="1:200", timeout=60, **common)[0]
    ready = str(tmp_path / "flood.ready")
    flood = spawn(daemon, "pub", "flood", tag=0, count=0, ready=ready, **common)
    try:
        wait_files([ready])
        slow = spawn(daemon, "pub", "flood", tag=1, count=200, rate=1000, **common)
        assert result(slow)["published"] == 200
        out = result(sub, timeout=90)
        assert flood.poll() is None, "the flooding publisher stopped: the test checked nothing"
    finally:
        flood.kill()
        flood.wait(10)
    assert out["got"]["1"] == 200 and out["last"]["1"] == 199
    assert out["got"]["0"] > 0


def test_daemon_stops_cleanly_with_publishers_attached(daemon):
    """Shutdown retires the group and every member ring (the fixture checks the exit status and
    that nothing is left in /dev/shm); the clients see the channel closed."""
    a = shimmy.Channel("stop", daemon=daemon.socket, max_publishers=3)
    b = shimmy.Channel("stop", daemon=daemon.socket)
    sub = a.subscribe()
    a.publish(b"a")
    b.publish(b"b")
    assert daemon.stop() == 0
    with pytest.raises(shimmy.ChannelClosed):
        for _ in range(3):
            sub.receive(timeout=2)
    with pytest.raises(shimmy.ChannelClosed):
        for _ in range(4):   # until the publisher takes its slow path: the ring was retired
            b.publish(bytes(2_000_000))


def test_late_subscriber_starts_per_start_for_every_publisher(daemon):
    a = shimmy.Channel("late", daemon=daemon.socket, max_publishers=2)
    b = shimmy.Channel("late", daemon=daemon.socket)
    for i in range(3):
        a.publish(b"a%d" % i)
        b.publish(b"b%d" % i)
    oldest = a.subscribe(start="oldest")
    nxt = a.subscribe(start="next")
    got = sorted(oldest.receive_bytes(timeout=5) for _ in range(6))
    assert got == sorted([b"a0", b"a1", b"a2", b"b0", b"b1", b"b2"])
    assert nxt.receive_nowait() is None   # "next": nothing of what was published before
    b.publish(b"b3")
    msg = nxt.receive(timeout=5)
    assert (bytes(msg), msg.seq, msg.publisher) == (b"b3", 3, b.publisher_id)
    for ch in (a, b):
        ch.close()


def test_receive_many_takes_every_publisher_in_turn(daemon):
    """Batch calls on a group: ``publish_many`` from three publishers (three Channel objects,
    one member ring each), ``receive_many`` gets every message once, each publisher's in its
    order, one member per call in turn."""
    import shimmy
    pubs = [shimmy.Channel("batch", daemon=daemon.socket, max_publishers=3) for _ in range(3)]
    sub_ch = shimmy.Channel("batch", daemon=daemon.socket)
    sub = sub_ch.subscribe()
    count = 3000
    for tag, ch in enumerate(pubs):
        for lo in range(0, count, 500):
            assert ch.publish_many(make(tag, i) for i in range(lo, lo + 500)) == 500
    nxt = [0, 0, 0]
    sources = []
    while sum(nxt) < 3 * count:
        batch = sub.receive_many(256, timeout=10)
        tags = {check(data)[0] for data in batch}
        assert len(tags) == 1, "a batch mixes publishers"
        sources.append(tags.pop())
        for data in batch:
            tag, i = check(data)
            assert i == nxt[tag], (tag, i, nxt[tag])
            nxt[tag] += 1
    assert nxt == [count] * 3
    # In turn: no publisher waited while another delivered twice in a row with data left.
    assert all(a != b for a, b in zip(sources[:30], sources[1:31], strict=True)), sources[:31]
    for ch in (*pubs, sub_ch):
        ch.close()


def test_stat_of_a_group_counts_its_member_rings(daemon):
    """A group's own ring carries no messages: ``shimmy stat --json`` shows the bytes of its
    member rings (a reclaimed member's included) and each subscriber's lag as its largest over
    them, not the empty control ring's zeros."""
    from test_pubsub import shimmy_stat

    def entry():
        return next(c for c in shimmy_stat(daemon)["channels"] if c["name"] == "statgrp")

    a = shimmy.Channel("statgrp", daemon=daemon.socket, max_publishers=2)
    b = shimmy.Channel("statgrp", daemon=daemon.socket)
    sub = a.subscribe()
    for _ in range(5):
        a.publish(bytes(100))
    for _ in range(3):
        b.publish(bytes(300))
    e = entry()
    tails = [p["tail"] for p in e["publishers"]]
    assert all(t > 0 for t in tails) and e["tail"] == sum(tails)
    assert [s["lag_bytes"] for s in e["subscribers"]] == [max(tails)]
    for _ in range(8):
        sub.receive_bytes(timeout=5)   # (a copy: the position moves past each message)
    assert [s["lag_bytes"] for s in entry()["subscribers"]] == [0]
    b.close()   # drained: its member ring is reclaimed, its bytes stay counted
    end = time.monotonic() + 10
    while len(entry()["publishers"]) > 1:
        assert time.monotonic() < end, "the drained member ring was never reclaimed"
        time.sleep(0.05)
    assert entry()["tail"] == sum(tails)
    sub.close()
    a.close()


def test_metrics_of_a_group_aggregate_its_member_rings(daemon_factory, tmp_path):
    """/metrics of a group: bytes summed over the member rings, lag and fill the largest a
    subscriber has over them (the control ring's own words are all zero)."""
    from test_metrics import _metrics_daemon, scrape, value
    d, url = _metrics_daemon(daemon_factory, tmp_path)
    a = shimmy.Channel("metgrp", daemon=d.socket, max_publishers=2, capacity=65536)
    b = shimmy.Channel("metgrp", daemon=d.socket)
    sub = a.subscribe()
    for _ in range(4):
        a.publish(bytes(1000))
    b.publish(bytes(3000))
    got = scrape(url)
    sent = value(got, "shimmy_channel_published_bytes_total", channel="metgrp")
    lag = value(got, "shimmy_channel_subscriber_lag_bytes_max", channel="metgrp")
    assert sent is not None and sent >= 7000
    assert 4000 <= lag < sent   # the larger member's backlog, not the sum nor zero
    assert value(got, "shimmy_channel_ring_fill_ratio", channel="metgrp") == lag / 65536
    for _ in range(5):
        sub.receive_bytes(timeout=5)
    got = scrape(url)
    assert value(got, "shimmy_channel_subscriber_lag_bytes_max", channel="metgrp") == 0
    assert value(got, "shimmy_channel_published_bytes_total", channel="metgrp") == sent
    for x in (sub, a, b):
        x.close()


def test_member_rings_are_charged_to_the_publishers_shm_quota(daemon_factory, tmp_path):
    """Each publisher's member ring counts against its tenant's quota_shm_bytes (not as a
    channel): a tenant cannot go past its quota by attaching publishers, and a reclaimed
    member ring gives its bytes back."""
    from shimmy import ring as ring_mod
    from test_access_quotas import _daemon
    seg = ring_mod.segment_size(65536, 64)   # the daemon's default max_subscribers
    ctl = ring_mod.segment_size(ring_mod.MIN_CAPACITY, 64)
    quota = ctl + 2 * seg
    d = _daemon(daemon_factory, tmp_path, f"quota_channels = 1\nquota_shm_bytes = {quota}\n")
    # The channel's own ring is charged at what it is made of (the smallest capacity: it holds
    # no messages), then exactly two member rings of the channel's capacity fit.
    chans = [shimmy.Channel("quota/grp", daemon=d.socket, capacity=65536, max_publishers=4)]
    chans.append(shimmy.Channel("quota/grp", daemon=d.socket))
    chans[0].publish(b"a")
    chans[1].publish(b"b")
    third = shimmy.Channel("quota/grp", daemon=d.socket)
    with pytest.raises(shimmy.LimitExceeded, match=f"quota_shm_bytes={quota} bytes"):
        third.publish(b"c")
    chans[1].close()   # no subscriber: its member ring is drained, so reclaimed
    end = time.monotonic() + 10
    while True:
        try:
            third.publish(b"c")
            break
        except shimmy.LimitExceeded:
            assert time.monotonic() < end, "a reclaimed member ring never gave its bytes back"
            time.sleep(0.05)
    for ch in (chans[0], third):
        ch.close()
