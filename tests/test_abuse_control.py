"""The bounded CI subset of the control-plane abuse run (tests/abuse/control.py): a short flood
from 10 control connections (malformed frames, half frames left hanging, garbage bytes among the
requests), 400 idle connections, half-open and silent sessions, all from another uid
when run as root.  Asserts survival, that descriptors and memory come back, and that a normal
client is served throughout and after.  No timing assertions: latency is reported by the full
run (``python -m tests.abuse.control --seconds 60``), not judged here."""

from __future__ import annotations

from tests.abuse import control


def test_the_daemon_survives_a_short_abuse_run_and_serves_a_normal_client():
    report = control.run(seconds=6, clients=10, idle_connections=400)
    assert report["daemon_alive"] and report["daemon_exit"] == 0, report
    assert report["daemon_tracebacks"] == 0, report
    # The flood was real and was answered, with errors, never with internal errors.
    flood = report["flood"]
    assert flood["answered"] > 1000 and "error" not in flood["codes"], flood
    assert flood["idle"]["held"] == 400, flood
    # Bad framing closed connections, each refusal counted: garbage, empty, oversized and
    # non-map frames at once, half frames after control_request_timeout.  (Quotas on control
    # connections: tests/test_listener_flood.py.)
    counters = report["daemon_counters"]
    assert flood["closed_by_daemon"] > 10 and counters["control_frames_refused"] > 10, report
    assert counters["control_connections_timed_out"] > 0, report
    # The normal client never failed, during the flood or after it.
    assert report["latency_idle"]["errors"] == 0 and report["latency_flood"]["errors"] == 0
    assert report["latency_flood"]["n"] > 0 and report["served_after"], report
    assert report["daemon_clients_after"] == 1, report
    # What the flood held is given back: hundreds of connections were open at the peak, and
    # afterwards the count is back at its baseline (the margin covers the container-death
    # watcher's engine connections when a Docker engine is present, docs/daemon.md).
    assert report["peak"]["fds"] > report["before"]["fds"] + 100, report
    assert report["after"]["fds"] <= report["before"]["fds"] + 32, report
    assert report["after"]["rss_kib"] < report["before"]["rss_kib"] + 64 * 1024, report
