"""A subscriber's adaptive spin (sdk/channel.py, ``Subscription._wait``): it keeps its spin
while messages come within SPIN_KEEP spin ceilings of its sleep, and gives it up when they come
far apart.  A publisher in another process paces real messages through a real daemon.

The spin once collapsed whenever a wait ran past one ceiling: a cross-node round trip that took
longer than the spin once then stayed without it, and 2-4x slower (docs/performance.md)."""

from __future__ import annotations

import multiprocessing as mp
import time

import shimmy

SPIN_US = 1000   # a ceiling well above this machine's timer slack, so the pacing is what counts


def _pace(sock: str, name: str, gap: float, count: int, go) -> None:
    ch = shimmy.Channel(name, daemon=sock)
    ch.publish(b"")                                 # take the publisher role before the clock
    go.wait(30)
    for i in range(count):
        time.sleep(gap)
        ch.publish(i.to_bytes(4, "little"))


def _spin_after(daemon, name: str, gap: float, count: int) -> dict:
    ch = shimmy.Channel(name, daemon=daemon.socket)
    sub = ch.subscribe(spin_us=SPIN_US)
    go = mp.Event()
    p = mp.Process(target=_pace, args=(daemon.socket, name, gap, count, go))
    p.start()
    try:
        sub.receive(timeout=30)                     # the publisher's announcement
        go.set()
        for i in range(count):
            assert int.from_bytes(sub.receive_bytes(timeout=30), "little") == i
        return sub.stats()
    finally:
        p.join(30)
        ch.close()


def test_messages_within_a_few_ceilings_keep_the_spin(daemon):
    # Every message comes ~1 ms after the spin gave up (2 ms apart, 1 ms spin): past one
    # ceiling, within SPIN_KEEP.  The spin stays at its ceiling, or a few late wake-ups (a
    # loaded machine) below it; with a rule of one ceiling it falls to its 2 µs floor.
    st = _spin_after(daemon, "spin/keep", 0.002, 60)
    assert st["sleeps"] > 0            # it did give up spinning: the rule was exercised
    assert st["spin_us"] >= SPIN_US / 8, st


def test_messages_far_apart_give_the_spin_up(daemon):
    # 30 ms apart: far past SPIN_KEEP ceilings; each wait halves the spin down to its floor.
    st = _spin_after(daemon, "spin/drop", 0.03, 16)
    assert st["spin_us"] <= SPIN_US / 2 ** 8, st
