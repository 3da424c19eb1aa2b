"""A publisher group recorded: one track per publisher (member ring), each in its publisher's
order, every message; publishers joining and leaving while it records."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import pytest
from mcap.reader import make_reader

import shimmy
from shimmy import recording
from shimmy.recording_registry import lookup

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from test_record import payload, read_track, start_recorder, stop  # noqa: E402

N = 20_000
SALT = 1_000_000   # publisher k sends payload(k * SALT + i) as its message i


def publish_main(socket: str, name: str, k: int, n: int) -> None:
    ch = shimmy.Channel(name, daemon=socket, mode="reliable", capacity=1 << 18,
                        max_publishers=4)
    for i in range(n):
        assert ch.publish(payload(k * SALT + i), timeout=60) == i
    ch.close()


def _publisher(socket: str, name: str, k: int) -> subprocess.Popen:
    code = (f"import sys; sys.path.insert(0, {HERE!r}); import test_record_group as t; "
            f"t.publish_main({socket!r}, {name!r}, {k}, {N})")
    return subprocess.Popen([sys.executable, "-c", code])


def _tracks(root: str, name: str) -> list[str]:
    cdir = recording.channel_dir(root, name)
    try:
        return sorted(os.path.join(cdir, t) for t in os.listdir(cdir)
                      if os.path.isfile(os.path.join(cdir, t, "catalog")))
    except FileNotFoundError:
        return []


def _complete(root: str, name: str, want: int) -> bool:
    done = 0
    for t in _tracks(root, name):
        cat = recording.Catalog(t)
        done += cat.q[recording.W_NEXT_SEQ] == N
        cat.close()
    return done == want


@pytest.fixture
def root():
    with tempfile.TemporaryDirectory(prefix="shimmy-rec-") as d:
        yield d


@pytest.mark.timeout(180)
def test_a_publisher_group_records_every_publisher_in_its_own_order(daemon, root):
    name = "grp.a"
    ch = shimmy.Channel(name, daemon=daemon.socket, mode="reliable", capacity=1 << 18,
                        max_publishers=4)
    rec = start_recorder(daemon.socket, root, name)
    deadline = time.monotonic() + 20
    while lookup(daemon.socket, name) is None:   # registered once its slot is taken
        assert time.monotonic() < deadline, "the recorder did not start"
        time.sleep(0.05)
    first = [_publisher(daemon.socket, name, k) for k in (1, 2)]
    time.sleep(0.3)
    late = _publisher(daemon.socket, name, 3)   # joins while the others publish
    for p in (*first, late):
        assert p.wait(120) == 0
    deadline = time.monotonic() + 60
    while not _complete(root, name, 3):
        assert time.monotonic() < deadline, "the group's tracks did not complete"
        time.sleep(0.1)
    stop(rec)
    seen = set()
    for t in _tracks(root, name):
        msgs = read_track(t)
        assert all(lost == 0 for _, _, lost in msgs)
        got = [(seq, data) for seq, data, _ in msgs]
        assert [s for s, _ in got] == list(range(N)), t
        k = int.from_bytes(got[0][1][:8], "little") // SALT
        assert [d for _, d in got] == [payload(k * SALT + i) for i in range(N)], t
        seen.add(k)
    assert seen == {1, 2, 3}
    # Each publisher is an MCAP channel of its own.
    out = os.path.join(root, "grp.mcap")
    done = subprocess.run([sys.executable, "-m", "shimmy.cli", "export", root, "--mcap", out],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    with open(out, "rb") as fh:
        stats = make_reader(fh).get_summary()
    topics = sorted(c.topic for c in stats.channels.values())
    assert len(topics) == 3 and all(t.startswith(name + "/p") for t in topics)
    assert sum(stats.statistics.channel_message_counts.values()) == 3 * N
    ch.close()
