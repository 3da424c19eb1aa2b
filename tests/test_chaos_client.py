"""The client side of a daemon kill: a request whose daemon is SIGKILLed before it answers, and
replaced by a new daemon on the same socket, fails as soon as the control socket file is
replaced (DaemonUnavailable saying the daemon went away), not after the full request timeout
(the crash matrix's second kills hit this: a reconnecting client stalled 5 s)."""

from __future__ import annotations

import os
import signal
import threading
import time

from shimmy.errors import DaemonUnavailable
from shimmy.sdk.client import DaemonClient


def test_request_to_a_daemon_killed_before_it_answered(daemon):
    client = DaemonClient(daemon.socket)
    assert daemon.proc is not None
    os.kill(daemon.proc.pid, signal.SIGSTOP)     # the daemon takes the request, never answers
    outcome: list[Exception] = []

    def ask() -> None:
        try:
            client.request("list")
        except Exception as exc:   # handed to the test thread
            outcome.append(exc)
    asker = threading.Thread(target=ask)
    asker.start()
    time.sleep(0.2)
    daemon.kill()                                 # SIGKILL reaches a stopped process
    daemon.start()                                # a new daemon on the same socket
    asker.join(30)
    assert not asker.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], DaemonUnavailable), outcome
    assert "went away before it answered 'list'" in str(outcome[0])
    client.close()
    fresh = DaemonClient(daemon.socket)          # and the new daemon serves a new client
    assert fresh.request("list")["channels"] == []
    fresh.close()
