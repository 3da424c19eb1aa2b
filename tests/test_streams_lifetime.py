"""How long a stream lives: orphans freed after stream_orphan_timeout, and delete (shimmy rm).

Real daemons, real shared memory; the ends that must be seen failing (a reader asleep in read, a
writer asleep on a full ring) run as their own interpreters (``python THIS_FILE ROLE JSON``, see
``_worker`` at the bottom).  Waits are bounded; nothing asserts a speed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

import shimmy
from shimmy.errors import ChannelNotFound, LimitExceeded, StreamBroken
from shimmy.sdk.client import get_client

HERE = os.path.abspath(__file__)


def _daemon(daemon_factory, tmp_path, text: str):
    cfg = tmp_path / "lifetime.toml"
    cfg.write_text(text)
    return daemon_factory("--config", str(cfg))


def _streams(d) -> dict[str, dict]:
    return {s["name"]: s for s in get_client(d.socket).request("stat")["streams"]}


def _wait(cond, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def _spawn(role: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, HERE, role, json.dumps(kw)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _line(proc: subprocess.Popen, timeout: float = 20.0) -> str:
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        proc.kill()
        raise AssertionError(f"worker silent for {timeout} s: {proc.stderr.read()[-3000:]}")
    return proc.stdout.readline().strip()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shimmy.cli", *args], capture_output=True,
                          text=True, timeout=60)


def _write_and_close(d, name: str, data: bytes) -> None:
    with shimmy.Stream(name, daemon=d.socket, capacity=4096).writer(timeout=5) as w:
        w.write(data)


def test_orphans_are_freed_and_give_their_quota_back(daemon_factory, tmp_path):
    """Finished streams nobody reads (closed cleanly, or the writer killed after writing) are
    freed after stream_orphan_timeout: shm gone, quota_channels usable again, INFO logged."""
    d = _daemon(daemon_factory, tmp_path, "quota_channels = 3\nstream_orphan_timeout = 1.0\n")
    _write_and_close(d, "orphan/a", b"abc")
    _write_and_close(d, "orphan/b", b"")          # closed with nothing written: kept, then freed
    killed = _spawn("write_and_hang", daemon=d.socket, name="orphan/c", data="xyz")
    try:
        assert _line(killed) == "wrote"
        killed.kill()
        killed.wait(10)
        with pytest.raises(LimitExceeded, match="quota_channels=3"):
            shimmy.Stream("orphan/d", daemon=d.socket, capacity=4096).writer()
        _wait(lambda: _streams(d).get("orphan/c", {}).get("writer", {}).get("state") == "dead",
              "the daemon saw the killed writer die")
        waiting = _streams(d)
        assert all(waiting[n]["orphaned_for"] is not None for n in waiting), waiting
        # freed_in is what is left of stream_orphan_timeout (1.0 s) at the instant of the
        # listing, never below 0: a rule between the two figures, not a measure of speed
        assert all(waiting[n]["freed_in"] == pytest.approx(max(1.0 - waiting[n]["orphaned_for"],
                                                              0.0)) for n in waiting), waiting
        _wait(lambda: not d.shm_objects(), "the orphans' shm and semaphores unlinked")
    finally:
        killed.kill()
        killed.wait(10)
    assert _streams(d) == {}
    assert get_client(d.socket).request("stat")["counters"]["streams_orphaned"] == 3
    log = d.log()
    for name, dropped in (("orphan/a", 3), ("orphan/b", 0), ("orphan/c", 3)):
        assert any(f"stream {name}: writer finished" in line and "stream_orphan_timeout" in line
                   and f"{dropped} bytes dropped" in line and "owner uid:0" in line
                   for line in log.splitlines()), (name, log[-3000:])
    # `shimmy cat` tells a late reader what happened instead of waiting for a writer.
    late = _cli("cat", "orphan/a", "--daemon", d.socket)
    assert late.returncode == 1 and "was freed unread" in late.stderr, late.stderr
    assert "stream_orphan_timeout (3 bytes dropped)" in late.stderr, late.stderr
    assert _streams(d) == {}, "the refused read created nothing"
    # The quota is back: three new streams fit again.
    ends = [shimmy.Stream(f"orphan/new{i}", daemon=d.socket, capacity=4096).writer()
            for i in range(3)]
    for w in ends:
        w.close()


def test_streams_in_use_are_never_reclaimed(daemon_factory, tmp_path):
    """A finished stream with its reader attached, and a writer still open with no reader, both
    outlive several timeouts; then every byte is still delivered."""
    d = _daemon(daemon_factory, tmp_path, "stream_orphan_timeout = 1.0\n")
    # A reader that came while the finished stream waited stops the orphan clock for good.
    _write_and_close(d, "use/late", b"late bytes")
    r0 = shimmy.Stream("use/late", daemon=d.socket).reader(timeout=5)
    w1 = shimmy.Stream("use/read", daemon=d.socket, capacity=4096).writer(timeout=5)
    r1 = shimmy.Stream("use/read", daemon=d.socket).reader(timeout=5)
    w1.write(b"0123456789")
    assert r1.read(4) == b"0123"
    w1.close()                                   # finished, but its reader is attached
    w2 = shimmy.Stream("use/open", daemon=d.socket, capacity=4096).writer(timeout=5)
    w2.write(b"kept")                            # open writer, no reader yet
    deadline = time.monotonic() + 3.5            # three timeouts, 35 housekeeping passes
    while time.monotonic() < deadline:
        assert set(_streams(d)) == {"use/late", "use/read", "use/open"}
        time.sleep(0.1)
    assert _streams(d)["use/read"]["orphaned_for"] is None
    assert _streams(d)["use/late"]["orphaned_for"] is None
    assert r0.read() == b"late bytes"
    r0.close()
    assert r1.read() == b"456789"                # the rest, then a clean end of stream
    r1.close()
    w2.close()
    r2 = shimmy.Stream("use/open", daemon=d.socket).reader(timeout=5)
    assert r2.read() == b"kept"
    r2.close()
    _wait(lambda: not d.shm_objects(), "the streams freed once read")


def test_zero_keeps_a_finished_stream_for_its_reader(daemon_factory, tmp_path):
    d = _daemon(daemon_factory, tmp_path, "stream_orphan_timeout = 0\n")
    _write_and_close(d, "keep/x", b"for later")
    time.sleep(1.0)                              # ten housekeeping passes
    st = _streams(d)["keep/x"]
    assert st["orphaned_for"] is not None and st["freed_in"] is None
    out = _cli("ls", "--daemon", d.socket)
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.startswith("keep/x"))
    assert row.rstrip().endswith("kept"), row
    with shimmy.Stream("keep/x", daemon=d.socket).reader(timeout=5) as r:
        assert r.read() == b"for later"
    _wait(lambda: not d.shm_objects(), "the stream freed once read")


def test_ls_shows_how_long_a_finished_stream_waited(daemon_factory, tmp_path):
    d = _daemon(daemon_factory, tmp_path, "stream_orphan_timeout = 3600\n")
    _write_and_close(d, "wait/x", b"abc")
    out = _cli("ls", "--daemon", d.socket)
    assert out.returncode == 0, out.stderr
    assert "NO READER FOR" in out.stdout
    row = next(line for line in out.stdout.splitlines() if line.startswith("wait/x"))
    assert re.search(r"freed in \d+m", row), row
    st = _streams(d)["wait/x"]
    # the two figures are read from one clock at one instant: they add up to the timeout
    assert st["orphaned_for"] >= 0 and st["freed_in"] > 0
    assert st["orphaned_for"] + st["freed_in"] == pytest.approx(3600), st


def test_rm_deletes_a_stream_and_attached_ends_get_stream_broken(daemon_factory, tmp_path):
    d = _daemon(daemon_factory, tmp_path, "stream_orphan_timeout = 0\n")
    # A reader asleep in read() (another process) and a writer here.
    w = shimmy.Stream("rm/x", daemon=d.socket, capacity=4096).writer(timeout=5)
    reader = _spawn("read_until_error", daemon=d.socket, name="rm/x")
    # A writer asleep on a full ring (another process), no reader.
    stuck = _spawn("fill", daemon=d.socket, name="rm/full")
    try:
        assert _line(reader) == "reading"
        assert _line(stuck) == "filling"
        _wait(lambda: _streams(d).get("rm/full", {}).get("buffered") == 4096, "ring full")
        # A channel with the same name as a stream: plain rm takes the channel, --stream the
        # stream.
        ch = shimmy.Channel("rm/x", daemon=d.socket)
        ch.close()
        out = _cli("rm", "--daemon", d.socket, "rm/x")
        assert out.returncode == 0, out.stderr
        assert "rm/x" in _streams(d)
        assert "rm/x" not in {c["name"] for c in get_client(d.socket).request("list")["channels"]}
        for args in (["--stream", "rm/x"], ["rm/full"]):
            out = _cli("rm", "--daemon", d.socket, *args)
            assert out.returncode == 0, out.stderr
        assert _streams(d) == {}
        got = json.loads(_line(reader))
        assert got["error"] == "StreamBroken" and "retired" in got["message"], got
        got = json.loads(_line(stuck))
        assert got["error"] == "StreamBroken" and "retired" in got["message"], got
        with pytest.raises(StreamBroken, match="retired"):
            w.write(b"more")
        w.close()                                # closing a deleted end is quiet
        for proc in (reader, stuck):
            assert proc.wait(20) == 0
    finally:
        for proc in (reader, stuck):
            proc.kill()
            proc.wait(10)
    _wait(lambda: not d.shm_objects(), "the deleted streams' objects unlinked")
    counters = get_client(d.socket).request("stat")["counters"]
    assert (counters["streams_deleted"], counters["streams_orphaned"]) == (2, 0)
    late = _cli("cat", "rm/full", "--daemon", d.socket)
    assert late.returncode == 1 and "was deleted (shimmy rm; 4096 bytes dropped)" in late.stderr
    assert "stream rm/x: deleted by client" in d.log() and "(owner uid:0," in d.log()
    # The name is free for a new stream.
    w = shimmy.Stream("rm/x", daemon=d.socket, capacity=4096).writer(timeout=5)
    with shimmy.Stream("rm/x", daemon=d.socket).reader(timeout=5) as r:
        w.write(b"again")
        w.close()
        assert r.read() == b"again"
    # Nothing of that name: a clear error.
    with pytest.raises(ChannelNotFound, match="stream 'rm/none' does not exist"):
        get_client(d.socket).request("delete", name="rm/none", kind="stream")
    with pytest.raises(shimmy.InvalidArgument, match="delete kind"):
        get_client(d.socket).request("delete", name="rm/none", kind="pipe")


def test_orphan_timeout_must_be_a_non_negative_number(tmp_path):
    out = subprocess.run([sys.executable, "-m", "shimmy.cli", "daemon", "--socket",
                          str(tmp_path / "s.sock"), "--stream-orphan-timeout", "-1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "stream_orphan_timeout must be >= 0" in out.stdout + out.stderr


# -- workers ---------------------------------------------------------------------------------------
def _worker(role: str, kw: dict) -> None:
    stream = shimmy.Stream(kw["name"], daemon=kw["daemon"], capacity=4096)
    if role == "write_and_hang":        # write, then wait to be killed (a writer that dies)
        w = stream.writer(timeout=10)
        w.write(kw["data"].encode())
        print("wrote", flush=True)
        time.sleep(60)
        return
    if role == "read_until_error":
        end = stream.reader(timeout=30)
        print("reading", flush=True)
        op = end.read
    elif role == "fill":                # more than the ring holds, with no reader: blocks
        end = stream.writer(timeout=30)
        print("filling", flush=True)
        data = b"z" * 8192
        op = lambda: end.write(data)    # noqa: E731
    else:
        raise SystemExit(f"unknown role {role}")
    try:
        op()
        out = {"error": None}
    except Exception as exc:
        out = {"error": type(exc).__name__, "message": str(exc)}
    end.close()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    _worker(sys.argv[1], json.loads(sys.argv[2]))
