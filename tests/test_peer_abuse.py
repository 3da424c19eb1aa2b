"""Issue 8 finding 8: stalled peer connections must not delay real peers.

Runs the peer-port abuse run (tests/abuse/peer.py) bounded: 60 connections that never speak
and 40 that send random bytes, while a legitimate peer links up.  A's handshake deadline is
set to 30 s, so a daemon that let silent connections hold its handshake slots until their
deadline would keep the legitimate peer out for 30 s.  The test asserts what happened, not how
fast: B linked while silent connections were still open, and pending handshakes were evicted.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "abuse"))

from test_peer_mirror import HAVE_NS  # noqa: E402

pytestmark = pytest.mark.skipif(not HAVE_NS, reason="needs root, unshare and nsenter")


def test_flood_of_silent_and_garbage_connections_does_not_keep_a_peer_out():
    import peer as abuse   # tests/abuse/peer.py
    out = abuse.run(silent=60, garbage=40, seconds=4.0)
    print(out)
    assert out["daemon_alive"], out
    assert out["link_b_up"], out
    # B linked while the stalling connections were still held open (their 30 s handshake
    # deadline far off): the oldest pending handshake was evicted to admit B, not waited out.
    assert out["link_s_flood"] is not None, out
    assert out["silent_open_at_link"] > 0, out
    assert out["counters"]["evicted_pending"] > 0, out
    assert out["counters"]["protocol_errors"] > 0 and out["counters"]["evicted_pending"] > 0, out
    assert out["after"]["fds"] <= out["before"]["fds"] + 5, out   # every connection was closed
