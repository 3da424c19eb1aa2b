"""The default limits hold what docs/security.md ("Default limits and why") promises, and idle
channels are reclaimed by the rule docs/daemon.md ("Idle channels") states: never one with an
end attached, and never one with unread messages before ``idle_channel_unread_ttl``."""

from __future__ import annotations

import os
import time

import pytest

import shimmy
from shimmy.daemon.config import Settings
from shimmy.sdk.client import DaemonClient
from workers import until


def _daemon(daemon_factory, tmp_path, text: str = ""):
    cfg = tmp_path / "shimmyd.toml"
    cfg.write_text(text)
    return daemon_factory("--config", str(cfg))


def _listing(client: DaemonClient) -> dict:
    return {ch["name"]: ch for ch in client.request("list")["channels"]}


def test_one_uid_creates_quota_channels_channels_and_the_next_is_refused(daemon):
    """At the shipped defaults (no config): one uid holds quota_channels channels at once, far
    more than the 64 that a test harness met, and the next is refused naming the setting.  Each
    ring costs the daemon one descriptor (Python's mmap keeps a duplicate), never more."""
    quota = Settings().quota_channels
    assert quota == 4096 and Settings().max_channels >= 4 * quota
    client = DaemonClient(daemon.socket)
    try:
        fds_before = len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))
        for i in range(quota):
            client.request("open", name=f"many/{i}", capacity=4096)
        with pytest.raises(shimmy.LimitExceeded, match=f"holds {quota} channels.*quota_channels"
                                                       f"={quota}"):
            client.request("open", name="many/one-more", capacity=4096)
        assert len(os.listdir(f"/proc/{daemon.proc.pid}/fd")) <= fds_before + quota + 4
        listing = client.request("list")["channels"]
        assert len(listing) == quota
        # Deleting one gives its place back.
        client.request("delete", name="many/0")
        client.request("open", name="many/one-more", capacity=4096)
        for i in range(1, quota):
            client.request("delete", name=f"many/{i}")
        client.request("delete", name="many/one-more")
    finally:
        client.close()


def test_an_idle_channel_with_nothing_unread_is_reclaimed_after_its_ttl(daemon_factory,
                                                                        tmp_path):
    d = _daemon(daemon_factory, tmp_path, "idle_channel_ttl = 1.0\n"
                                          "idle_channel_unread_ttl = 30.0\n")
    with shimmy.Channel("idle/read", daemon=d.socket, capacity=4096) as ch:
        sub = ch.subscribe(start="oldest")
        for i in range(3):
            ch.publish(b"m%d" % i)
        assert [bytes(sub.receive(timeout=5)) for _ in range(3)] == [b"m0", b"m1", b"m2"]
    probe = DaemonClient(d.socket)
    try:
        idle = _listing(probe)["idle/read"]["idle"]
        assert idle["unread_bytes"] == 0 and idle["reclaim_in_s"] <= 1.0, idle
        until(lambda: "idle/read" not in _listing(probe), 10, "the read-out channel reclaimed")
        counters = probe.request("stat")["counters"]
        assert counters["channels_reclaimed"] == 1 and counters["channels_reclaimed_unread"] == 0
        assert "nothing unread for idle_channel_ttl=1s" in d.log()
        assert d.shm_objects() == []
    finally:
        probe.close()


def test_unread_messages_keep_an_idle_channel_for_the_longer_ttl_and_say_so(daemon_factory,
                                                                            tmp_path):
    """A publisher that published and left, nobody read: a later start="oldest" subscriber
    would get those messages, so the channel stays for idle_channel_unread_ttl (not
    idle_channel_ttl), ls and stat say so, and its deletion is logged and counted with the bytes
    it dropped.  A subscriber that arrives meanwhile gets every message."""
    d = _daemon(daemon_factory, tmp_path, "idle_channel_ttl = 0.5\n"
                                          "idle_channel_unread_ttl = 4.0\n")
    for name in ("unread/late", "unread/never"):
        with shimmy.Channel(name, daemon=d.socket, capacity=4096) as ch:
            for i in range(5):
                ch.publish(b"u%d" % i)
    probe = DaemonClient(d.socket)
    try:
        idle = _listing(probe)["unread/never"]["idle"]
        assert idle["unread_bytes"] > 0 and 2.0 < idle["reclaim_in_s"] <= 4.0, idle
        time.sleep(1.5)   # three times idle_channel_ttl: both still there
        assert {"unread/late", "unread/never"} <= set(_listing(probe))
        with shimmy.Channel("unread/late", daemon=d.socket) as ch:
            sub = ch.subscribe(start="oldest")
            assert [bytes(sub.receive(timeout=5)) for _ in range(5)] == \
                [b"u%d" % i for i in range(5)]
        # unread/late was read to its end: it goes after idle_channel_ttl; unread/never after
        # idle_channel_unread_ttl, with its bytes counted.
        until(lambda: not {"unread/late", "unread/never"} & set(_listing(probe)), 10,
               "both reclaimed")
        counters = probe.request("stat")["counters"]
        assert counters["channels_reclaimed"] == 2, counters
        assert counters["channels_reclaimed_unread"] == 1, counters
        assert counters["unread_bytes_dropped"] == idle["unread_bytes"], counters
        assert f"deleting it with {idle['unread_bytes']} unread bytes" in d.log()
    finally:
        probe.close()


def test_a_channel_with_an_end_attached_is_never_reclaimed(daemon_factory, tmp_path):
    """Attached ends of every kind, past both timeouts: a subscriber with no publisher, a
    publisher with no subscriber, a client that only opened it.  And with
    idle_channel_unread_ttl = 0 a channel holding unread messages is kept for good."""
    d = _daemon(daemon_factory, tmp_path, "idle_channel_ttl = 0.3\n"
                                          "idle_channel_unread_ttl = 0\n")
    sub_only = shimmy.Channel("held/sub", daemon=d.socket, capacity=4096)
    sub = sub_only.subscribe()
    pub_only = shimmy.Channel("held/pub", daemon=d.socket, capacity=4096)
    pub_only.publish(b"nobody reads this yet")
    opened = shimmy.Channel("held/open", daemon=d.socket, capacity=4096)
    with shimmy.Channel("kept/unread", daemon=d.socket, capacity=4096) as ch:
        ch.publish(b"for a later reader")
    probe = DaemonClient(d.socket)
    try:
        time.sleep(2.0)   # several housekeeping passes past idle_channel_ttl
        listing = _listing(probe)
        assert {"held/sub", "held/pub", "held/open", "kept/unread"} <= set(listing)
        assert all("idle" not in listing[n] for n in ("held/sub", "held/pub", "held/open"))
        kept = listing["kept/unread"]["idle"]
        assert kept["unread_bytes"] > 0 and kept["reclaim_in_s"] is None, kept
        assert probe.request("stat")["counters"]["channels_reclaimed"] == 0
        # The attached subscriber still works, and the kept messages are still there.
        sub_only.publish(b"still here")
        assert bytes(sub.receive(timeout=5)) == b"still here"
        with shimmy.Channel("kept/unread", daemon=d.socket) as ch:
            assert bytes(ch.subscribe(start="oldest").receive(timeout=5)) == b"for a later reader"
    finally:
        probe.close()
        for ch in (sub_only, pub_only, opened):
            ch.close()
