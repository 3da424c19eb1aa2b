"""The link reader's read-ahead (daemon/peer/tcp.py, ``READ_AHEAD``): headers, small payloads and
commits taken from one buffer, large payloads partly from it and the rest straight into the
replica ring, control messages in between, whatever the TCP segmentation.  A real socket pair,
a real replica ring; the sender dribbles the stream in uneven pieces so that headers, payloads
and the buffer's end fall at every kind of boundary."""

from __future__ import annotations

import itertools
import os
import mmap
import random
import socket
import threading
import time

import msgpack

from shimmy import ring
from shimmy.daemon.peer import tcp
from shimmy.daemon.peer.mirror import MirrorReplica
from shimmy.daemon.peer.transport import TransportClosed

CAP = 1 << 18
MID = 3


def _frames(seq: int, sizes: list[int], rnd: random.Random) -> bytes:
    out = bytearray()
    for k, n in enumerate(sizes):
        out += ring.FRAME.pack(n, 0, seq + k) + rnd.randbytes(n)
        out += bytes(ring.frame_size(n) - ring.HEADER - n)
    return bytes(out)


def _add_batch(stream: bytearray, expect: bytearray, pos: int, seq: int, sizes: list[int],
               rnd: random.Random) -> tuple[int, int]:
    """Append one batch (PUT, its frames, COMMIT) of messages of ``sizes`` at ``pos``, numbered
    from ``seq``, to ``stream`` (its frames to ``expect``); return the next ``(pos, seq)``."""
    blob = _frames(seq, sizes, rnd)
    last = pos + len(blob) - ring.frame_size(sizes[-1])
    stream += tcp.HDR.pack(tcp.K_PUT, MID, pos, pos + len(blob), 0, 0) + blob
    stream += tcp.HDR.pack(tcp.K_COMMIT, MID, pos + len(blob), last, 0, 0)
    expect += blob
    return pos + len(blob), seq + len(sizes)


def test_reader_lands_every_byte_whatever_the_segmentation():
    rnd = random.Random(19)
    mm = mmap.mmap(-1, ring.segment_size(CAP, 4))
    ring.format_ring(mm, "ra/x", ring.MODE_RELIABLE, CAP, 4)
    view = ring.RingView(mm)
    sink = MirrorReplica(view, "/shimmy-readahead-none.s")
    # The stream: a jump to 0, then batches (PUT + payload + COMMIT) of small frames and of
    # frames larger than the read-ahead buffer, a control message every few batches.
    stream = bytearray(tcp.HDR.pack(tcp.K_JUMP, MID, 0, 0, 0, 0))
    expect = bytearray()
    ctrls = []
    pos, seq = 0, 0
    for b in range(120):
        big = b % 7 == 3
        sizes = [rnd.randrange(tcp.READ_AHEAD, 3 * tcp.READ_AHEAD)] if big else \
            [rnd.randrange(0, 300) for _ in range(rnd.randrange(1, 6))]
        pos, seq = _add_batch(stream, expect, pos, seq, sizes, rnd)
        if b % 5 == 0:
            payload = msgpack.packb({"t": "note", "n": b, "pad": "x" * rnd.randrange(0, 2000)})
            stream += tcp.HDR.pack(tcp.K_CTRL, 0, len(payload), 0, 0, 0) + payload
            ctrls.append(b)
    assert pos < CAP          # no wrap: the replica's bytes sit at their stream positions

    lsock = socket.create_server(("127.0.0.1", 0))
    tx = socket.create_connection(lsock.getsockname())
    rx, _ = lsock.accept()
    lsock.close()
    rx.settimeout(5)
    tx.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    link = tcp.Link(rx, "dst", "src", "pair", False, 1 << 20, 5.0)
    link.sinks[MID] = sink
    got: list[int] = []
    errors: list[BaseException] = []

    def read():
        try:
            link.run_reader(lambda lk, obj: got.append(obj["n"]), CAP)
        except (TransportClosed, OSError):
            pass
        except BaseException as exc:
            errors.append(exc)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    pieces = itertools.cycle([1, 39, 40, 41, 7, 4095, 4096, 4097, 13, 300, 9000, 2])
    at = 0
    while at < len(stream):       # uneven pieces, a pause now and then: partial reads
        n = next(pieces)
        tx.sendall(stream[at:at + n])
        at += n
        if n < 50:
            time.sleep(0.0005)
    deadline = time.monotonic() + 10
    while sink.tail < pos and time.monotonic() < deadline and not errors:
        time.sleep(0.005)
    link.close()
    tx.close()
    reader.join(5)
    assert not errors, errors
    assert sink.tail == pos
    assert bytes(view.mv[view.data_offset:view.data_offset + pos]) == bytes(expect)
    assert got == ctrls
    assert link.stats["bytes_received"] == len(stream)


def test_buffered_small_batches_land_without_the_python_put():
    """A batch whose payload and COMMIT arrive within one read-ahead buffer is landed by the C
    relay (shimmy/_relaycore.c, ``MirrorReplica.land``) where it is built, which it must be
    where a compiler is: the Python ``put_target`` never sees it, and the replica holds the
    same bytes and numbers as the Python path would give it."""
    from shimmy.daemon.peer import relay
    assert relay.ACCELERATED or os.environ.get("SHIMMY_PURE_PYTHON"), \
        "shimmy._relaycore was not built although a compiler is here"
    rnd = random.Random(7)
    mm = mmap.mmap(-1, ring.segment_size(CAP, 4))
    ring.format_ring(mm, "ra/c", ring.MODE_RELIABLE, CAP, 4)
    view = ring.RingView(mm)
    sink = MirrorReplica(view, "/shimmy-readahead-none.c")
    puts = []
    put_target = sink.put_target
    sink.put_target = lambda *a: puts.append(a) or put_target(*a)
    stream = bytearray(tcp.HDR.pack(tcp.K_JUMP, MID, 0, 0, 0, 0))
    expect = bytearray()
    pos = seq = 0
    first = 0                     # messages of the first batch: counted from the second on
    for _ in range(200):          # ~50 KiB in all: well inside the ring, no wrap
        sizes = [rnd.randrange(0, 120) for _ in range(rnd.randrange(1, 4))]
        first = first or len(sizes)
        pos, seq = _add_batch(stream, expect, pos, seq, sizes, rnd)
    a, b = socket.socketpair()
    a.settimeout(5)
    link = tcp.Link(a, "dst", "src", "pair", False, 1 << 20, 5.0)
    link.sinks[MID] = sink
    reader = threading.Thread(target=lambda: _read_quietly(link), daemon=True)
    reader.start()
    b.sendall(stream)
    deadline = time.monotonic() + 10
    while sink.tail < pos and time.monotonic() < deadline:
        time.sleep(0.005)
    link.close()
    b.close()
    reader.join(5)
    assert sink.tail == pos and view.q[ring.W_TAIL] == pos
    assert bytes(view.mv[view.data_offset:view.data_offset + pos]) == bytes(expect)
    assert ring.stream_point(view) == (pos, seq)
    assert sink.counters()["messages"] == seq - first and sink.counters()["batches"] == 200
    if relay.ACCELERATED:
        assert len(puts) < 20, f"{len(puts)} of 200 buffered batches went through put_target"
    else:
        assert len(puts) == 200


def _read_quietly(link) -> None:
    try:
        link.run_reader(lambda lk, obj: None, CAP)
    except (TransportClosed, OSError):
        pass
