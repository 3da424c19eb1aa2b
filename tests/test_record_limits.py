"""Retention (by size, by age, while a reader reads) and a full disk."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import pytest

import shimmy
from shimmy import recording
from shimmy.errors import BackpressureTimeout
from shimmy.recording import TrackReader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_record import payload, start_recorder, stop, track, wait_recorded  # noqa: E402


@pytest.fixture
def root():
    with tempfile.TemporaryDirectory(prefix="shimmy-rec-") as d:
        yield d


def _drain(rd: TrackReader, seen: list[int], lost: list[int]) -> None:
    while True:
        got = rd.next()
        if got is None:
            return
        seq, view, gap = got
        assert view == payload(seq)
        seen.append(seq)
        lost.append(gap)


@pytest.mark.timeout(120)
def test_retention_by_size_while_a_reader_reads(daemon, root):
    ch = shimmy.Channel("ret.size", daemon=daemon.socket, capacity=1 << 16)
    rec = start_recorder(daemon.socket, root, "ret.size",
                         extra=("--segment-size", "64K", "--max-bytes", "256K"))
    wait_recorded(root, "ret.size", 0)
    rd = TrackReader(track(root, "ret.size"))
    seen: list[int] = []
    lost: list[int] = []
    for i in range(30_000):
        ch.publish(payload(i))
        if i % 2000 == 0:
            _drain(rd, seen, lost)   # a slow reader: retention deletes what it has not read
    wait_recorded(root, "ret.size", 30_000)
    time.sleep(1.2)                  # the recorder applies retention at least once a second
    ch.publish(payload(30_000))
    wait_recorded(root, "ret.size", 30_001)
    _drain(rd, seen, lost)
    rd.close()
    summary = wait_recorded(root, "ret.size", 30_001)
    stop(rec)
    # Kept: at most max-bytes plus the segment being written; the reader saw every kept message
    # after what retention took from under it, each gap counted exactly.
    assert summary["bytes"] <= 256 * 1024 + 64 * 1024 + 8 * 1024
    assert summary["first_seq"] > 0
    assert seen == sorted(set(seen)) and seen[-1] == 30_000
    assert sum(lost) > 0 and len(seen) + sum(lost) == 30_001 - seen[0] + lost[0]
    files = os.listdir(track(root, "ret.size"))
    assert sum(f.endswith(".seg") for f in files) <= 6
    ch.close()


@pytest.mark.timeout(120)
def test_retention_by_age(daemon, root):
    ch = shimmy.Channel("ret.age", daemon=daemon.socket, capacity=1 << 16)
    rec = start_recorder(daemon.socket, root, "ret.age",
                         extra=("--segment-size", "64K", "--max-age", "1"))
    wait_recorded(root, "ret.age", 0)
    for i in range(5000):
        ch.publish(payload(i))
    wait_recorded(root, "ret.age", 5000)
    time.sleep(2.5)
    for i in range(5000, 5300):
        ch.publish(payload(i))
    deadline = time.monotonic() + 10
    while wait_recorded(root, "ret.age", 5300)["first_seq"] < 5000:
        assert time.monotonic() < deadline, "old segments were not deleted"
        time.sleep(0.1)
        ch.publish(payload(5300))
        break
    time.sleep(1.5)
    summary = wait_recorded(root, "ret.age", 5300)
    stop(rec)
    assert summary["first_seq"] >= 4000   # the segments of the first burst are gone
    ch.close()


def _mount_tmpfs(path: str, size: str) -> bool:
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", path],
                          capture_output=True)
    return done.returncode == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["reliable", "lossy"])
def test_a_full_disk_is_a_clear_logged_error_and_the_mode_decides_what_the_publisher_sees(
        daemon, root, mode):
    small = os.path.join(root, "small")
    os.mkdir(small)
    if not _mount_tmpfs(small, "1m"):
        pytest.skip("needs root to mount a small tmpfs (mount -t tmpfs)")
    try:
        ch = shimmy.Channel("full." + mode, daemon=daemon.socket, mode="reliable",
                            capacity=1 << 20)
        rec = start_recorder(daemon.socket, small, "full." + mode, mode=mode)
        wait_recorded(small, "full." + mode, 0)
        published = 0
        blocked = False
        deadline = time.monotonic() + 30
        summary = {"errors": 0}
        try:
            # Until the recorder met the full disk (a lossy one records only what it keeps up
            # with, so how much that takes varies), then 2,000 more.
            while time.monotonic() < deadline:
                for _ in range(2000):
                    ch.publish(payload(published), timeout=1.0)
                    published += 1
                if summary["errors"]:
                    break
                time.sleep(0.2)
                cat = recording.Catalog(track(small, "full." + mode))
                summary = cat.summary()
                cat.close()
        except BackpressureTimeout:
            blocked = True
        time.sleep(0.5)
        cat = recording.Catalog(track(small, "full." + mode))
        summary = cat.summary()
        cat.close()
        err = stop(rec)
        assert "disk full" in err and "No space left on device" in err, err
        assert summary["errors"] > 0
        if mode == "reliable":
            assert blocked   # held back: nothing published is missing from the recording
            assert summary["next_seq"] < published
        else:
            assert not blocked   # never held back; what it could not write is counted lost
            assert summary["lost"] > 0 and summary["next_seq"] <= published
            # recorded + lost = every seq the recorder went past
            assert summary["recorded_total"] + summary["lost"] == \
                summary["next_seq"] - summary["start_seq"]
        # The daemon and other channels are untouched.
        other = shimmy.Channel("full.other", daemon=daemon.socket)
        sub = other.subscribe()
        other.publish(b"fine")
        assert sub.receive(timeout=5).data == b"fine"
        other.close()
        ch.close()
    finally:
        subprocess.run(["umount", small], capture_output=True)
