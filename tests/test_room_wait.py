"""A reliable publisher waiting for room sleeps on its ring's room semaphore and is woken by the
consumer whose position reaches what it waits for (spec/ring.md, "Waiting for room"): real
daemons, real subscriber processes, bursts many times the ring.

Each publisher here stretches its bounded sleep (``backoff_max``, what a missed post costs) to
seconds, so a burst of many waits finishes in time only when the posts wake it; the test of a
consumer that never posts (an old client) keeps the bound short and shows the publisher still
gets through.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zlib

import pytest

import shimmy
from shimmy import ring

from tests.c_client import check as c_check
from tests.c_client import needs_c, wait_file
from tests.c_client import payload as c_payload
from tests.c_client import start as c_start
from workers import until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAP = 64 << 10
SIZE = 4000
N = 600                  # about 2.4 MB: some 37 times the ring
SLOW_BOUND = 5.0         # the publisher's sleep bound where posts must wake it (a miss costs 5 s)


def payload(i: int) -> bytes:
    head = struct.pack("<Q", i) + bytes([i & 0xFF]) * (SIZE - 12)
    return head + struct.pack("<I", zlib.crc32(head))


SUBSCRIBER = textwrap.dedent("""
    import struct, sys, time, zlib, shimmy
    sock, name, n, cap, how = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), \\
        sys.argv[5]
    ch = shimmy.Channel(name, daemon=sock, mode="reliable", capacity=cap)
    sub = ch.subscribe("oldest")
    print("ready", flush=True)
    expect, bad = 0, 0
    while expect < n:
        if how == "loan":   # zero copy: released at the next receive (RingReader.take)
            msg = sub.receive(timeout=30)
            data = bytes(msg.data)
        else:
            data = sub.receive_bytes(timeout=30)
        head, crc = data[:-4], struct.unpack("<I", data[-4:])[0]
        if zlib.crc32(head) != crc or struct.unpack("<Q", head[:8])[0] != expect:
            bad += 1
        expect += 1
        if expect % 8 == 0:
            time.sleep(0.002)   # slower than the publisher: it waits for room again and again
    print("got", expect, "bad", bad, flush=True)
    sys.stdin.readline()
    ch.close()
""")


def _subscriber(daemon, name: str, how: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", SUBSCRIBER, daemon.socket, name, str(N), str(CAP),
                          how], env={**os.environ, "PYTHONPATH": ROOT}, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.strip() == "ready", line + p.stderr.read()
    return p


def _publisher(daemon, name: str, bound: float) -> tuple[shimmy.Channel, ring.RingWriter]:
    ch = shimmy.Channel(name, daemon=daemon.socket, mode="reliable", capacity=CAP,
                        publish_timeout=120)
    writer = ch._become_publisher()
    writer._backoff_max = bound
    return ch, writer


def _finish(p: subprocess.Popen) -> str:
    try:
        out, err = p.communicate("bye\n", timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)
    assert p.returncode == 0, out + err
    return out.strip()


def test_publisher_woken_by_local_subscribers(daemon):
    """Two slow subscribers (one copying, one zero copy): each wait for room ends with a post,
    every message arrives in order, and room_wait is 0 once the publisher is done."""
    name = "room/local"
    subs = [_subscriber(daemon, name, how) for how in ("copy", "loan")]
    ch, writer = _publisher(daemon, name, SLOW_BOUND)
    try:
        for i in range(N):
            ch.publish(payload(i))
        waits = ch._view.q[ring.W_WAITS]
        assert waits > 20, f"the publisher waited for room only {waits} times"
        assert ch._view.q[ring.W_ROOM_WAIT] == 0
        # Posts ended the waits; a reader may miss one now and then (no fence on its side,
        # spec/ring.md), which the bound ends: a few at most, where without posts every wait
        # would end so (and cost 5 s).
        assert writer.room_timeouts <= 2, (writer.room_timeouts, waits)
        for p in subs:
            assert _finish(p) == f"got {N} bad 0"
    finally:
        for p in subs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        ch.close()


def test_consumer_that_never_posts(daemon):
    """A consumer that only stores its slot word (what a client from before the room semaphore
    does) never posts: the publisher still gets every message through, each wait ended by its
    bounded sleep (the default backoff_max, 1 ms)."""
    name = "room/old"
    ch = shimmy.Channel(name, daemon=daemon.socket, mode="reliable", capacity=CAP,
                        publish_timeout=60)
    sub = ch.subscribe("oldest")
    writer = ch._become_publisher()
    view, word = ch._view, ch._view.slot_word(sub.slot)
    stop = threading.Event()
    consumed = []

    def old_consumer() -> None:
        while not stop.is_set():
            tail = view.q[ring.W_TAIL]
            view.q[word] = tail          # consume everything committed, post nothing
            consumed.append(tail)
            time.sleep(0.002)

    t = threading.Thread(target=old_consumer)
    t.start()
    try:
        for i in range(N):
            ch.publish(payload(i))
        assert view.q[ring.W_WAITS] > 20
        assert view.q[ring.W_ROOM_WAIT] == 0
        assert writer.room_timeouts > 0   # the bound, not a post, ended its waits
        until(lambda: consumed and consumed[-1] == view.q[ring.W_TAIL], 10,
              "the consumer to reach the tail")
    finally:
        stop.set()
        t.join()
        ch.close()


def test_unsubscribe_frees_a_waiting_publisher(daemon):
    """A subscriber that stops reading and leaves: the daemon, freeing its slot, posts the room
    semaphore, so the publisher (whose bounded sleep is seconds long) goes on at once."""
    name = "room/leave"
    ch, writer = _publisher(daemon, name, SLOW_BOUND)
    other = shimmy.Channel(name, daemon=daemon.socket)
    sub = other.subscribe("oldest")
    done = threading.Event()

    def publish() -> None:
        for i in range(3 * CAP // SIZE):
            ch.publish(payload(i))
        done.set()

    t = threading.Thread(target=publish)
    t.start()
    try:
        until(lambda: ch._view.q[ring.W_ROOM_WAIT], 10, "the publisher to wait for room")
        sub.close()
        assert done.wait(SLOW_BOUND * 0.8), "the publisher did not go on when the slot was freed"
    finally:
        t.join(30)
        other.close()
        ch.close()


@pytest.mark.parametrize("receive", ["view", "copy", "many"])
@needs_c
def test_c_subscriber_posts(daemon, tmp_path, receive):
    """libshimmy's reader posts too: a Python publisher whose bounded sleep is seconds long
    gets a burst through a C subscriber (the sanitized build).  The subscriber is stopped
    (SIGSTOP) until the publisher waits for room, then let go, up to five times while the
    burst lasts, so the publisher waits whatever the two speeds."""
    name = f"room/c-sub/{receive}"
    ready = tmp_path / "ready"
    sub = c_start("sub", "--daemon", daemon.socket, "--count", str(N), "--size", str(SIZE),
                  "--capacity", str(CAP), "--receive", receive, "--start", "oldest",
                  "--ready", str(ready), name, asan=True)
    wait_file(ready, sub)
    ch, writer = _publisher(daemon, name, SLOW_BOUND)
    q = ch._view.q

    def publish() -> None:
        for i in range(N):
            ch.publish(c_payload(i, SIZE))

    t = threading.Thread(target=publish)
    try:
        os.kill(sub.pid, signal.SIGSTOP)
        t.start()
        for _ in range(5):
            until(lambda: q[ring.W_ROOM_WAIT] or not t.is_alive(), 30,
                  "the publisher to wait for room")
            before = writer.room_timeouts
            os.kill(sub.pid, signal.SIGCONT)
            if not t.is_alive():
                break
            until(lambda: not q[ring.W_ROOM_WAIT], 30, "the C subscriber to make room")
            # room_wait was set before the subscriber ran again: no race, its post ended the
            # wait (the bound would have taken 5 s and counted a timeout)
            assert writer.room_timeouts == before
            os.kill(sub.pid, signal.SIGSTOP)
        os.kill(sub.pid, signal.SIGCONT)
        t.join(120)
        out, err = sub.communicate(timeout=120)
        assert sub.returncode == 0, out + err
        assert out.splitlines()[0] == f"received {N} in order from #0", out
        waits = q[ring.W_WAITS]
        assert waits >= 1
        assert writer.room_timeouts <= 2, (writer.room_timeouts, waits)   # as above
        assert q[ring.W_ROOM_WAIT] == 0
    finally:
        if sub.poll() is None:
            os.kill(sub.pid, signal.SIGCONT)
            sub.kill()
            sub.wait(5)
        t.join(30)
        ch.close()


@needs_c
def test_c_publisher_sleeps_on_room(daemon):
    """libshimmy's publisher waits on the room semaphore the same way: it stores what it waits
    for in room_wait while a subscriber holds it back, clears it when done, and delivers every
    message once the subscriber reads."""
    name = "room/c-pub"
    ch = shimmy.Channel(name, daemon=daemon.socket, mode="reliable", capacity=CAP)
    sub = ch.subscribe()
    pub = c_start("pub", "--daemon", daemon.socket, "--count", str(N), "--size", str(SIZE),
                  "--capacity", str(CAP), name, asan=True)
    try:
        need = until(lambda: ch._view.q[ring.W_ROOM_WAIT], 30,
                     "the C publisher to store the position it waits for")
        assert need > 0 and need % 16 == 0
        for i in range(N):
            assert c_check(sub.receive_bytes(timeout=30)) == i
        out, err = pub.communicate(timeout=60)
        assert pub.returncode == 0, out + err
        assert ch._view.q[ring.W_ROOM_WAIT] == 0
    finally:
        if pub.poll() is None:
            pub.kill()
            pub.wait(5)
        ch.close()
