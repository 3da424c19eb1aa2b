"""Crash-matrix rows for the C client: a C publisher SIGKILLed at random instants mid-publish and
mid-batch, a C subscriber SIGKILLed mid-receive (spec/ring.md, "Crash points": the C
paths make the same stores in the same order as the Python ones).  After every kill the
channel is usable (a successor publishes and is received), nothing committed is lost (reliable:
sequence numbers without a gap; lossy: every gap counted exactly in ``lost``), nothing is torn
(every byte checked), and the dead process's slot and publisher role are reclaimed."""

from __future__ import annotations

import random
import signal
import time

import pytest

import shimmy
from shimmy.errors import BackpressureTimeout, ReceiveTimeout
from shimmy.sdk.client import get_client
from tests.c_client import check, needs_c, needs_v2, payload, start, wait_file
from workers import until

pytestmark = [needs_c, needs_v2]

CAP = 1 << 16
SIZE = 2000
TRIALS = 8


def _entry(daemon, name: str) -> dict:
    reply = get_client(daemon.socket).request("list")
    return next(c for c in reply["channels"] if c["name"] == name)


class Checker:
    """A Python subscriber checking what every C publisher of the row sent."""

    def __init__(self, sub, lossy: bool):
        self.sub, self.lossy = sub, lossy
        self.seq = -1       # last sequence number received
        self.index = -1     # last message index received (successors start above it)
        self.received = 0

    def take(self, timeout: float) -> bool:
        before = self.sub.lost
        try:
            data = self.sub.receive_bytes(timeout=timeout)
        except ReceiveTimeout:
            return False
        index = check(data)   # torn bytes fail here
        seq = self.sub.last_seq
        gap = seq - self.seq - 1
        assert gap == (self.sub.lost - before if self.lossy else 0), \
            f"seq {seq} after {self.seq}: {gap} missing, lost says {self.sub.lost - before}"
        assert index > self.index, f"message #{index} after #{self.index}"
        self.seq, self.index = seq, index
        self.received += 1
        return True

    def drain(self) -> None:
        while self.take(0.3):
            pass


@pytest.mark.parametrize("mode", ["reliable", "lossy"])
@pytest.mark.parametrize("how", [[], ["--batch", "40"], ["--loan"]],
                         ids=["publish", "batch", "loan"])
def test_c_publisher_killed(daemon, mode, how):
    name = f"crash/pub/{mode}/{len(how)}"
    rng = random.Random(name)
    ch = shimmy.Channel(name, daemon=daemon.socket, mode=mode, capacity=CAP)
    checker = Checker(ch.subscribe(), mode == "lossy")
    for _ in range(TRIALS):
        pub = start("pub", "--daemon", daemon.socket, "--count", str(10**9), "--size", str(SIZE),
                    "--mixed", "--first", str(checker.index + 1000), *how, name)
        kill_at = time.monotonic() + rng.uniform(0.005, 0.15)
        while time.monotonic() < kill_at:
            checker.take(0.001)
        pub.send_signal(signal.SIGKILL)
        pub.wait(10)
        checker.drain()
        # the role is free again once the daemon saw the session close
        until(lambda: not _entry(daemon, name)["publisher"], 5.0, "the publisher role freed",
              every=0.02)
    before, lost = checker.received, checker.sub.lost
    last = start("pub", "--daemon", daemon.socket, "--count", "500", "--size", str(SIZE),
                 "--mixed", "--first", str(checker.index + 1000), *how, name)

    def accounted() -> int:
        return checker.received - before + checker.sub.lost - lost

    while accounted() < 500 and checker.take(10):
        pass
    out, err = last.communicate(timeout=30)
    assert last.returncode == 0, out + err
    # the successor's messages, every one received (lossy: or counted lost)
    assert accounted() == 500 and (mode == "lossy" or checker.sub.lost == 0)
    entry = _entry(daemon, name)
    assert [s["client"] for s in entry["subscribers"]] == [get_client(daemon.socket).id]
    ch.close()


@pytest.mark.parametrize("mode", ["reliable", "lossy"])
def test_c_subscriber_killed(daemon, tmp_path, mode):
    name = f"crash/sub/{mode}"
    rng = random.Random(name)
    ch = shimmy.Channel(name, daemon=daemon.socket, mode=mode, capacity=CAP)
    i = 0
    for trial in range(TRIALS):
        ready = tmp_path / f"ready{trial}"
        sub = start("sub", "--daemon", daemon.socket, "--count", str(10**9), "--receive",
                    ("view", "copy", "many")[trial % 3], "--ready", str(ready), name)
        wait_file(ready, sub)
        kill_at = time.monotonic() + rng.uniform(0.005, 0.1)
        while time.monotonic() < kill_at:
            ch.publish(payload(i, 8 + i % SIZE), timeout=5)
            i += 1
        sub.send_signal(signal.SIGKILL)
        out, err = sub.communicate(timeout=10)
        assert "message" not in out, out   # it found nothing wrong before it died
        # its slot is freed with its session: a reliable publisher no longer waits for it
        until(lambda: not _entry(daemon, name)["subscribers"], 5.0, "the slot freed",
              every=0.02)
        for _ in range(3 * CAP // 64):   # three rings' worth: would block on a stale slot
            ch.publish(payload(i, 32), timeout=5)
            i += 1
    ready = tmp_path / "ready-last"
    sub = start("sub", "--daemon", daemon.socket, "--count", "1000", "--ready", str(ready), name)
    wait_file(ready, sub)
    for j in range(i, i + 1000):
        ch.publish(payload(j, 8 + j % SIZE), timeout=5)
    out, err = sub.communicate(timeout=30)
    assert sub.returncode == 0, out + err
    lines = out.splitlines()
    if mode == "reliable":
        assert lines == [f"received 1000 in order from #{i}"], out
    else:   # received + lost = 1000 (the first may be lost too: then it starts later)
        got = int(lines[0].split()[1])
        lost = int(lines[1].split()[1]) if len(lines) > 1 else 0
        assert got + lost == 1000 and lines[0].startswith(f"received {got} in order from #"), out
    ch.close()


@pytest.mark.parametrize("mode", ["reliable", "lossy"])
def test_c_group_publisher_killed(daemon, mode):
    """A publisher group (max_publishers 3) with a Python publisher throughout; per trial a C
    publisher is SIGKILLed at a random instant.  Every publisher's messages arrive intact and
    in order (reliable: none missing; lossy: every gap counted), and each dead member ring is
    reclaimed once drained: gone from the daemon's book and from /dev/shm."""
    name = f"crash/group/{mode}"
    rng = random.Random(name)
    ch = shimmy.Channel(name, daemon=daemon.socket, mode=mode, capacity=CAP, max_publishers=3)
    sub = ch.subscribe()
    steady = shimmy.Channel(name, daemon=daemon.socket, max_publishers=3)
    steady.publish(payload(0, 64))   # its member ring exists from here on
    last: dict[int, tuple[int, int]] = {}   # publisher id -> (seq, index) received last
    shm_before = set(daemon.shm_objects())
    i = 1

    def take(timeout: float) -> bool:
        before = sub.lost
        try:
            data = sub.receive_bytes(timeout=timeout)
        except ReceiveTimeout:
            return False
        index, who, seq = check(data), sub.last_publisher, sub.last_seq
        prev_seq, prev_index = last.get(who, (-1, -1))
        assert seq - prev_seq - 1 == (sub.lost - before if mode == "lossy" else 0), (who, seq)
        assert index > prev_index, (who, index, prev_index)
        last[who] = (seq, index)
        return True

    for _ in range(TRIALS):
        pub = start("pub", "--daemon", daemon.socket, "--count", str(10**9), "--size",
                    str(SIZE), "--mixed", "--max-publishers", "3", name)
        kill_at = time.monotonic() + rng.uniform(0.005, 0.15)
        while time.monotonic() < kill_at:
            try:
                steady.publish(payload(i, 8 + i % SIZE), timeout=0)
                i += 1
            except BackpressureTimeout:   # (reliable) its ring is full: read first
                pass
            for _ in range(20):
                if not take(0):
                    break
        pub.send_signal(signal.SIGKILL)
        pub.wait(10)
        while take(0.3):
            pass
        # the dead member is reclaimed once drained: only the steady publisher is left
        until(lambda: len(_entry(daemon, name).get("publishers", [])) == 1 and
              set(daemon.shm_objects()) == shm_before, 10.0, "the dead member reclaimed",
              every=0.02)
    assert len(last) >= 2   # the steady publisher and at least one C publisher delivered
    steady.close()
    ch.close()
