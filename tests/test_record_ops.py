"""Operators' view of recordings: ``shimmy ls``, ``shimmy stat`` and ``/metrics``."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import shimmy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_metrics import _metrics_daemon, scrape, value  # noqa: E402
from test_record import payload, start_recorder, stop, wait_recorded  # noqa: E402

pytest.importorskip("prometheus_client")


@pytest.mark.timeout(120)
def test_ls_stat_and_metrics_show_each_recording(daemon_factory, tmp_path):
    d, url = _metrics_daemon(daemon_factory, tmp_path)
    root = str(tmp_path / "rec")
    ch = shimmy.Channel("ops.a", daemon=d.socket, capacity=1 << 16)
    rec = start_recorder(d.socket, root, "ops.a")
    wait_recorded(root, "ops.a", 0)
    total = sum(len(payload(i)) for i in range(1000))
    for i in range(1000):
        ch.publish(payload(i))
    wait_recorded(root, "ops.a", 1000)
    try:
        ls = subprocess.run([sys.executable, "-m", "shimmy.cli", "ls", "--daemon", d.socket],
                            capture_output=True, text=True, timeout=30)
        assert ls.returncode == 0, ls.stderr
        row = [line for line in ls.stdout.splitlines() if line.startswith("ops.a ")
               and "reliable" in line and os.path.basename(root) in line]
        assert len(row) == 1, ls.stdout
        assert " 1000 " in row[0] and "0 @ " in row[0] and "999 @ " in row[0]
        assert "0 msgs" in row[0]
        st = subprocess.run([sys.executable, "-m", "shimmy.cli", "stat", "--daemon", d.socket],
                            capture_output=True, text=True, timeout=30)
        assert st.returncode == 0, st.stderr
        assert [line for line in st.stdout.splitlines() if line.startswith("ops.a ")
                and os.path.basename(root) in line] == row
        from shimmy.cli_record import recordings
        (r,) = recordings(d.socket, [{"name": "ops.a", "published": 1000}])
        assert (r["channel"], r["messages"], r["first_seq"], r["next_seq"]) == \
            ("ops.a", 1000, 0, 1000)
        assert r["lag_messages"] == 0 and r["lost"] == 0 and r["errors"] == 0
        assert total + 16 * 1000 <= r["bytes"] <= total + 32 * 1000
        assert r["oldest_ns"] <= r["newest_ns"] <= time.time_ns()
        samples = scrape(url)
        assert value(samples, "shimmy_recording_messages", channel="ops.a", track="0") == 1000
        assert value(samples, "shimmy_recording_bytes", channel="ops.a", track="0") == r["bytes"]
        assert value(samples, "shimmy_recording_lag_messages", channel="ops.a", track="0") == 0
        for counter in ("lost", "write_errors"):
            name = "messages_lost" if counter == "lost" else counter
            assert value(samples, f"shimmy_recording_{name}_total", channel="ops.a",
                         track="0") == 0
        assert value(samples, "shimmy_recording_newest_timestamp_seconds",
                     channel="ops.a", track="0") == pytest.approx(r["newest_ns"] / 1e9)
    finally:
        stop(rec)
    # A recorder that is not running: its lag grows with what the channel publishes.
    for i in range(1000, 1100):
        ch.publish(payload(i))
    samples = scrape(url)
    assert value(samples, "shimmy_recording_lag_messages", channel="ops.a", track="0") == 100
    ch.close()
