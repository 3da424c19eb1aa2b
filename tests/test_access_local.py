"""Access control decided from the client's peer credentials, without containers."""

from __future__ import annotations

import pytest

import shimmy


def test_closed_access_refuses_a_process_outside_containers(daemon_factory):
    d = daemon_factory("--access", "closed")
    with pytest.raises(shimmy.PermissionDenied, match=r"process \d+ \(outside any container\) "
                                                      r"may not open channel 'secret'") as info:
        shimmy.Channel("secret", daemon=d.socket)
    assert isinstance(info.value, PermissionError)
    # Nothing was created for the refused client, and the daemon still serves.
    assert d.shm_objects() == []


def test_open_access_is_the_default_on_a_single_host(daemon):
    with shimmy.Channel("public", daemon=daemon.socket) as ch:
        sub = ch.subscribe()
        ch.publish(b"hi")
        assert bytes(sub.receive(timeout=1)) == b"hi"
