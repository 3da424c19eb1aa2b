"""/metrics of a real daemon, scraped over HTTP while real publisher and subscriber processes
move messages through real shared memory; parsed with the Prometheus text parser."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

import msgpack
import pytest

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from shimmy.protocol import PROTOCOL_VERSION, frame, read_frame  # noqa: E402
from workers import until  # noqa: E402

# The worker scripts' wait for a file the test creates (they run as ``python -c``, without the
# tests folder on their path, so the text itself is shared; ``role`` names the worker).
WAIT_FOR = r"""
import os, time
def wait_for(path, limit=60.0):
    end = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise SystemExit(f"{role}: {path} never appeared")
        time.sleep(0.01)
"""

# One worker script, three roles, driven by files so the test decides when each side moves.
WORKER = r"""
import json, os, sys, time
import shimmy
role, daemon, name, mode, capacity, count, work = sys.argv[1:8]
capacity, count = int(capacity), int(count)
""" + WAIT_FOR + r"""
ch = shimmy.Channel(name, daemon=daemon, mode=mode, capacity=capacity)
if role == "pub":
    data = b"x" * 100
    for _ in range(count):
        ch.publish(data, timeout=60)
    ch.close()
    open(os.path.join(work, "pub.done"), "w").close()
else:
    sub = ch.subscribe()
    open(os.path.join(work, "sub.ready"), "w").close()
    wait_for(os.path.join(work, "sub.go"))
    got = 0
    while got < count:
        msg = sub.receive_bytes(timeout=10)
        got += 1 + 0 * len(msg)
        if mode == "lossy" and sub.last_seq == count - 1:
            break
    with open(os.path.join(work, "sub.json"), "w") as fh:
        json.dump({"received": got, "lost": sub.lost}, fh)
    wait_for(os.path.join(work, "sub.exit"))
    sub.close()
    ch.close()
"""


def _metrics_daemon(daemon_factory, tmp_path, **settings):
    cfg = tmp_path / "shimmyd.toml"
    lines = ['metrics_listen = "127.0.0.1:0"'] + [f"{k} = {v!r}" for k, v in settings.items()]
    cfg.write_text("\n".join(lines) + "\n")
    d = daemon_factory("--config", str(cfg))
    m = until(lambda: re.search(r"metrics on http://([\d.]+:\d+)/metrics", d.log()), 15.0,
              "the metrics endpoint announced in the daemon's log", every=0.02)
    return d, f"http://{m.group(1)}/metrics"


def scrape(url: str) -> dict:
    """{(sample name, frozenset(labels)): value} of one scrape."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def _spawn(role, daemon, name, mode, capacity, count, work):
    return subprocess.Popen([sys.executable, "-c", WORKER, role, daemon.socket, name, mode,
                             str(capacity), str(count), str(work)])


def _wait(path, proc=None, limit=60.0):
    """Until the file ``path`` exists; fails at once when ``proc`` (its writer) exited."""
    def there() -> bool:
        assert proc is None or proc.poll() is None, f"worker exited with {proc.returncode}"
        return os.path.exists(path)
    until(there, limit, f"{path} to appear", every=0.01)


def test_metrics_follow_reliable_traffic_and_backpressure(daemon_factory, tmp_path):
    d, url = _metrics_daemon(daemon_factory, tmp_path)
    before = scrape(url)
    assert value(before, "shimmy_channels") == 0
    assert value(before, "shimmy_clients") == 0
    name, count, frame = "metrics/reliable", 2000, 128   # 100 B + 16 B header, 16-aligned
    sub = _spawn("sub", d, name, "reliable", 16384, count, tmp_path)
    pub = None
    try:
        _wait(tmp_path / "sub.ready", sub)
        pub = _spawn("pub", d, name, "reliable", 16384, count, tmp_path)
        # The subscriber does not read yet: the 16 KiB ring fills and the publisher waits.
        blocked = until(lambda: (lambda s: s if (value(
            s, "shimmy_channel_backpressure_waits_total", channel=name) or 0) > 0 else None)(
            scrape(url)), 30.0, "the publisher waiting for room")
        assert value(blocked, "shimmy_channel_ring_fill_ratio", channel=name) > 0.5
        assert value(blocked, "shimmy_channel_subscriber_lag_bytes_max", channel=name) > 8192
        assert value(blocked, "shimmy_channel_subscribers", channel=name, state="active") == 1
        assert value(blocked, "shimmy_channel_publisher_attached", channel=name) == 1
        assert value(blocked, "shimmy_clients") == 2
        stalled = value(blocked, "shimmy_channel_messages_published_total", channel=name)
        assert 0 < stalled < count
        (tmp_path / "sub.go").touch()
        assert pub.wait(60) == 0
        _wait(tmp_path / "sub.json", sub)
        after = scrape(url)
        assert value(after, "shimmy_channel_messages_published_total", channel=name) == count
        assert value(after, "shimmy_channel_published_bytes_total", channel=name) == count * frame
        assert value(after, "shimmy_channel_subscriber_lag_bytes_max", channel=name) == 0
        assert value(after, "shimmy_channel_ring_fill_ratio", channel=name) == 0
        assert value(after, "shimmy_channel_messages_lost_total", channel=name) == 0
        waits = value(after, "shimmy_channel_backpressure_waits_total", channel=name)
        assert waits >= value(blocked, "shimmy_channel_backpressure_waits_total", channel=name)
        for op in ("hello", "open", "subscribe", "publish"):
            assert value(after, "shimmy_control_requests_total", op=op) >= 1, op
        assert value(after, "shimmy_control_requests_total", op="hello") == 2
        (tmp_path / "sub.exit").touch()
        assert sub.wait(30) == 0
        gone = until(lambda: (lambda s: s if value(s, "shimmy_clients") == 0 else None)(
            scrape(url)), 30.0, "the clients gone")
        assert value(gone, "shimmy_channel_subscribers", channel=name, state="active") == 0
        assert value(gone, "shimmy_channel_messages_published_total", channel=name) == count
    finally:
        for p in (pub, sub):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def test_metrics_count_lossy_losses_and_control_errors(daemon_factory, tmp_path):
    d, url = _metrics_daemon(daemon_factory, tmp_path)
    name, count = "metrics/lossy", 1000
    sub = _spawn("sub", d, name, "lossy", 4096, count, tmp_path)
    try:
        _wait(tmp_path / "sub.ready", sub)
        pub = _spawn("pub", d, name, "lossy", 4096, count, tmp_path)
        assert pub.wait(60) == 0            # lossy: never waits, overwrites the unread
        s = scrape(url)
        assert value(s, "shimmy_channel_messages_published_total", channel=name) == count
        assert value(s, "shimmy_channel_backpressure_waits_total", channel=name) == 0
        assert value(s, "shimmy_channel_messages_lost_total", channel=name) == 0  # not read yet
        (tmp_path / "sub.go").touch()
        _wait(tmp_path / "sub.json", sub)
        lost = json.loads((tmp_path / "sub.json").read_text())["lost"]
        assert lost > count // 2            # a 4 KiB ring holds 32 of the 1000 messages
        s = scrape(url)
        assert value(s, "shimmy_channel_messages_lost_total", channel=name) == lost
        (tmp_path / "sub.exit").touch()
        assert sub.wait(30) == 0
        # The subscriber's slot is gone; the channel's lost counter must not go down.
        s = until(lambda: (lambda s: s if value(s, "shimmy_clients") == 0 else None)(
            scrape(url)), 30.0, "the clients gone")
        assert value(s, "shimmy_channel_messages_lost_total", channel=name) == lost
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()

    # Errors by operation and code: a request that is not msgpack, and an unknown op.
    for payload in (b"\xc1 not msgpack", msgpack.packb({"v": PROTOCOL_VERSION, "op": "nope"})):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(d.socket)
            sock.sendall(frame(payload))
            reply = msgpack.unpackb(read_frame(sock, time.monotonic() + 10))
            assert reply["ok"] is False, reply
    s = scrape(url)
    assert value(s, "shimmy_control_errors_total", op="malformed", code="protocol") == 2
    assert value(s, "shimmy_control_requests_total", op="malformed") == 2
    assert value(s, "shimmy_control_errors_total", op="hello", code="protocol") is None


CARDINALITY_WORKER = r"""
import os, sys, time
from shimmy.sdk.client import DaemonClient
path, clients, per_client, ready, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
    sys.argv[4], sys.argv[5]
held = []
for c in range(clients):
    cl = DaemonClient(path)
    held.append(cl)
    for k in range(per_client):
        name = f"card/{c}/{k}"
        cl.request("open", name=name, mode="lossy", capacity=4096)
        cl.request("subscribe", name=name, start="next")
open(ready, "w").close()
end = time.monotonic() + 120
while not os.path.exists(stop) and time.monotonic() < end:
    time.sleep(0.05)
for cl in held:
    cl.close()
"""

ALLOWED_LABELS = {"channel", "state", "op", "code", "peer", "role", "event", "transport", "rdma",
                  "stream", "listener"}


def test_metrics_label_sets_stay_bounded(daemon_factory, tmp_path):
    """1,000 channels held by 200 clients: one series per channel (per state) and no label per
    client; the label names are the documented, bounded set."""
    d, url = _metrics_daemon(daemon_factory, tmp_path, max_channels=1000, max_clients=256,
                              quota_channels=1000, quota_sessions=256, quota_connections=256,
                              quota_control_connections=256,
                              quota_subscribers=2000)
    ready, stop = tmp_path / "ready", tmp_path / "stop"
    proc = subprocess.Popen([sys.executable, "-c", CARDINALITY_WORKER, d.socket, "200", "5",
                             str(ready), str(stop)])
    try:
        _wait(ready, proc, limit=100)
        with urllib.request.urlopen(url, timeout=30) as resp:
            text = resp.read().decode()
        series: dict[str, int] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                assert set(s.labels) <= ALLOWED_LABELS, (s.name, s.labels)
                series[s.name] = series.get(s.name, 0) + 1
        assert series["shimmy_channel_messages_published_total"] == 1000
        assert series["shimmy_channel_subscriber_lag_bytes_max"] == 1000
        assert series["shimmy_channel_subscribers"] == 2000       # active + evicted per channel
        samples = scrape(url)
        assert value(samples, "shimmy_clients") == 200
        assert value(samples, "shimmy_channels") == 1000
        # Bounded: every family is either global, per op/code/event, or one series per channel.
        assert sum(series.values()) < 1000 * 16 + 200
    finally:
        stop.touch()
        try:
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_metrics_listen_is_validated(tmp_path):
    from shimmy.daemon import config
    for bad in ("9464", "host:", "host:99999", ":80"):
        with pytest.raises(ValueError, match="metrics_listen"):
            config.load(None, metrics_listen=bad)
    with pytest.raises(ValueError, match="log_format"):
        config.load(None, log_format="xml")
    assert config.load(None, metrics_listen="127.0.0.1:9464").metrics_listen == "127.0.0.1:9464"


def test_json_logs_parse_line_by_line(daemon_factory, tmp_path):
    cfg = tmp_path / "shimmyd.toml"
    cfg.write_text('log_format = "json"\n')
    d = daemon_factory("--config", str(cfg))
    d.stop()
    lines = [json.loads(line) for line in d.log().splitlines() if line.strip()]
    assert any(r["msg"].startswith("daemon ready") for r in lines)
    assert all({"ts", "level", "logger", "msg", "pid"} <= set(r) for r in lines)
    assert lines[-1]["msg"] == "daemon stopped" and lines[-1]["level"] == "info"


NO_PROMETHEUS = r"""
import sys
sys.modules["prometheus_client"] = None     # as if the `metrics` extra were not installed
from shimmy.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_daemon_without_prometheus_client(tmp_path):
    """The base install has no prometheus-client: the daemon runs, and one asked to serve
    metrics stops with a message saying what to install, not a traceback."""
    sock = str(tmp_path / "shimmyd.sock")
    cfg = tmp_path / "shimmyd.toml"
    cfg.write_text('metrics_listen = "127.0.0.1:0"\n')
    proc = subprocess.run([sys.executable, "-c", NO_PROMETHEUS, "daemon", "--socket", sock,
                           "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "pip install 'shimmy[metrics]'" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not os.path.exists(sock)          # shut down cleanly: socket removed

    log = tmp_path / "daemon.log"
    with open(log, "w") as fh:
        plain = subprocess.Popen([sys.executable, "-c", NO_PROMETHEUS, "daemon", "--socket",
                                  sock], stdout=fh, stderr=subprocess.STDOUT)
    try:
        until(lambda: "daemon ready" in log.read_text() or plain.poll() is not None, 30.0,
              "the daemon ready or exited")
        assert plain.poll() is None, log.read_text()      # up and serving without the package
    finally:
        plain.terminate()
        plain.wait(30)
    assert plain.returncode == 0, log.read_text()
    assert "Traceback" not in log.read_text()
