"""Pub/sub across real processes: ordering, integrity, back-pressure, crashes, loss accounting."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import shimmy
from shimmy import ring

WORKERS = os.path.join(os.path.dirname(__file__), "workers.py")


def spawn(daemon, role, channel, *args, ready=None):
    cmd = [sys.executable, WORKERS, role, "--daemon", daemon.socket, "--channel", channel, *args]
    if ready:
        cmd += ["--ready", ready]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{err[-3000:]}"
    return json.loads(out)


def wait_file(path, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def start_subscribers(daemon, tmp_path, channel, n, *args):
    """Start n subscriber processes and wait until each has subscribed (ready file)."""
    procs = []
    for _ in range(n):
        ready = str(tmp_path / f"sub-{len(list(tmp_path.glob('*.ready')))}.ready")
        procs.append(spawn(daemon, "subscribe", channel, *args, ready=ready))
        wait_file(ready)
    return procs


@pytest.mark.parametrize("mode, api", [("reliable", "view"), ("lossy", "view"),
                                       ("lossy", "copy")])
def test_100k_random_sizes_one_publisher_three_subscribers(daemon, tmp_path, mode, api):
    capacity = 1 << 16
    max_size = ring.max_message_size(capacity)
    common = ["--mode", mode, "--capacity", str(capacity), "--max-size", str(max_size)]
    count = 100_000
    extra = ["--copy-path"] if api == "copy" else []
    subs = start_subscribers(daemon, tmp_path, "integrity", 3, *common, "--count", str(count),
                             *extra)
    pub = spawn(daemon, "publish", "integrity", *common, "--count", str(count))
    assert result(pub)["published"] == count
    for proc in subs:
        r = result(proc)
        assert r["bad"] == 0, r
        if mode == "reliable":
            assert r["received"] == count and r["lost"] == 0, r
        else:
            # Lossy: whatever was missed is counted exactly; the count adds up.
            assert r["received"] + r["lost"] == count, r
            assert r["received"] > 0
        assert r["last_seq"] == count - 1


def test_slow_subscriber_throttles_reliable_publisher_and_loses_nothing(daemon, tmp_path):
    args = ["--mode", "reliable", "--capacity", "8192", "--max-size", "512"]
    count = 3000
    (slow,) = start_subscribers(daemon, tmp_path, "slow", 1, *args, "--count", str(count),
                                "--slow", "0.01")
    (fast,) = start_subscribers(daemon, tmp_path, "slow", 1, *args, "--count", str(count))
    pub = spawn(daemon, "publish", "slow", *args, "--count", str(count))
    assert result(pub)["published"] == count
    for r in (result(slow), result(fast)):
        assert (r["received"], r["lost"], r["bad"]) == (count, 0, 0), r


def test_killed_subscriber_is_reclaimed_and_publisher_continues(daemon, tmp_path):
    args = ["--mode", "reliable", "--capacity", "8192", "--max-size", "256"]
    count = 5000
    (live,) = start_subscribers(daemon, tmp_path, "reclaim", 1, *args, "--count", str(count))
    # This one stalls forever on its first message, so the publisher fills the ring and blocks.
    (stuck,) = start_subscribers(daemon, tmp_path, "reclaim", 1, *args, "--stall", "600")
    pub = spawn(daemon, "publish", "reclaim", *args, "--count", str(count), "--timeout", "60")
    time.sleep(1.0)
    assert pub.poll() is None, "publisher should be held back by the stalled subscriber"
    stuck.send_signal(signal.SIGKILL)
    stuck.wait(10)
    assert result(pub)["published"] == count
    r = result(live)
    assert (r["received"], r["lost"], r["bad"]) == (count, 0, 0), r
    stats = shimmy_stat(daemon)
    chan = next(c for c in stats["channels"] if c["name"] == "reclaim")
    assert chan["subscribers"] == [] and stats["counters"]["slots_reclaimed"] >= 1


def test_killed_publisher_leaves_no_torn_frame_and_a_new_one_takes_over(daemon, tmp_path):
    args = ["--mode", "lossy", "--capacity", str(1 << 20), "--max-size", "65536"]
    (sub,) = start_subscribers(daemon, tmp_path, "torn", 1, *args, "--idle", "3")
    pub = spawn(daemon, "publish", "torn", *args, "--count", "100000000")
    time.sleep(1.5)
    pub.send_signal(signal.SIGKILL)  # almost surely mid-copy of a large frame
    pub.wait(10)
    r = result(sub)
    assert r["bad"] == 0 and r["received"] > 0, r
    # The publisher role is free again and the sequence continues where the dead one stopped.
    with shimmy.Channel("torn", daemon=daemon.socket) as ch:
        watcher = ch.subscribe()
        seq = ch.publish(b"after")
        msg = watcher.receive(timeout=5)
        assert bytes(msg) == b"after" and msg.seq == seq
        assert seq >= r["last_seq"] + 1


def test_lossy_stalled_subscriber_counts_exactly_what_it_lost(daemon, tmp_path):
    capacity = 8192
    with shimmy.Channel("lossy/exact", daemon=daemon.socket, mode="lossy",
                        capacity=capacity) as ch:
        sub = ch.subscribe()
        count = 5000
        pub = spawn(daemon, "publish", "lossy/exact", "--mode", "lossy", "--capacity",
                    str(capacity), "--max-size", "200", "--count", str(count))
        assert result(pub)["published"] == count
        seqs, lost = [], 0
        while True:
            try:
                msg = sub.receive(timeout=0.5)
            except TimeoutError:
                break
            from workers import payload  # noqa: E402  (tests dir is on sys.path)
            assert bytes(msg) == payload(msg.seq, 200)
            seqs.append(msg.seq)
            lost += msg.lost
        assert seqs == list(range(seqs[0], count)), "received a contiguous tail of the stream"
        assert lost == seqs[0] > 0, "lost counts exactly the messages before the oldest intact"
        assert sub.lost == lost


def test_reliable_publisher_times_out_with_backpressure_error(daemon):
    with shimmy.Channel("bp", daemon=daemon.socket, capacity=4096) as ch:
        sub = ch.subscribe()
        with pytest.raises(shimmy.BackpressureTimeout, match="slowest subscriber") as info:
            for _ in range(1000):
                ch.publish(b"x" * 100, timeout=0.2)
        assert isinstance(info.value, TimeoutError)
        assert bytes(sub.receive(timeout=1)) == b"x" * 100


def test_start_oldest_replays_retained_messages(daemon):
    with shimmy.Channel("replay", daemon=daemon.socket) as ch:
        for i in range(10):
            ch.publish(b"%d" % i)
        sub = ch.subscribe(start="oldest")
        assert [bytes(sub.receive(timeout=1)) for _ in range(10)] == [b"%d" % i for i in range(10)]
        late = ch.subscribe()  # "next": nothing until the next publish
        assert late.receive_nowait() is None
        ch.publish(b"new")
        assert bytes(late.receive(timeout=1)) == b"new"


def test_blocking_receive_wakes_on_publish_from_other_process(daemon, tmp_path):
    with shimmy.Channel("wake", daemon=daemon.socket, spin_us=0) as ch:
        sub = ch.subscribe()
        pub = spawn(daemon, "publish", "wake", "--count", "200", "--max-size", "64",
                    "--rate", "2000")
        got = [sub.receive(timeout=10).seq for _ in range(200)]
        assert got == list(range(200))
        result(pub)


def test_iteration_and_context_managers(daemon):
    with shimmy.Channel("iter", daemon=daemon.socket) as ch, ch.subscribe() as sub:
        for i in range(3):
            ch.publish(b"m%d" % i)
        it = iter(sub)
        assert [bytes(next(it)) for _ in range(3)] == [b"m0", b"m1", b"m2"]
    assert sub.closed and ch.closed
    with pytest.raises(shimmy.ChannelClosed):
        ch.publish(b"late")


def test_forked_child_does_not_share_the_parents_channel(daemon):
    ch = shimmy.Channel("fork", daemon=daemon.socket)
    ch.publish(b"parent")
    pid = os.fork()
    if pid == 0:  # child: the parent's channel must refuse, a fresh one must work
        code = 1
        try:
            try:
                ch.publish(b"child")
            except shimmy.ChannelClosed:
                with shimmy.Channel("fork/child", daemon=daemon.socket) as own:
                    own.publish(b"ok")
                    code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    sub = ch.subscribe(start="oldest")
    assert [bytes(sub.receive(timeout=1)) for _ in range(1)] == [b"parent"]
    assert sub.receive_nowait() is None, "the child's publish must not have reached the channel"
    ch.close()


def shimmy_stat(daemon) -> dict:
    out = subprocess.run([sys.executable, "-m", "shimmy.cli", "stat", "--json", "--daemon",
                          daemon.socket],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return json.loads(out)


def test_every_sleeping_subscriber_of_a_wide_channel_is_woken(daemon):
    """12 subscribers (slots beyond the first waiting word included) sleep between bursts; every
    burst's first commit must wake every one of them by a post.  A lost wake-up does not lose
    data (sleeps are bounded and re-check) but shows as a sleep ended by its bound."""
    import threading
    n_subs, n_msgs = 12, 1500
    with shimmy.Channel("wide", daemon=daemon.socket, spin_us=0) as ch:
        subs = [ch.subscribe() for _ in range(n_subs)]
        assert max(s.slot for s in subs) >= 7
        got = [[] for _ in subs]
        timeouts_after_first = [0] * n_subs
        errors = []

        def drain(i):
            try:
                got[i].append(subs[i].receive(timeout=30).seq)
                before = subs[i].stats()["sleep_timeouts"]
                for _ in range(n_msgs - 1):
                    got[i].append(subs[i].receive(timeout=30).seq)
                timeouts_after_first[i] = subs[i].stats()["sleep_timeouts"] - before
            except Exception as exc:  # reported below with the subscriber's slot
                errors.append((subs[i].slot, repr(exc)))
        threads = [threading.Thread(target=drain, args=(i,)) for i in range(n_subs)]
        for t in threads:
            t.start()
        # bursts of 100 with 50 ms pauses (shorter than the 250 ms sleep bound): between
        # bursts every subscriber sleeps, and only a post can end that sleep in time
        pub = spawn(daemon, "publish", "wide", "--count", str(n_msgs), "--max-size", "64",
                    "--rate", "2000")
        result(pub)
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert all(g == list(range(n_msgs)) for g in got)
        assert sum(s.stats()["sleeps"] for s in subs) > n_subs, "subscribers did sleep"
        assert timeouts_after_first == [0] * n_subs, \
            dict(zip([s.slot for s in subs], timeouts_after_first, strict=True))


def test_spin_ceiling_follows_the_size_of_what_the_last_wait_got(daemon):
    """A receiver that waited for a large message may spin longer in its next wait before it
    sleeps: spin_us plus 1 us per SPIN_BYTES_PER_US bytes of the average message taken since
    its last long wait (spec/ring.md, "Wake-up protocol"); small messages keep spin_us, and
    spin_us=0 never spins.  Every wait here is long (the message comes 20 ms later)."""
    from shimmy.sdk import subscription as channel_mod
    with shimmy.Channel("spin/size", daemon=daemon.socket, capacity=1 << 22) as ch:
        for spin_us, sizes in ((100, (64, 1 << 20, 4096, 64)), (0, (1 << 20, 1 << 20))):
            sub = ch.subscribe(spin_us=spin_us)
            before = 0   # the frame the previous wait took (none before the first)
            for size in sizes:
                later = threading.Timer(0.02, ch.publish, args=(bytes(size),))
                later.start()
                try:
                    assert len(sub.receive_bytes(timeout=10)) == size  # waits: nothing there yet
                finally:
                    later.join()
                want = spin_us + before / channel_mod.SPIN_BYTES_PER_US if spin_us else 0
                assert sub.stats()["spin_cap_us"] == round(want, 1), (spin_us, size)
                before = ring.frame_size(size)
            sub.close()
