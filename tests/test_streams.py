"""Byte streams between real processes through a real daemon and real shared memory.

The other end of each stream runs as its own interpreter (``python tests/test_streams.py ROLE
JSON``, see ``_worker`` at the bottom), so nothing is shared but the daemon and /dev/shm.  Data is
a deterministic pattern (``pattern()``), so each side checks bytes and checksums without a side
channel.  Every blocking call gets a timeout; nothing here asserts a speed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import shimmy
from shimmy.errors import (BackpressureTimeout, InvalidArgument, InvalidName, ReceiveTimeout,
                           StreamBroken, StreamBusy)

HERE = os.path.abspath(__file__)
MiB = 1 << 20
PATTERN_LEN = 8 * MiB + 13   # longer than any chunk; odd so chunks never line up with it


def pattern() -> bytes:
    import random
    return random.Random(1234).randbytes(PATTERN_LEN)


def pattern_chunks(total: int, chunk: int):
    """(offset, memoryview) pieces of the endless pattern, ``chunk`` bytes each."""
    pat = pattern()
    pat2 = memoryview(pat + pat[:max(chunk, 1)])
    off = 0
    while off < total:
        k = min(chunk, total - off)
        p = off % PATTERN_LEN
        yield off, pat2[p:p + k]
        off += k


def expected_digest(total: int) -> str:
    h = hashlib.sha256()
    for _, piece in pattern_chunks(total, 4 * MiB):
        h.update(piece)
    return h.hexdigest()


def spawn(worker: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, HERE, worker, json.dumps(kw)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_line(proc: subprocess.Popen, want: str, timeout: float = 20.0) -> str:
    """Read the worker's stdout up to a line starting with ``want`` (bounded)."""
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sel.select(max(deadline - time.monotonic(), 0)):
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith(want):
                return line.strip()
    proc.kill()
    raise AssertionError(f"worker never said {want!r}: {proc.stderr.read()[-3000:]}")


def finish(proc: subprocess.Popen, timeout: float = 60.0) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{err[-3000:]}"
    return json.loads(out.strip().splitlines()[-1])


def wait_freed(daemon, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while daemon.shm_objects() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert daemon.shm_objects() == [], "stream memory not reclaimed"


# -- bulk transfer ---------------------------------------------------------------------------
# (chunk size, total bytes, ring capacity, how the reader reads, how the writer writes)
# The 1-byte case moves 1 MiB, not 256 MiB: at one Python call per byte 256 MiB would take
# minutes; 1 MiB still crosses a 64 KiB ring 16 times, wrap included.
BULK = [
    pytest.param(1, 1 * MiB, 1 << 16, "readinto", "write", id="1B-1MiB"),
    pytest.param(777, 256 * MiB, 1 << 20, "read", "write", id="777B"),
    pytest.param(64 << 10, 256 * MiB, 1 << 20, "readinto", "write", id="64KiB"),
    pytest.param(1 << 20, 256 * MiB, 1 << 20, "view", "claim", id="1MiB-zero-copy"),
    pytest.param(3 * MiB + 5, 256 * MiB, 1 << 20, "readinto", "write", id="3MiB-gt-ring"),
]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("chunk,total,capacity,read_mode,write_mode", BULK)
def test_bulk_transfer_between_processes(daemon, chunk, total, capacity, read_mode, write_mode):
    writer = spawn("write", daemon=daemon.socket, name="bulk/x", total=total, chunk=chunk,
                   capacity=capacity, mode=write_mode)
    h = hashlib.sha256()
    got = 0
    with shimmy.Stream("bulk/x", daemon=daemon.socket, capacity=capacity).reader(timeout=60) as r:
        if read_mode == "readinto":
            buf = bytearray(max(chunk, 1))
            mv = memoryview(buf)
            while n := r.readinto(buf):
                h.update(mv[:n])
                got += n
        elif read_mode == "read":
            while data := r.read(chunk):
                h.update(data)
                got += len(data)
        else:
            while True:
                view = r.read_view(chunk)
                if not view:
                    break
                h.update(view)
                got += len(view)
                r.consume(len(view))
    result = finish(writer, timeout=200)
    assert got == total == result["written"]
    assert h.hexdigest() == result["sha256"]
    wait_freed(daemon)


def test_copyfileobj_file_to_stream_to_file(daemon, tmp_path):
    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    src.write_bytes(os.urandom(3 * MiB + 17))
    writer = spawn("copyfile", daemon=daemon.socket, name="files/a", path=str(src))
    with shimmy.Stream("files/a", daemon=daemon.socket, capacity=1 << 16).reader(timeout=30) as r, \
            open(dst, "wb") as out:
        shutil.copyfileobj(r, out)
    finish(writer)
    assert dst.read_bytes() == src.read_bytes()
    wait_freed(daemon)


def test_shimmy_cat_round_trip(daemon, tmp_path):
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(os.urandom(2 * MiB + 3))
    cli = [sys.executable, "-m", "shimmy.cli", "cat", "--daemon", daemon.socket]
    with open(src, "rb") as fin:
        w = subprocess.Popen(cli + ["--write", "cat/x"], stdin=fin, stderr=subprocess.PIPE)
    with open(dst, "wb") as fout:
        r = subprocess.run(cli + ["cat/x", "--timeout", "30"], stdout=fout,
                           stderr=subprocess.PIPE, timeout=60)
    assert w.wait(timeout=60) == 0, w.stderr.read()
    assert r.returncode == 0, r.stderr
    assert r.stderr == b""  # piped: no progress bar
    assert dst.read_bytes() == src.read_bytes()
    wait_freed(daemon)


def test_shimmy_cat_progress_bar_on_a_terminal(daemon, tmp_path):
    import pty
    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(1 * MiB))
    cli = [sys.executable, "-m", "shimmy.cli", "cat", "--daemon", daemon.socket]
    master, slave = pty.openpty()
    try:
        with open(src, "rb") as fin:
            w = subprocess.Popen(cli + ["--write", "cat/tty"], stdin=fin, stderr=slave)
        os.close(slave)
        r = subprocess.run(cli + ["cat/tty", "--timeout", "30"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=60)
        assert w.wait(timeout=60) == 0
        out = b""
        import select
        while select.select([master], [], [], 0.5)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
    assert r.stdout == src.read_bytes()
    # bytes, rate, and (the input is a regular file of known size) percent and ETA
    assert b"MiB" in out and b"/s" in out and b"100.0%" in out and b"ETA" in out, out


def test_buffered_reader_readline_and_context_managers(daemon):
    lines = [f"line {i} {'x' * (i % 97)}\n".encode() for i in range(2000)]
    with shimmy.Stream("text/a", daemon=daemon.socket, capacity=4096).reader(timeout=10) as raw:
        writer = spawn("lines", daemon=daemon.socket, name="text/a", lines=len(lines))
        buffered = io.BufferedReader(raw)
        got = [buffered.readline() for _ in range(len(lines))]
        assert buffered.readline() == b""
    finish(writer)
    assert got == lines
    # readline straight on the raw end (uses peek)
    with shimmy.Stream("text/b", daemon=daemon.socket).writer() as w:
        w.write(b"alpha\nbeta\ngamma")
    with shimmy.Stream("text/b", daemon=daemon.socket).reader(timeout=5) as r:
        assert r.readlines() == [b"alpha\n", b"beta\n", b"gamma"]
    wait_freed(daemon)


# -- failure semantics -----------------------------------------------------------------------
def test_reader_killed_writer_gets_stream_broken(daemon):
    reader = spawn("hold_reader", daemon=daemon.socket, name="fail/r", read=10000)
    w = shimmy.Stream("fail/r", daemon=daemon.socket, capacity=1 << 16).writer(timeout=5)
    w.write(b"x" * 10000)
    wait_line(reader, "read")
    assert w.peer_pid == reader.pid
    os.kill(reader.pid, signal.SIGKILL)
    reader.wait(timeout=10)
    deadline = time.monotonic() + 10
    with pytest.raises(StreamBroken) as info:
        while time.monotonic() < deadline:
            try:
                w.write(b"y" * 4096, timeout=0.2)
            except BackpressureTimeout:
                pass  # ring full before the daemon marked the reader dead
            time.sleep(0.01)
    assert isinstance(info.value, BrokenPipeError)
    assert "died" in str(info.value) and str(reader.pid) in str(info.value)
    with pytest.raises(StreamBroken):  # stays broken
        w.write(b"z")
    w.close()
    wait_freed(daemon)


def test_reader_killed_wakes_a_writer_blocked_on_a_full_ring(daemon):
    import threading
    reader = spawn("hold_reader", daemon=daemon.socket, name="fail/rb", read=1)
    w = shimmy.Stream("fail/rb", daemon=daemon.socket, capacity=4096).writer()
    w.write(b"!")
    wait_line(reader, "read")
    killer = threading.Timer(0.3, os.kill, (reader.pid, signal.SIGKILL))
    killer.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(StreamBroken):
            w.write(b"b" * (1 << 20), timeout=20)  # blocks: the ring holds 4 KiB
    finally:
        killer.join()
        reader.wait(timeout=10)
    assert time.monotonic() - t0 < 10  # woken by the daemon's post, not by the timeout
    w.close()
    wait_freed(daemon)


def test_writer_killed_reader_drains_then_stream_broken(daemon):
    committed = 300_001
    writer = spawn("write_and_hang", daemon=daemon.socket, name="fail/w", total=committed,
                   capacity=1 << 20)
    wait_line(writer, "wrote")
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(timeout=10)
    with shimmy.Stream("fail/w", daemon=daemon.socket).reader(timeout=10) as r:
        data = bytearray()
        with pytest.raises(StreamBroken) as info:
            while True:
                chunk = r.read(65536)
                assert chunk != b"", "a crashed writer must not look like a clean EOF"
                data += chunk
        assert isinstance(info.value, BrokenPipeError)
        assert str(writer.pid) in str(info.value)
        with pytest.raises(StreamBroken):  # keeps saying so
            r.read(1)
    assert bytes(data) == b"".join(p for _, p in pattern_chunks(committed, committed))
    wait_freed(daemon)


def test_writer_killed_mid_write_reader_gets_an_intact_prefix(daemon):
    writer = spawn("write", daemon=daemon.socket, name="fail/mid", total=1 << 40, chunk=100_003,
                   capacity=1 << 16, mode="write")
    h = hashlib.sha256()
    got = 0
    with shimmy.Stream("fail/mid", daemon=daemon.socket, capacity=1 << 16).reader(timeout=10) as r:
        buf = bytearray(50_000)
        while got < 5 * MiB:
            n = r.readinto(buf)
            assert n
            h.update(memoryview(buf)[:n])
            got += n
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=10)
        with pytest.raises(StreamBroken):
            while True:
                n = r.readinto(buf)
                assert n, "a crashed writer must not look like a clean EOF"
                h.update(memoryview(buf)[:n])
                got += n
    assert h.hexdigest() == expected_digest(got)
    wait_freed(daemon)


def test_reader_closing_breaks_the_writer_like_a_pipe(daemon):
    w = shimmy.Stream("fail/close", daemon=daemon.socket).writer(timeout=5)
    r = shimmy.Stream("fail/close", daemon=daemon.socket).reader(timeout=5)
    w.write(b"abc")
    assert r.read(3) == b"abc"
    r.close()
    with pytest.raises(StreamBroken, match="closed"):
        w.write(b"d")
    w.close()
    wait_freed(daemon)


def test_restarted_daemon_retires_orphaned_streams(daemon_factory):
    first = daemon_factory()
    w = shimmy.Stream("orphan/x", daemon=first.socket).writer(timeout=5)
    r = shimmy.Stream("orphan/x", daemon=first.socket).reader(timeout=5)
    w.write(b"abc")
    first.kill()
    daemon_factory(directory=first.dir)  # its successor sweeps what the first one left
    assert r.read(3) == b"abc"           # committed bytes are still delivered
    with pytest.raises(StreamBroken, match="retired"):
        r.read(1)
    with pytest.raises(StreamBroken, match="retired"):
        w.write(b"d")
    w.close()
    r.close()


# -- exclusivity and reuse -------------------------------------------------------------------
@pytest.mark.parametrize("role", ["writer", "reader"])
def test_second_end_is_refused_naming_the_holder(daemon, role):
    holder = spawn("hold", daemon=daemon.socket, name="busy/x", role=role)
    wait_line(holder, "holding")
    stream = shimmy.Stream("busy/x", daemon=daemon.socket)
    with pytest.raises(StreamBusy) as info:
        getattr(stream, role)()
    assert f"pid {holder.pid}" in str(info.value) and role in str(info.value)
    # the other role is still free
    other = stream.reader() if role == "writer" else stream.writer()
    other.close()
    holder.kill()
    holder.wait(timeout=10)
    wait_freed(daemon)


def test_name_is_reusable_after_clean_close(daemon):
    for round_ in range(3):
        w = shimmy.Stream("reuse/x", daemon=daemon.socket, capacity=4096).writer(timeout=5)
        r = shimmy.Stream("reuse/x", daemon=daemon.socket).reader(timeout=5)
        msg = f"round {round_}".encode()
        w.write(msg)
        w.close()
        assert r.read() == msg  # read to EOF: a fresh stream, nothing from the round before
        # finished writer, live reader: a new writer must wait for the reader to close
        with pytest.raises(StreamBusy, match="finished"):
            shimmy.Stream("reuse/x", daemon=daemon.socket).writer()
        r.close()
        wait_freed(daemon)


def test_writer_may_finish_before_the_reader_arrives(daemon):
    with shimmy.Stream("early/x", daemon=daemon.socket).writer(timeout=5) as w:
        w.write(b"kept for the reader")
    assert daemon.shm_objects()  # not reclaimed: a reader may still come for these bytes
    with shimmy.Stream("early/x", daemon=daemon.socket).reader(timeout=5) as r:
        assert r.read() == b"kept for the reader"
    wait_freed(daemon)


def test_daemon_stat_lists_streams(daemon):
    from shimmy.sdk.client import get_client
    with shimmy.Stream("stat/x", daemon=daemon.socket).writer() as w:
        w.write(b"12345")
        info = get_client(daemon.socket).request("stat")["streams"]
        (s,) = [s for s in info if s["name"] == "stat/x"]
        assert s["buffered"] == 5 and s["writer"]["pid"] == os.getpid() and s["reader"] is None
    r = shimmy.Stream("stat/x", daemon=daemon.socket).reader()
    r.close()
    wait_freed(daemon)


# -- timeouts and bad input ------------------------------------------------------------------
def test_timeouts(daemon):
    r = shimmy.Stream("slow/x", daemon=daemon.socket, capacity=4096).reader()
    t0 = time.monotonic()
    with pytest.raises(ReceiveTimeout) as info:
        r.read(10, timeout=0.2)
    assert isinstance(info.value, TimeoutError) and time.monotonic() - t0 < 5
    w = shimmy.Stream("slow/x", daemon=daemon.socket).writer(timeout=0.2)
    with pytest.raises(BackpressureTimeout) as info:
        w.write(b"q" * 5000)  # ring holds 4096
    assert info.value.written == 4096 and isinstance(info.value, TimeoutError)
    with pytest.raises(BackpressureTimeout):
        w.claim(10)
    assert r.read(10000) == b"q" * 4096
    w.close()
    r.close()
    wait_freed(daemon)


def test_bad_input(daemon):
    sock = daemon.socket
    for cap in (-1, 0, 3000, 1 << 31, "big"):
        with pytest.raises(InvalidArgument):
            shimmy.Stream("bad/x", daemon=sock, capacity=cap)
    with pytest.raises(InvalidName):
        shimmy.Stream("bad//x", daemon=sock)
    with pytest.raises(InvalidArgument):
        shimmy.Stream("bad/x", daemon=sock).reader(timeout=-1)
    w = shimmy.Stream("bad/x", daemon=sock, capacity=4096).writer()
    r = shimmy.Stream("bad/x", daemon=sock).reader()
    with pytest.raises(TypeError):
        w.write("text is not bytes")
    for call in (lambda: r.read_view(-1), lambda: r.read_view(0), lambda: r.consume(-1),
                 lambda: w.claim(-5), lambda: w.commit(-1), lambda: r.read(1.5),
                 lambda: r.read(1, timeout=-2)):
        with pytest.raises(InvalidArgument):
            call()
    w.write(b"0123456789")
    view = r.read_view(4, timeout=1)
    assert bytes(view) == b"0123"
    with pytest.raises(InvalidArgument, match="exceeds"):
        r.consume(5)
    with pytest.raises(InvalidArgument, match="consume"):
        r.read(1)  # a view is out: consume it first
    r.consume(4)
    with pytest.raises(ValueError):
        view[0]  # released by consume: no stale access into the ring
    buf = w.claim(3, timeout=1)
    buf[:] = b"abc"
    with pytest.raises(InvalidArgument, match="claimed"):
        w.commit(4)
    w.commit(3)
    with pytest.raises(ValueError):
        buf[0] = 1  # released by commit: no late writes into the ring
    w.close()
    assert r.read() == b"456789abc"
    for call in (lambda: w.write(b"x"), lambda: w.claim(1)):
        with pytest.raises(shimmy.StreamClosed) as info:
            call()
        assert isinstance(info.value, ValueError)
    r.close()
    for call in (lambda: r.read(1), lambda: r.readinto(bytearray(1)), lambda: r.read_view(1)):
        with pytest.raises(ValueError):
            call()
    wait_freed(daemon)


# -- worker processes --------------------------------------------------------------------------
def _worker(role: str, kw: dict) -> None:
    stream = shimmy.Stream(kw["name"], daemon=kw["daemon"], capacity=kw.get("capacity"))
    if role == "write":
        h = hashlib.sha256()
        written = 0
        with stream.writer(timeout=60) as w:
            for _, piece in pattern_chunks(kw["total"], kw["chunk"]):
                if kw["mode"] == "claim":
                    while piece:
                        buf = w.claim(len(piece))
                        k = len(buf)
                        buf[:] = piece[:k]
                        buf.release()
                        w.commit(k)
                        h.update(piece[:k])
                        piece = piece[k:]
                        written += k
                else:
                    w.write(piece)
                    h.update(piece)
                    written += len(piece)
        print(json.dumps({"written": written, "sha256": h.hexdigest()}))
    elif role == "write_and_hang":
        w = stream.writer(timeout=30)
        for _, piece in pattern_chunks(kw["total"], kw["total"]):
            w.write(piece)
        print("wrote", flush=True)
        time.sleep(60)
    elif role == "copyfile":
        with open(kw["path"], "rb") as src, stream.writer(timeout=30) as w:
            shutil.copyfileobj(src, w)
        print(json.dumps({}))
    elif role == "lines":
        with stream.writer(timeout=30) as w:
            for i in range(kw["lines"]):
                w.write(f"line {i} {'x' * (i % 97)}\n".encode())
        print(json.dumps({}))
    elif role == "hold_reader":
        r = stream.reader(timeout=30)
        got = 0
        while got < kw["read"]:
            got += len(r.read(kw["read"] - got))
        print("read", flush=True)
        time.sleep(60)
    elif role == "hold":
        end = getattr(stream, kw["role"])()
        print("holding", flush=True)
        time.sleep(60)
        end.close()
    else:
        raise SystemExit(f"unknown role {role}")


if __name__ == "__main__":
    _worker(sys.argv[1], json.loads(sys.argv[2]))
