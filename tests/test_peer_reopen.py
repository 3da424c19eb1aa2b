"""``Channel.reopen`` on one node, against a real daemon killed with SIGKILL and started again
(the part of the cross-node restart story that needs no peer; docs/peering.md, "Restarts and
links"): a publisher carries its stream over with its messages' own numbers, and a
subscription of a reopened channel continues on the new ring."""

from __future__ import annotations

import pytest

import shimmy


def _reopen(ch) -> None:
    import time
    deadline = time.monotonic() + 20
    while True:
        try:
            ch.reopen()
            return
        except shimmy.DaemonUnavailable:
            assert time.monotonic() < deadline
            time.sleep(0.02)


@pytest.mark.parametrize("mode", ["reliable", "lossy"])
def test_publisher_carries_its_stream_over_a_daemon_sigkill(daemon, mode):
    cap = 64 << 10
    pub = shimmy.Channel("carry/x", daemon=daemon.socket, mode=mode, capacity=cap)
    sub_ch = shimmy.Channel("carry/x", daemon=daemon.socket)
    sub = sub_ch.subscribe()
    payload = [b"%06d" % i + b"x" * (i % 700) for i in range(400)]
    for i in range(150):
        assert pub.publish(payload[i]) == i
    for i in range(100):   # the subscriber has read 100; 50 are unread in the ring
        m = sub.receive(timeout=5)
        assert m.seq == i and bytes(m) == payload[i]
    daemon.kill()
    for i in range(150, 160):   # published into the old ring after the daemon died
        assert pub.publish(payload[i]) == i
    daemon.start()              # sweeps the old ring, marking it retired: publish says so
    with pytest.raises(shimmy.ChannelRetired, match="retired"):
        pub.publish(payload[160])
    _reopen(pub)
    _reopen(sub_ch)             # the same Subscription object continues
    check = shimmy.Channel("carry/x", daemon=daemon.socket).subscribe(start="oldest")
    got = []
    while True:
        m = check.receive_nowait()
        if m is None:
            break
        got.append((m.seq, bytes(m)))
    # Everything the old ring still held, with its own numbers (reliable: from the oldest
    # message a subscriber had not consumed; lossy: from the old ring's head).
    assert got and got[-1] == (159, payload[159]), got[-3:]
    assert all(data == payload[seq] for seq, data in got)
    assert [s for s, _ in got] == list(range(got[0][0], 160))
    if mode == "reliable":
        assert got[0][0] <= 100, got[0]
    assert pub.publish(payload[160]) == 160   # the numbering goes on
    # The reopened subscription: the next message after the reopen; the numbers it missed
    # (those published before it resubscribed) are counted exactly in ``lost``.
    m = sub.receive(timeout=5)
    assert m.seq == 160 and bytes(m) == payload[160] and m.lost == 160 - 100, m
    for ch in (pub, sub_ch, check.channel):
        ch.close()
