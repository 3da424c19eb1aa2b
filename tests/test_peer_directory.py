"""The cluster directory (daemon/peer/directory.py) on its own: what a peer's ``dir`` message may
hold, how announcements become deltas, and when a node without a link is forgotten.  The
multi-daemon behaviour built on it is in test_peer_order.py."""

from __future__ import annotations

import pytest

from shimmy.daemon.peer.directory import (OPEN, PUBLISHED, REPLICA, BadAnnouncement, Directory,
                                          Entry, parse_entry)


@pytest.mark.parametrize("value", [
    [0, 4096, 0, 0, 1, ""],                    # an entry of the old six-field format
    [9, 4096, 0, 0, 1, "", 1],                 # unknown mode
    [0, 4096, -1, 0, 1, "", 1],                # negative tail
    [0, 4096, 0, 0, 7, "", 1],                 # unknown kind
    [0, 4096, 0, 0, 1, 5, 1],                  # source not a string
    [0, 4096, 0, 0, 1, "x" * 256, 1],          # source name too long
    [0, True, 0, 0, 1, "", 1],                 # a bool is not a size
    "not a list",
])
def test_malformed_entries_are_refused_by_name(value):
    with pytest.raises(BadAnnouncement, match="'chan'"):
        parse_entry("chan", value)


def test_entry_round_trips_through_the_wire_format():
    e = Entry(1, 1 << 20, 4096, 17, REPLICA, "A", 12345)
    assert parse_entry("x", e.wire()) == e


def test_announcements_are_deltas():
    d = Directory()
    a = Entry(0, 4096, 0, 0, OPEN)
    changed, gone = d.delta({"a": a})
    assert changed == {"a": a} and gone == []
    assert d.delta({"a": a}) == ({}, [])                    # nothing changed: nothing sent
    b = Entry(0, 4096, 64, 3, PUBLISHED, "", 9)
    assert d.delta({"a": b}) == ({"a": b}, [])              # the tail moved
    assert d.delta({}) == ({}, ["a"])                       # closed for good


def test_publishers_follow_the_first_node_name_and_skip_nodes_down():
    d = Directory()
    pub = Entry(0, 4096, 0, 0, PUBLISHED, "", 1)
    d.apply("B", True, {"x": pub}, [])
    d.apply("A", True, {"x": pub, "y": Entry(0, 4096, 0, 0, OPEN)}, [])
    assert [n for n, _ in d.publishers("x")] == ["A", "B"]
    assert d.publishers("y") == []
    d.link_down("A", now=100.0)
    assert [n for n, _ in d.publishers("x")] == ["B"]
    assert d.expired(now=105.0, forget_after=10.0) == []
    assert d.expired(now=110.0, forget_after=10.0) == ["A"]
    assert sorted(d.nodes) == ["B"]


def test_a_delta_from_a_peer_updates_and_removes():
    d = Directory()
    d.apply("A", True, {"x": Entry(0, 4096, 0, 0, OPEN), "y": Entry(0, 4096, 0, 0, OPEN)}, [])
    d.apply("A", False, {"x": Entry(0, 4096, 32, 1, PUBLISHED, "", 5)}, ["y"])
    assert set(d.nodes["A"]) == {"x"} and d.nodes["A"]["x"].kind == PUBLISHED
    d.apply("A", True, {}, [])                               # a full announcement replaces
    assert d.nodes["A"] == {}
