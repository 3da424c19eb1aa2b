"""Joining from a recording (spec/ring.md, "Joining from a recording"): a subscription
that reads the recording, then the live ring, while a publisher runs flat out."""

from __future__ import annotations

import datetime as dt
import os
import random
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import shimmy
from shimmy.errors import InvalidArgument

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_record import (payload, start_publisher, start_recorder, stop,  # noqa: E402
                         wait_recorded)


@pytest.fixture
def root():
    with tempfile.TemporaryDirectory(prefix="shimmy-rec-") as d:
        yield d


def _check_run(sub, first: int, live_after: int) -> tuple[int, int]:
    """Receive from ``first`` until ``live_after`` messages came from the live ring; every seq
    exactly once, in order, each the bytes published under it.  Returns (recorded, live)."""
    expect = first
    from_disk = live = 0
    while live < live_after:
        replaying = sub.replaying
        msg = sub.receive(timeout=30)
        assert msg.seq == expect, f"expected seq {expect}, got {msg.seq} (lost {msg.lost})"
        assert msg.lost == 0
        assert msg.data == payload(msg.seq)
        expect += 1
        if replaying and msg._src.position == -1:
            from_disk += 1
        else:
            live += 1
    return from_disk, live


@pytest.mark.timeout(240)
def test_replay_then_live_100_times_while_the_publisher_runs_flat_out(daemon, root):
    ch = shimmy.Channel("join.a", daemon=daemon.socket, mode="reliable", capacity=1 << 18)
    rec = start_recorder(daemon.socket, root, "join.a")
    wait_recorded(root, "join.a", 0)
    pub = start_publisher(daemon.socket, "join.a", 50_000_000, capacity=1 << 18)
    try:
        wait_recorded(root, "join.a", 50_000)
        rnd = random.Random(100)
        handoffs = 0
        for _ in range(100):
            recorded = wait_recorded(root, "join.a", 0)["next_seq"]
            first = max(0, recorded - rnd.randrange(5000, 30000))
            with ch.subscribe(start=first) as sub:
                from_disk, live = _check_run(sub, first, 200)
            handoffs += from_disk > 0
            assert pub.poll() is None, "the publisher stopped"
        assert handoffs >= 90   # nearly every run began on disk and moved to the ring
    finally:
        pub.kill()
        pub.wait()
        stop(rec)
    ch.close()


@pytest.mark.timeout(240)
def test_replay_then_live_in_batches_while_the_publisher_runs_flat_out(daemon, root):
    """The same hand-off through receive_many (the recording read in bulk, then the ring's
    batches): every message's bytes are the ones published under the next seq."""
    ch = shimmy.Channel("join.b", daemon=daemon.socket, mode="reliable", capacity=1 << 18)
    rec = start_recorder(daemon.socket, root, "join.b")
    wait_recorded(root, "join.b", 0)
    pub = start_publisher(daemon.socket, "join.b", 50_000_000, capacity=1 << 18)
    try:
        wait_recorded(root, "join.b", 50_000)
        rnd = random.Random(7)
        for _ in range(20):
            recorded = wait_recorded(root, "join.b", 0)["next_seq"]
            first = max(0, recorded - rnd.randrange(5000, 30000))
            with ch.subscribe(start=first) as sub:
                expect = first
                live = 0
                while live < 5000:
                    was_disk = sub.replaying
                    for data in sub.receive_many(rnd.choice((1, 7, 100, 1000)), timeout=30):
                        assert data == payload(expect), f"message {expect} differs"
                        expect += 1
                        live += not was_disk
                    assert sub.last_seq == expect - 1 and sub.lost == 0
            assert pub.poll() is None, "the publisher stopped"
    finally:
        pub.kill()
        pub.wait()
        stop(rec)
    ch.close()


@pytest.mark.timeout(120)
def test_start_recorded_and_start_at_a_time(daemon, root):
    ch = shimmy.Channel("join.t", daemon=daemon.socket, mode="reliable", capacity=1 << 16)
    rec = start_recorder(daemon.socket, root, "join.t")
    wait_recorded(root, "join.t", 0)
    for i in range(3000):
        ch.publish(payload(i))
    wait_recorded(root, "join.t", 3000)
    time.sleep(0.05)
    mark = dt.datetime.now()
    time.sleep(0.05)
    for i in range(3000, 6000):
        ch.publish(payload(i))
    wait_recorded(root, "join.t", 6000)
    # Everything from the first recorded message; the ring (64 KiB) holds only the last few.
    with ch.subscribe(start="recorded") as sub:
        for i in range(6000):
            msg = sub.receive(timeout=10)
            assert (msg.seq, msg.data) == (i, payload(i))
        assert not sub.replaying
        ch.publish(payload(6000))
        assert sub.receive(timeout=10).seq == 6000
    # From a time: the first message recorded after it (chunks carry the time they were read).
    with ch.subscribe(start=mark) as sub:
        assert sub.receive(timeout=10).seq == 3000
    # From a seq in the future: nothing before it.
    with ch.subscribe(start=6005) as sub:
        # (published from a thread: the subscription's live slot holds the 64 KiB ring from
        # its oldest message, so the publisher waits for this reader)
        t = threading.Thread(target=lambda: [ch.publish(payload(i)) for i in range(6001, 6010)])
        t.start()
        assert [sub.receive(timeout=10).seq for _ in range(5)] == list(range(6005, 6010))
        t.join()
    stop(rec)
    ch.close()


def test_a_start_that_needs_a_recording_names_what_is_missing(daemon, root):
    ch = shimmy.Channel("join.none", daemon=daemon.socket)
    with pytest.raises(InvalidArgument, match="needs a recording of channel 'join.none'"):
        ch.subscribe(start=5)
    with pytest.raises(InvalidArgument, match="start must be"):
        ch.subscribe(start=-1)
    with pytest.raises(InvalidArgument, match="start must be"):
        ch.subscribe(start="yesterday")
    ch.close()


@pytest.mark.timeout(120)
def test_replay_command_republishes_a_recording_to_a_new_channel(daemon, root):
    ch = shimmy.Channel("rp.src", daemon=daemon.socket, mode="reliable", capacity=1 << 16)
    rec = start_recorder(daemon.socket, root, "rp.src")
    wait_recorded(root, "rp.src", 0)
    for i in range(2000):
        ch.publish(payload(i))
    wait_recorded(root, "rp.src", 2000)
    stop(rec)
    dst = shimmy.Channel("rp.dst", daemon=daemon.socket, mode="reliable", capacity=1 << 22)
    sub = dst.subscribe()
    out = subprocess.run([sys.executable, "-m", "shimmy.cli", "replay", root, "rp.src", "--to",
                          "rp.dst", "--rate", "max", "--daemon", daemon.socket],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for i in range(2000):
        assert sub.receive(timeout=10).data == payload(i)
    sub.close()
    dst.close()
    ch.close()


@pytest.mark.timeout(120)
def test_replay_keeps_the_recorded_spacing_unless_asked_for_max(daemon, root):
    ch = shimmy.Channel("rp.gap", daemon=daemon.socket, capacity=1 << 16)
    rec = start_recorder(daemon.socket, root, "rp.gap")
    wait_recorded(root, "rp.gap", 0)
    ch.publish(payload(0))
    wait_recorded(root, "rp.gap", 1)
    time.sleep(1.0)                       # a second between the two recorded messages
    ch.publish(payload(1))
    wait_recorded(root, "rp.gap", 2)
    stop(rec)

    def replay(*rate: str) -> float:
        t = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "shimmy.cli", "replay", root, "rp.gap",
                              "--to", "rp.out", "--daemon", daemon.socket, *rate],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return time.monotonic() - t

    # Lower bounds only: the recorded second is waited out at rate 1, half of it at rate 2.
    assert replay() >= 0.9
    assert replay("--rate", "2") >= 0.45
    bad = subprocess.run([sys.executable, "-m", "shimmy.cli", "replay", root, "rp.gap", "--to",
                          "rp.out", "--rate", "0", "--daemon", daemon.socket],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "'max' or a factor > 0" in bad.stderr
    ch.close()
