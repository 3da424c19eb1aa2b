"""Crash consistency of the pub/sub ring (issue 8, finding 1) and a bounded crash matrix.

The first tests reproduce finding 1 deterministically: a real publisher process is SIGKILLed at
an exact store of the commit protocol by a fault-injection proxy (tests.chaos.faults: the
library has no hook); the channel must stay usable: ``list`` works, a new subscriber joins, a
new publisher continues with the next sequence number, and every subscriber gets every
committed message, intact and in order.  Before the fix, a kill between the ``last`` and
``tail`` stores made every later open fail with "could not find a consistent tail".

The last two tests run bounded subsets of the crash matrix (tests/chaos/crash.py) with random
kill points: the single-publisher rows, and the publisher-group rows.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

import shimmy
from shimmy.errors import ShimmyError
from shimmy.sdk.client import get_client

from tests.chaos import faults, payloads

CAP = 4096
SIZE = 100          # 100-byte payloads: 128-byte frames, 30 of them end 256 bytes before the wrap


def _drain(sub, got: list, until=lambda: False, quiet: float = 0.3) -> None:
    """Receive into ``got`` as (seq, lost so far, bytes) until ``until()`` and ``quiet`` s of
    silence.  The copy path: in lossy mode a zero-copy view may be overwritten while read."""
    idle_since = time.monotonic()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            data = sub.receive_bytes(timeout=0)
        except shimmy.ReceiveTimeout:
            if until() and time.monotonic() - idle_since > quiet:
                return
            time.sleep(0.0005)
            continue
        idle_since = time.monotonic()
        got.append((sub.last_seq, sub.lost, data))
    raise AssertionError("subscriber did not go quiet within 30 s")


def _become_publisher(ch, first: bytes) -> int:
    """Publish ``first`` from this process, retrying while the daemon has not yet seen the
    killed publisher's session close (it hands the role over on that EOF)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return ch.publish(first)
        except ShimmyError as exc:
            if "already has a publisher" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _check_stream(got: list, mode: str, first_seq: int, last_seq: int) -> None:
    """Every message intact and in order; reliable: none missing; lossy: ``lost`` exact."""
    seqs = [s for s, _, _ in got]
    for seq, _, data in got:
        assert payloads.check(data, seq) is None, payloads.check(data, seq)
    if mode == "reliable":
        assert seqs == list(range(first_seq, last_seq + 1))
        assert all(total == 0 for _, total, _ in got)
    else:
        prev, prev_total = first_seq - 1, 0
        for seq, total, _ in got:
            lost = total - prev_total
            assert seq > prev and lost == seq - prev - 1, (seq, prev, lost)
            prev, prev_total = seq, total
        assert prev == last_seq


# (kill word, stores of it to let through, fatal message size, loan, messages that end up
# committed from the killed publisher): 30 messages of SIZE end 256 bytes before the wrap point,
# so a 1000-byte message needs a PAD first.
CASES = {
    "between last and tail": ("tail", 0, SIZE, False, 31),          # finding 1: rolled forward
    "before last": ("last", 0, SIZE, False, 30),                     # frame written, not complete
    "between last and tail, loan": ("tail", 0, SIZE, True, 31),
    "PAD: between last and tail": ("tail", 0, 1000, False, 30),     # PAD rolled forward
    "after PAD, between last and tail": ("tail", 1, 1000, False, 31),
    "after PAD, before last": ("last", 1, 1000, False, 30),
}


@pytest.mark.parametrize("mode", ["reliable", "lossy"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_publisher_killed_at_a_commit_store_leaves_channel_usable(daemon, mode, case):
    word, skip, last_size, loan, committed = CASES[case]
    name = f"crash.{mode}.{word}{skip}.{last_size}{'.loan' if loan else ''}"
    other = shimmy.Channel("bystander", daemon=daemon.socket)
    ch = shimmy.Channel(name, daemon=daemon.socket, mode=mode, capacity=CAP)
    sub_old = ch.subscribe()
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.chaos.faults", "--daemon", daemon.socket, "--channel", name,
         "--mode", mode, "--capacity", str(CAP), "--count", "30", "--size", str(SIZE),
         "--kill-word", word, "--skip", str(skip), "--last-size", str(last_size),
         *(["--loan"] if loan else [])], stderr=subprocess.PIPE, env=faults.child_env())
    got: list = []
    _drain(sub_old, got, until=lambda: child.poll() is not None)
    assert child.stderr is not None
    assert child.wait(10) == -9, child.stderr.read().decode()

    # The daemon-wide views still work and do not report the channel broken.
    listing = {c["name"]: c for c in get_client(daemon.socket).request("list")["channels"]}
    assert listing[name]["broken"] is None and listing["bystander"]["broken"] is None
    assert listing[name]["published"] == committed - (committed > 30 and word == "tail")

    # A new subscriber joins, a new publisher continues where the committed stream ends.
    sub_new = ch.subscribe()
    n = 20
    first = _become_publisher(ch, payloads.make(committed, SIZE))
    assert first == committed
    for seq in range(committed + 1, committed + n):
        assert ch.publish(payloads.make(seq, SIZE)) == seq
    _drain(sub_old, got, until=lambda: True)
    _check_stream(got, mode, 0, committed + n - 1)
    fresh: list = []
    _drain(sub_new, fresh, until=lambda: True)
    # sub_new joined at the tail the killed publisher left: a message it had completely
    # written (but not committed) is committed by the new publisher and reaches sub_new too.
    start = listing[name]["published"]
    _check_stream(fresh, "reliable", start, committed + n - 1)
    ch.close()
    other.close()


def test_stream_point_exact_in_the_intermediate_state_written_from_the_test(daemon):
    """The exact state a kill between the two stores leaves, written into the ring by the test
    itself (no process killed): a complete frame at ``last == tail``.  Subscribing and listing
    must work and start at that frame's seq; a successor publisher commits it."""
    from shimmy import ring
    ch = shimmy.Channel("intermediate", daemon=daemon.socket, capacity=CAP)
    for seq in range(5):
        ch.publish(payloads.make(seq, SIZE))
    ch.close()
    ch = shimmy.Channel("intermediate", daemon=daemon.socket)
    v = ch._view
    tail = v.q[ring.W_TAIL]
    data = payloads.make(5, SIZE)
    ring.FRAME.pack_into(v.mv, v.data_offset + (tail & (CAP - 1)), len(data), 0, 5)
    start = v.data_offset + (tail & (CAP - 1)) + ring.HEADER
    v.mv[start:start + len(data)] = data
    v.q[ring.W_LAST] = tail                 # the store before the commit ...
    # ... and no tail store: the publisher "died" here.
    entry = get_client(daemon.socket).request("list")["channels"][0]
    assert entry["broken"] is None and entry["published"] == 5
    sub = ch.subscribe()
    assert ch.publish(payloads.make(6, SIZE)) == 6    # resumes after rolling 5 forward
    got: list = []
    _drain(sub, got, until=lambda: True)
    _check_stream(got, "reliable", 5, 6)
    ch.close()


def test_crash_matrix_bounded(tmp_path):
    """A bounded subset of the crash matrix: random SIGKILLs of publishers, subscribers, the
    daemon and stream ends, reliable and lossy; every count that must be zero is zero (the
    peer rows: tests/test_chaos_peer.py)."""
    out = tmp_path / "crash.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.chaos.crash", "--trials", "10", "--max-seconds", "50",
         "--kinds", "publisher,subscriber,daemon,stream", "--json", str(out)],
        capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert [(r["kind"], r["mode"]) for r in report["rows"]] == [
        ("publisher", "reliable"), ("publisher", "lossy"), ("subscriber", "reliable"),
        ("subscriber", "lossy"), ("daemon", "reliable"), ("daemon", "lossy"), ("stream", "-")]
    for row in report["rows"]:
        assert row["trials"] >= 2 and row["received"] > 0, row
        for key in ("torn", "lost", "duplicated", "lost_inexact", "wedged", "stale_objects",
                    "daemon_deaths", "errors"):
            assert row[key] == 0, row


def test_crash_matrix_group_bounded(tmp_path):
    """The group rows of the crash matrix, bounded: a channel with max_publishers 4, three
    long-running publishers and, per trial, a fourth SIGKILLed at a random instant and replaced;
    every message checked per publisher, the dead member reclaimed, nothing wedged."""
    out = tmp_path / "crash.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.chaos.crash", "--trials", "6", "--max-seconds", "40",
         "--kinds", "group", "--json", str(out)], capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert [(r["kind"], r["mode"]) for r in report["rows"]] == [("group", "reliable"),
                                                                ("group", "lossy")]
    for row in report["rows"]:
        assert row["trials"] == 6 and row["received"] > 0, row
        for key in ("torn", "lost", "duplicated", "lost_inexact", "wedged", "stale_objects",
                    "daemon_deaths", "errors"):
            assert row[key] == 0, row


@pytest.mark.parametrize("mode", ["reliable", "lossy"])
def test_group_member_left_ending_in_a_pad_is_reclaimed_after_a_copy_path_drain(daemon, mode):
    """A group publisher SIGKILLed just after committing a PAD alone (the wrap, before its
    next frame): its member ring's tail ends at that PAD.  A subscriber reading with the copy
    path (receive_bytes) reads every message and passes the PAD; the daemon must then see the
    member drained and reclaim it (before the fix the reader never stored its position past a
    PAD it skipped, so the dead member stayed for ever)."""
    name = f"crash.group.pad.{mode}"
    ch = shimmy.Channel(name, daemon=daemon.socket, mode=mode, capacity=CAP, max_publishers=2)
    sub = ch.subscribe()
    rings = lambda: {o for o in daemon.shm_objects() if not o.startswith("sem.")}  # noqa: E731
    before = rings()
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.chaos.faults", "--daemon", daemon.socket, "--channel", name,
         "--mode", mode, "--capacity", str(CAP), "--count", "30", "--size", str(SIZE),
         "--kill-word", "last", "--skip", "1", "--last-size", "1000", "--max-publishers", "2"],
        stderr=subprocess.PIPE, env=faults.child_env())
    got: list = []
    _drain(sub, got, until=lambda: child.poll() is not None)
    assert child.wait(10) == -9
    _check_stream(got, mode, 0, 29)
    deadline = time.monotonic() + 5
    while rings() != before and time.monotonic() < deadline:
        _drain(sub, got, until=lambda: True, quiet=0.05)
    assert rings() == before, "the dead publisher's member ring was not reclaimed"
    ch.close()


# A rewind (spec/ring.md, "Rewind") makes the wrap point's stores before the wrap point: three
# 100,000-byte messages through a 1 MiB ring with no subscriber attached (so every one after the
# first rewinds), then the fatal one, killed at each store of its rewind.  (kill word, stores of
# it to let through, messages committed once the successor rolled forward.)
REWIND_CASES = {
    "before the head store for the PAD's room": ("head", 0, 3),
    "PAD: between last and tail": ("tail", 0, 3),          # the PAD rolled forward
    "after the PAD, before last": ("last", 1, 3),
    "after the PAD, between last and tail": ("tail", 1, 4),  # the frame rolled forward
}


@pytest.mark.parametrize("mode", ["reliable", "lossy"])
@pytest.mark.parametrize("case", sorted(REWIND_CASES))
def test_publisher_killed_in_a_rewind_leaves_channel_usable(daemon, mode, case):
    word, skip, committed = REWIND_CASES[case]
    size, cap = 100_000, 1 << 20
    name = f"crash.rewind.{mode}.{word}{skip}"
    ch = shimmy.Channel(name, daemon=daemon.socket, mode=mode, capacity=cap, rewind=True)
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.chaos.faults", "--daemon", daemon.socket, "--channel", name,
         "--mode", mode, "--capacity", str(cap), "--count", "3", "--size", str(size),
         "--kill-word", word, "--skip", str(skip), "--last-size", str(size), "--rewind"],
        stderr=subprocess.PIPE, env=faults.child_env())
    assert child.stderr is not None
    assert child.wait(30) == -9, child.stderr.read().decode()
    listing = {c["name"]: c for c in get_client(daemon.socket).request("list")["channels"]}
    assert listing[name]["broken"] is None and listing[name]["published"] == 3
    oldest = ch.subscribe(start="oldest")
    sub_new = ch.subscribe()
    held: list = []
    fresh: list = []
    _drain(oldest, held, until=lambda: True)   # what the ring still holds, before it is reused
    first = _become_publisher(ch, payloads.make(committed, size))
    assert first == committed
    for seq in range(committed + 1, committed + 6):
        # Taken as they come: a subscriber paused at a rewind's PAD leaves the publisher only
        # the room before that PAD (spec/ring.md, "Rewind").
        _drain(sub_new, fresh, until=lambda: True, quiet=0.02)
        _drain(oldest, held, until=lambda: True, quiet=0.02)
        if seq < committed + 5:
            assert ch.publish(payloads.make(seq, size)) == seq
    _check_stream(fresh, "reliable", 3, committed + 4)
    _check_stream(held, "reliable", held[0][0], committed + 4)
    assert held[0][0] in (2, 3)   # message 2 is gone once head passed it for the frame's room
    ch.close()
