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


class _KillAfterOpen:
    """Fault injection: a client of the SDK's that SIGKILLs ``daemon`` right after the daemon
    answered an ``open``, so a ``Channel.reopen`` is cut short between its ``open`` and the
    ``publish`` that carries the stream (what the crash matrix's peer-source row does when it
    kills a restarted source daemon again)."""

    def __init__(self, client, daemon, restart: bool = False):
        self.client, self.daemon, self.restart = client, daemon, restart

    def __getattr__(self, name):
        return getattr(self.client, name)

    def request(self, op, **fields):
        reply = self.client.request(op, **fields)
        if op == "open":
            self.daemon.kill()
            if self.restart:   # and a newer daemon sweeps the ring just named
                self.daemon.start()
        return reply


def test_reopen_cut_short_still_carries_the_stream(daemon, monkeypatch):
    """A reopen whose new daemon is killed after its ``open`` raises and changes nothing: the
    next reopen carries the old ring's stream into the ring of the daemon after it.  (It used
    to carry nothing: the first try had already let go of the old ring and its writer, so the
    messages the old ring held and no replica had yet were lost, in reliable mode too.)"""
    from shimmy.sdk import channel as channel_module
    cap = 64 << 10
    pub = shimmy.Channel("carry/cut", daemon=daemon.socket, mode="reliable", capacity=cap)
    sub = shimmy.Channel("carry/cut", daemon=daemon.socket).subscribe()
    payload = [b"%06d" % i + b"y" * (i % 700) for i in range(200)]
    for i in range(150):
        assert pub.publish(payload[i]) == i
    for i in range(100):   # 50 are unread: the reliable slot keeps them in the old ring
        assert sub.receive(timeout=5).seq == i
    daemon.kill()
    daemon.start()
    with pytest.raises(shimmy.ChannelRetired):
        pub.publish(payload[150])
    real = channel_module.get_client
    with monkeypatch.context() as patch:
        patch.setattr(channel_module, "get_client", lambda d: _KillAfterOpen(real(d), daemon))
        with pytest.raises(shimmy.DaemonUnavailable):
            pub.reopen()
    daemon.start()
    _reopen(pub)
    check = shimmy.Channel("carry/cut", daemon=daemon.socket).subscribe(start="oldest")
    got = []
    while (m := check.receive_nowait()) is not None:
        got.append((m.seq, bytes(m)))
    # everything from the oldest message the subscriber had not released, with its numbers
    assert got and got[0][0] <= 100 and [s for s, _ in got] == list(range(got[0][0], 150)), \
        [s for s, _ in got][:5]
    assert all(data == payload[seq] for seq, data in got)
    assert pub.publish(payload[150]) == 150
    for ch in (pub, sub.channel, check.channel):
        ch.close()


def test_reopen_whose_ring_is_swept_before_it_is_mapped(daemon, monkeypatch):
    """The daemon that answered a reopen's ``open`` is killed and a newer one sweeps the ring
    it named before the SDK maps it: the reopen raises ChannelRetired (it raised posix_ipc's
    own ExistentialError, which no caller expects) with the publisher left on its old ring,
    and the next reopen carries the stream."""
    from shimmy.sdk import channel as channel_module
    pub = shimmy.Channel("carry/swept", daemon=daemon.socket, mode="reliable", capacity=64 << 10)
    sub = shimmy.Channel("carry/swept", daemon=daemon.socket).subscribe()
    for i in range(20):
        assert pub.publish(b"m%d" % i) == i
    daemon.kill()
    daemon.start()
    real = channel_module.get_client
    with monkeypatch.context() as patch:
        patch.setattr(channel_module, "get_client",
                      lambda d: _KillAfterOpen(real(d), daemon, restart=True))
        with pytest.raises(shimmy.ChannelRetired, match="is gone: its daemon removed it"):
            pub.reopen()
    _reopen(pub)
    check = shimmy.Channel("carry/swept", daemon=daemon.socket).subscribe(start="oldest")
    got = []
    while (m := check.receive_nowait()) is not None:
        got.append(m.seq)
    assert got == list(range(20)), got   # the subscriber had released none of them
    for ch in (pub, sub.channel, check.channel):
        ch.close()
