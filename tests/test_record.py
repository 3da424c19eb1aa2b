"""Recording (docs/recording.md): a real daemon, a real publisher process flat out, the real
``shimmy record`` command, and the recording read back from disk."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import pytest

import shimmy
from shimmy import recording
from shimmy.recording import TrackReader
from workers import until

HERE = os.path.dirname(os.path.abspath(__file__))
_rnd = random.Random(22)
_SIZES = [_rnd.choice((0, 1, 8, 24, 100, 300, 1000, 1500, 4096)) for _ in range(1009)]
_BLOCK = random.Random(7).randbytes(8192)


def payload(seq: int) -> bytes:
    """The message a test publisher sends as ``seq``: its size and bytes follow from seq, so a
    recorded frame proves the seq it is filed under."""
    n = _SIZES[seq % len(_SIZES)]
    head = seq.to_bytes(8, "little")
    if n <= 8:
        return head[:n]
    at = seq % 4096
    return head + _BLOCK[at:at + n - 8]


def publish_main(socket: str, name: str, count: int, mode: str, capacity: int,
                 start: int = 0) -> None:
    """A publisher process: ``count`` messages flat out, from seq ``start`` (the channel's)."""
    ch = shimmy.Channel(name, daemon=socket, mode=mode, capacity=capacity)
    publish = ch.publish
    for i in range(start, start + count):
        publish(payload(i), timeout=60)
    ch.close()


def start_publisher(socket: str, name: str, count: int, mode: str = "reliable",
                    capacity: int = 1 << 20) -> subprocess.Popen:
    code = (f"import sys; sys.path.insert(0, {HERE!r}); import test_record as t; "
            f"t.publish_main({socket!r}, {name!r}, {count}, {mode!r}, {capacity})")
    return subprocess.Popen([sys.executable, "-c", code])


def start_recorder(socket: str, root: str, *names: str, mode: str = "reliable",
                   extra: tuple[str, ...] = ()) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shimmy.cli", "record", *names, "--dir", root,
                             "--daemon", socket, "--mode", mode, *extra],
                            stderr=subprocess.PIPE, text=True)


def track(root: str, name: str) -> str:
    return os.path.join(recording.channel_dir(root, name), recording.MAIN_TRACK)


def wait_recorded(root: str, name: str, next_seq: int, timeout: float = 60.0) -> dict:
    def summary() -> dict | None:
        try:
            cat = recording.Catalog(track(root, name))
        except (FileNotFoundError, recording.RecordingError):
            return None
        try:
            got = cat.summary()
        finally:
            cat.close()
        return got if got["next_seq"] >= next_seq else None
    return until(summary, timeout, f"recording of {name!r} up to seq {next_seq}")


def read_track(path: str) -> list[tuple[int, bytes, int]]:
    """``(seq, payload, lost before it)`` of every message of a track, from the seq the
    recording expected first."""
    rd = TrackReader(path)
    rd.expect = rd.q[recording.W_START_SEQ]
    try:
        out = []
        while (got := rd.next()) is not None:
            seq, view, lost = got
            out.append((seq, bytes(view), lost))
        return out
    finally:
        rd.close()


def read_all(path: str) -> tuple[list[int], list[int]]:
    """Every message of a track, checked against ``payload``: (seqs, gaps before each)."""
    seqs, gaps = [], []
    for seq, data, lost in read_track(path):
        assert data == payload(seq), f"message seq {seq} differs from what was published"
        seqs.append(seq)
        gaps.append(lost)
    return seqs, gaps


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


@pytest.fixture
def root():
    with tempfile.TemporaryDirectory(prefix="shimmy-rec-") as d:
        yield d


N_FULL = 1_000_000


@pytest.mark.timeout(300)
def test_reliable_recording_of_a_million_mixed_messages_equals_the_stream(daemon, root):
    ch = shimmy.Channel("rec.full", daemon=daemon.socket, mode="reliable", capacity=1 << 20)
    rec = start_recorder(daemon.socket, root, "rec.full")
    wait_recorded(root, "rec.full", 0)   # the catalog exists: the recorder holds its slot
    pub = start_publisher(daemon.socket, "rec.full", N_FULL)
    assert pub.wait(240) == 0
    summary = wait_recorded(root, "rec.full", N_FULL)
    stop(rec)
    seqs, gaps = read_all(track(root, "rec.full"))
    assert seqs == list(range(N_FULL))
    assert summary["lost"] == 0 and summary["messages"] == N_FULL
    ch.close()


@pytest.mark.timeout(300)
def test_lossy_recording_counts_every_gap_exactly(daemon, root):
    ch = shimmy.Channel("rec.lossy", daemon=daemon.socket, mode="lossy", capacity=1 << 18)
    # Small segments: many rolls, each after runs the publisher may have passed mid-copy.
    rec = start_recorder(daemon.socket, root, "rec.lossy", mode="lossy",
                         extra=("--segment-size", "1M"))
    wait_recorded(root, "rec.lossy", 0)
    pub = start_publisher(daemon.socket, "rec.lossy", N_FULL, mode="lossy", capacity=1 << 18)
    assert pub.wait(240) == 0
    summary = wait_recorded(root, "rec.lossy", N_FULL)
    stop(rec)
    seqs, gaps = read_all(track(root, "rec.lossy"))
    # Each recorded message is the one published under its seq (read_all checks the bytes),
    # each gap is the seq distance from the message before it, and together they are the
    # whole stream.
    assert seqs == sorted(set(seqs))
    expect = 0
    for seq, gap in zip(seqs, gaps, strict=True):
        assert gap == seq - expect
        expect = seq + 1
    assert len(seqs) + sum(gaps) + (N_FULL - expect) == N_FULL
    assert expect == N_FULL   # the last message of a flat-out run is always recorded
    assert summary["lost"] == sum(gaps) and summary["messages"] == len(seqs)
    # The copy path (read_many: batches across buffer refills) reads the same, gaps included.
    rd = TrackReader(track(root, "rec.lossy"))
    rd.expect = rd.q[recording.W_START_SEQ]
    got, lost = [], 0
    rnd = random.Random(3)
    while True:
        batch, gap = rd.read_many(rnd.choice((1, 5, 64, 1000)), 1 << 62)
        if not batch:
            break
        got += batch
        lost += gap
    rd.close()
    assert lost == sum(gaps) and got == [payload(s) for s in seqs]
    ch.close()


@pytest.mark.timeout(240)
def test_recorder_sigkilled_at_random_points_leaves_a_readable_recording_it_continues(
        daemon, root):
    # While no recorder runs nobody holds the publisher back; the ring (128 MiB) holds the whole
    # run, so each new recorder finds in it everything its predecessor had not committed.
    n = 100_000
    ch = shimmy.Channel("rec.kill", daemon=daemon.socket, mode="reliable", capacity=1 << 27)
    rec = start_recorder(daemon.socket, root, "rec.kill", extra=("--segment-size", "1M"))
    wait_recorded(root, "rec.kill", 0)
    pub = start_publisher(daemon.socket, "rec.kill", n, capacity=1 << 27)
    rnd = random.Random(2026)
    kills = 0
    while kills < 6:   # while the publisher runs, and after it, while the backlog is recorded
        time.sleep(rnd.uniform(0.05, 0.4))
        rec.kill()
        rec.wait()
        kills += 1
        # Readable up to its last complete frame, with no gap, before anyone repairs it.
        seqs, gaps = read_all(track(root, "rec.kill"))
        assert seqs == list(range(len(seqs))) and not any(gaps)
        rec = start_recorder(daemon.socket, root, "rec.kill", extra=("--segment-size", "1M"))
    assert pub.wait(180) == 0
    wait_recorded(root, "rec.kill", n)
    stop(rec)
    seqs, gaps = read_all(track(root, "rec.kill"))
    assert seqs == list(range(n))
    ch.close()


def test_a_second_recorder_of_the_same_recording_is_refused(daemon, root):
    ch = shimmy.Channel("rec.busy", daemon=daemon.socket)
    rec = start_recorder(daemon.socket, root, "rec.busy")
    wait_recorded(root, "rec.busy", 0)
    second = subprocess.run([sys.executable, "-m", "shimmy.cli", "record", "rec.busy", "--dir",
                             root, "--daemon", daemon.socket], capture_output=True, text=True,
                            timeout=30)
    assert second.returncode == 1
    assert "being written by another recorder" in second.stderr
    assert "Traceback" not in second.stderr
    stop(rec)
    ch.close()


def test_a_reliable_recording_of_a_lossy_channel_is_refused_naming_the_rule(daemon, root):
    ch = shimmy.Channel("rec.mode", daemon=daemon.socket, mode="lossy")
    out = subprocess.run([sys.executable, "-m", "shimmy.cli", "record", "rec.mode", "--dir",
                          root, "--daemon", daemon.socket], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2
    assert "a reliable recording needs a reliable channel" in out.stderr
    ch.close()


@pytest.mark.parametrize("policy", ["data", "data+metadata"])
def test_every_fsync_policy_records_the_same(daemon, root, policy):
    ch = shimmy.Channel("rec.sync", daemon=daemon.socket, capacity=1 << 16)
    rec = start_recorder(daemon.socket, root, "rec.sync",
                         extra=("--fsync", policy, "--segment-size", "64K"))
    wait_recorded(root, "rec.sync", 0)
    for i in range(2000):
        ch.publish(payload(i))
    wait_recorded(root, "rec.sync", 2000)
    stop(rec)
    seqs, gaps = read_all(track(root, "rec.sync"))
    assert seqs == list(range(2000)) and not any(gaps)
    ch.close()


def test_a_commit_past_the_data_on_disk_is_recovered_to_the_frames_that_are_there(daemon, root):
    """What a power cut with --fsync none can leave: the mapped catalog's commit word reached
    the disk, the end of the segment did not.  The next recorder keeps the complete frames the
    file holds and continues the numbering after them."""
    ch = shimmy.Channel("rec.cut", daemon=daemon.socket, capacity=1 << 16)
    rec = start_recorder(daemon.socket, root, "rec.cut")
    wait_recorded(root, "rec.cut", 0)
    for i in range(1000):
        ch.publish(payload(i))
    wait_recorded(root, "rec.cut", 1000)
    stop(rec)
    path = track(root, "rec.cut")
    (seg,) = recording.segments(path)
    with open(recording.seg_path(path, seg), "r+b") as fh:
        fh.truncate(os.path.getsize(fh.name) // 2 + 5)   # mid-frame, as a lost write-back
    rec = start_recorder(daemon.socket, root, "rec.cut")
    deadline = time.monotonic() + 30
    while True:   # recovered: the commit is back within the file
        cat = recording.Catalog(path)
        committed = cat.q[recording.W_COMMITTED]
        cat.close()
        if committed - seg <= os.path.getsize(recording.seg_path(path, seg)):
            break
        assert time.monotonic() < deadline, "the recorder did not recover the track"
        time.sleep(0.05)
    for i in range(1000, 1100):
        ch.publish(payload(i))
    wait_recorded(root, "rec.cut", 1100)
    stop(rec)
    # The frames the file held (a prefix of the stream), then what the ring still held (its
    # newest messages): the lost write-back is one counted gap, every message the one sent.
    seqs, gaps = read_all(path)
    k = next(i for i, g in enumerate(gaps) if g)
    assert 0 < k < 1000 and seqs[:k] == list(range(k))
    assert seqs[-1] == 1099 and len(seqs) + sum(gaps) == 1100
    ch.close()
