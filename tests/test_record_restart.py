"""The daemon's recorder (settings ``record``/``record_dir``) and a recorded channel across a
daemon SIGKILL and restart: the history is intact, the numbering continues, and subscribers
resume by sequence number."""

from __future__ import annotations

import fcntl
import os
import signal
import sys
import tempfile
import time

import pytest

import shimmy
from shimmy import recording

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_record import payload, start_publisher, track, wait_recorded  # noqa: E402


@pytest.fixture
def root():
    with tempfile.TemporaryDirectory(prefix="shimmy-rec-") as d:
        yield d


def _lock_free(path: str, timeout: float = 10.0) -> None:
    """Wait until no recorder holds the track (the killed daemon's recorder is gone)."""
    deadline = time.monotonic() + timeout
    while True:
        fd = os.open(os.path.join(path, "catalog"), os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            assert time.monotonic() < deadline, "a recorder outlived its daemon"
            time.sleep(0.05)
        finally:
            os.close(fd)


@pytest.mark.timeout(180)
def test_daemon_sigkill_mid_recording_then_restart_keeps_history_and_numbering(
        daemon_factory, root):
    rec_dir = os.path.join(root, "rec")
    args = ("--record", "rs.*", "--record-dir", rec_dir)
    d = daemon_factory(*args)
    ch = shimmy.Channel("rs.a", daemon=d.socket, mode="reliable", capacity=1 << 20)
    wait_recorded(rec_dir, "rs.a", 0)   # the daemon's recorder found the channel
    live = ch.subscribe()
    pub = start_publisher(d.socket, "rs.a", 5_000_000, capacity=1 << 20)
    got = [live.receive(timeout=30).seq for _ in range(20_000)]
    assert got == list(range(20_000))
    live.close()   # it stops here (a reliable publisher would wait for it)
    wait_recorded(rec_dir, "rs.a", 40_000)
    d.kill()                             # mid-recording, the publisher flat out
    pub.kill()
    pub.wait()
    _lock_free(track(rec_dir, "rs.a"))   # its recorder died with it
    cat = recording.Catalog(track(rec_dir, "rs.a"))
    recorded = cat.summary()["next_seq"]
    cat.close()
    assert recorded >= 40_000

    d.start()                            # same socket, same settings
    # The recorder opens the recorded channel again: it exists, numbered where it ended.
    deadline = time.monotonic() + 20
    while True:
        from shimmy.sdk.client import get_client
        names = {c["name"]: c for c in get_client(d.socket).request("list")["channels"]}
        if "rs.a" in names:
            break
        assert time.monotonic() < deadline, "the recorded channel did not come back"
        time.sleep(0.1)
    assert names["rs.a"]["published"] == recorded
    assert (names["rs.a"]["mode"], names["rs.a"]["capacity"]) == ("reliable", 1 << 20)
    ch2 = shimmy.Channel("rs.a", daemon=d.socket)
    # The subscriber that had read up to 19,999 resumes by sequence number.
    resumed = ch2.subscribe(start=20_000)
    # A new publisher continues the numbering.
    for i in range(recorded, recorded + 1000):
        assert ch2.publish(payload(i)) == i
    for i in range(20_000, recorded + 1000):
        msg = resumed.receive(timeout=30)
        assert (msg.seq, msg.lost) == (i, 0)
        assert msg.data == payload(i)
    # The whole history from the start, then live.
    with ch2.subscribe(start="recorded") as everything:
        assert [everything.receive(timeout=30).seq for _ in range(recorded + 1000)] == \
            list(range(recorded + 1000))
    resumed.close()
    ch2.close()
    # A clean stop stops the recorder too.
    d.stop(signal.SIGTERM)
    _lock_free(track(rec_dir, "rs.a"))


@pytest.mark.timeout(120)
def test_the_daemon_starts_its_recorder_again_when_it_dies(daemon_factory, root):
    import re
    rec_dir = os.path.join(root, "rec")
    d = daemon_factory("--record", "again.*", "--record-dir", rec_dir)
    ch = shimmy.Channel("again.a", daemon=d.socket, capacity=1 << 16)
    wait_recorded(rec_dir, "again.a", 0)
    for i in range(500):
        ch.publish(payload(i))
    wait_recorded(rec_dir, "again.a", 500)
    (pid,) = map(int, re.findall(r"recorder started \(pid (\d+)\)", d.log()))
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while len(re.findall(r"recorder started \(pid (\d+)\)", d.log())) < 2:
        assert time.monotonic() < deadline, d.log()[-2000:]
        time.sleep(0.05)
    assert "recorder (pid %d) exited with -9" % pid in d.log()
    new = int(re.findall(r"recorder started \(pid (\d+)\)", d.log())[-1])
    from shimmy.sdk.client import get_client

    def attached() -> bool:
        chans = get_client(d.socket).request("list")["channels"]
        return any(s["pid"] == new for c in chans if c["name"] == "again.a"
                   for s in c["subscribers"])
    while not attached():
        assert time.monotonic() < deadline, "the new recorder did not attach"
        time.sleep(0.05)
    for i in range(500, 1000):
        ch.publish(payload(i))
    wait_recorded(rec_dir, "again.a", 1000)   # the new recorder continued the recording
    from test_record import read_all
    seqs, gaps = read_all(track(rec_dir, "again.a"))
    assert seqs == list(range(1000)) and not any(gaps)
    ch.close()
