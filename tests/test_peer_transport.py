"""Conformance suite for peer transports (daemon/peer/transport.py contract).

Every transport runs the same tests: TCP always (over a local socket pair, no daemon); RDMA only
where a device and pyverbs exist, otherwise skipped with the reason ``rdma.available()`` gives.
"""

from __future__ import annotations

import mmap
import socket
import threading
import time

import pytest

from shimmy import ring
from shimmy.daemon.peer import rdma
from shimmy.daemon.peer.mirror import MirrorReplica
from shimmy.daemon.peer.tcp import Link, TcpTransport
from shimmy.daemon.peer.transport import TransportClosed
from workers import until

CAP = 1 << 16
SUBS = 4


def make_ring(mode=ring.MODE_LOSSY):
    mm = mmap.mmap(-1, ring.segment_size(CAP, SUBS))
    ring.format_ring(mm, "conf/x", mode, CAP, SUBS)
    return mm, ring.RingView(mm)


class TcpPair:
    """Source transport + replica sink joined by a real TCP connection on 127.0.0.1."""

    def __init__(self):
        lsock = socket.create_server(("127.0.0.1", 0))
        a = socket.create_connection(lsock.getsockname())
        b, _ = lsock.accept()
        lsock.close()
        for s in (a, b):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.settimeout(5)
        self.src_link = Link(a, "src", "dst", "pair", True, 1 << 20, 0.2)
        self.dst_link = Link(b, "dst", "src", "pair", False, 1 << 20, 0.2)
        self.mm, self.view = make_ring()
        self.sink = MirrorReplica(self.view, "/shimmy-conformance-none.s")
        self.dst_link.sinks[7] = self.sink
        self.transport = TcpTransport(self.src_link, 7)
        self.errors: list[BaseException] = []
        for link in (self.src_link, self.dst_link):
            threading.Thread(target=self._read, args=(link,), daemon=True).start()

    def _read(self, link):
        try:
            link.run_reader(lambda lk, obj: None, CAP)
        except (TransportClosed, OSError):
            pass
        except BaseException as exc:  # surfaced by the test
            self.errors.append(exc)

    def report_credit(self, consumed):
        self.dst_link.send_credit(7, consumed, self.sink.tail)

    def close(self):
        self.transport.close()
        self.src_link.close()
        self.dst_link.close()


def make_pair(kind):
    if kind == "tcp":
        return TcpPair()
    ok, why = rdma.available()
    if not ok:
        pytest.skip(f"RDMA transport: {why}")
    pytest.skip("RDMA transport: device present but the loopback pair harness needs two ports")


KINDS = ["tcp", "rdma"]


def frames(start_seq, sizes):
    """Bytes of consecutive frames (header + payload padded to 16)."""
    out = bytearray()
    for k, n in enumerate(sizes):
        hdr = ring.FRAME.pack(n, 0, start_seq + k)
        out += hdr + bytes([k & 0xFF]) * n + bytes(ring.frame_size(n) - ring.HEADER - n)
    return bytes(out)


@pytest.fixture(params=KINDS)
def pair(request):
    p = make_pair(request.param)
    yield p
    p.close()
    assert not p.errors, p.errors


def data_at(view, pos, n):
    off = pos & (CAP - 1)
    base = view.data_offset
    if off + n <= CAP:
        return bytes(view.mv[base + off:base + off + n])
    first = CAP - off
    return bytes(view.mv[base + off:base + CAP]) + bytes(view.mv[base:base + n - first])


def test_put_lands_at_same_offset_and_commit_makes_it_visible(pair):
    blob = frames(0, [10, 100, 0, 33])
    pair.transport.jump(0, 0)
    pair.transport.put(0, [memoryview(blob)], 0)
    until(lambda: pair.sink.next == len(blob), 5.0, "pair.sink.next == len(blob)", every=0.001)
    assert pair.view.q[ring.OFF_TAIL // 8] == 0            # not visible before the commit
    last = len(blob) - ring.frame_size(33)
    pair.transport.commit(len(blob), last)
    until(lambda: pair.view.q[ring.OFF_TAIL // 8] == len(blob), 5.0,
          "pair.view.q[ring.OFF_TAIL // 8] == len(blob)", every=0.001)
    assert data_at(pair.view, 0, len(blob)) == blob
    assert ring.stream_point(pair.view) == (len(blob), 4)


def test_range_split_at_the_wrap(pair):
    start = CAP - 64
    pair.transport.jump(start, 100)
    blob = frames(100, [40, 40, 40])          # 64 + 64 + 64 bytes: crosses the wrap
    views = [memoryview(blob)[:64], memoryview(blob)[64:]]
    pair.transport.put(start, views, start - ring.HEADER)
    pair.transport.commit(start + len(blob), start + 128)
    until(lambda: pair.view.q[ring.OFF_TAIL // 8] == start + len(blob), 5.0,
          "pair.view.q[ring.OFF_TAIL // 8] == start + len(blob)", every=0.001)
    assert data_at(pair.view, start, len(blob)) == blob
    assert ring.stream_point(pair.view)[1] == 103


def test_jump_reports_exact_loss_to_readers(pair):
    pair.transport.jump(0, 0)
    a = frames(0, [8])
    pair.transport.put(0, [memoryview(a)], 0)
    pair.transport.commit(len(a), 0)
    until(lambda: pair.sink.tail == len(a), 5.0, "pair.sink.tail == len(a)", every=0.001)
    reader = ring.RingReader(pair.view, 0, 0, 0)
    assert reader.take()[3] == 0
    pair.transport.jump(4096, 57)                       # seqs 1..56 are gone
    b = frames(57, [8])
    pair.transport.put(4096, [memoryview(b)], 4096 - ring.HEADER)
    pair.transport.commit(4096 + len(b), 4096)
    until(lambda: pair.sink.tail == 4096 + len(b), 5.0,
          "pair.sink.tail == 4096 + len(b)", every=0.001)
    got = reader.take()
    assert got[3] == 57 and got[4] == 56


@pytest.mark.parametrize("laps", [1, 2])
def test_jump_a_whole_number_of_rings_plus_16_keeps_the_hole_readable(pair, laps):
    """A hole whose zero PAD (at position - 16) falls on the ring offset of its first header
    (lossy lapping by a whole number of rings plus 16 bytes: seen in the lab) must not
    overwrite that header: a reader caught up at the old tail reads the hole and then the
    next message, with the exact loss (spec/ring.md, "Replica rings")."""
    pair.transport.jump(0, 0)
    a = frames(0, [8, 8])
    old = len(a)
    pair.transport.put(0, [memoryview(a)], 0)
    pair.transport.commit(old, old - ring.frame_size(8))
    until(lambda: pair.sink.tail == old, 5.0, "pair.sink.tail == old", every=0.001)
    reader = ring.RingReader(pair.view, 0, 0, 0)
    assert [reader.take()[3], reader.take()[3], reader.take()] == [0, 1, None]
    position = old + laps * CAP + ring.HEADER
    pair.transport.jump(position, 1000)               # seqs 2..999 are gone
    b = frames(1000, [8])
    pair.transport.put(position, [memoryview(b)], position - ring.HEADER)
    pair.transport.commit(position + len(b), position)
    until(lambda: pair.sink.tail == position + len(b), 5.0,
          "pair.sink.tail == position + len(b)", every=0.001)
    assert ring.stream_point(pair.view) == (position + len(b), 1001)
    got = reader.take()
    assert got is not None and got[0] == position and got[3:] == (1000, 998), got


def test_pad_until_hides_torn_bytes(pair):
    pair.transport.jump(0, 0)
    blob = frames(0, [8, 8, 8])
    pair.transport.put(0, [memoryview(blob)], 0)
    pair.transport.commit(len(blob), 64, 64)            # first two frames were torn at the source
    until(lambda: pair.sink.tail == len(blob), 5.0, "pair.sink.tail == len(blob)", every=0.001)
    reader = ring.RingReader(pair.view, 0, 0, 0)
    got = reader.take()
    assert got[3] == 2 and got[4] == 2                  # exactly two lost, no torn frame


def test_credits_flow_back(pair):
    assert pair.transport.credits() is None
    pair.report_credit(4096)
    until(lambda: pair.transport.credits() == 4096, 5.0,
          "pair.transport.credits() == 4096", every=0.001)


def test_close_stops_the_transport(pair):
    pair.transport.close()
    with pytest.raises(TransportClosed):
        pair.transport.put(0, [memoryview(b"x" * 16)], 0)
    pair.transport.close()  # idempotent


def test_link_loss_raises_transport_closed(pair):
    pair.dst_link.close()
    with pytest.raises(TransportClosed):
        for _ in range(1000):
            pair.transport.put(0, [memoryview(bytes(4096))], 0)
            time.sleep(0.001)


def test_source_cuts_batches_so_replica_head_never_passes_last(pair):
    """Replica rings keep invariant (A), head <= last, at every instant, also while a batch
    lands (spec/ring.md, "Replica rings"): a reliable source whose subscribers consumed
    everything lets its publisher fill a whole ring before the mirror sends; one batch that
    long would make the replica's head pass its last frame before the commit (the transient
    RingCorrupted of ls/stat/subscribe).  The real MirrorSource cuts it at a frame boundary;
    the replica is checked at each put, before the bytes land."""
    sink = pair.sink
    seen: list[tuple[int, int]] = []
    put_target = sink.put_target

    def checked(start, end, guard):   # the real put_target, then the invariant as it stands
        views = put_target(start, end, guard)
        seen.append((sink.q[ring.OFF_HEAD // 8], sink.q[ring.OFF_LAST // 8]))
        return views
    sink.put_target = checked
    sink.land = lambda *batch: -1   # every batch through put_target, where this test looks
    view = ring_long_batch(pair)
    assert len(seen) >= 3, seen   # (the first frame's put, then the ring-long batch, cut)
    assert all(head <= last for head, last in seen), seen
    assert ring.stream_point(sink.v) == ring.stream_point(view)


def ring_long_batch(pair):
    """A reliable source ring whose mirror's slot consumed everything but which the publisher
    filled a whole ring past that, mirrored by a real MirrorSource to ``pair``'s replica (which
    holds the first frame already); returns the source ring's view once the replica has it all."""
    import os

    import posix_ipc

    from shimmy.daemon.peer.mirror import MirrorSource
    sink = pair.sink
    prefix = f"/shimmy-conf-cut-{os.getpid()}.s"
    sem = posix_ipc.Semaphore(prefix + "0", posix_ipc.O_CREX)
    mm, view = make_ring(ring.MODE_RELIABLE)
    wakeups = ring.Wakeups(view, prefix)
    try:
        writer = ring.RingWriter(view, wakeups)
        ring.daemon_activate_slot(view, 0, 0, os.getpid(), 1)   # the mirror's slot
        body = b"m" * (1024 - ring.HEADER)
        writer.publish(body, 1.0)
        # The replica holds the first frame (as after earlier batches), and has consumed it.
        pair.transport.jump(0, 0)
        pair.transport.put(0, [view.mv[view.data_offset:view.data_offset + 1024]], 0)
        pair.transport.commit(1024, 0)
        until(lambda: sink.tail == 1024, 5.0, "sink.tail == 1024", every=0.001)
        view.q[view.slot_word(0)] = 1024
        while writer._tail + 1024 <= 1024 + CAP:   # a whole ring past what was consumed
            writer.publish(body, 1.0)
        tail = writer._tail
        assert tail - 1024 == CAP
        src = MirrorSource("conf/x", view, 0, prefix + "0", pair.transport, 1024, None, 1024)
        src.start()
        until(lambda: sink.tail == tail, 5.0, "sink.tail == tail", every=0.001)
        src.stop()
        src.thread.join(2)
    finally:
        wakeups.close()
        sem.unlink()
        sem.close()
    return view


@pytest.mark.parametrize("committed_before", [True, False])
def test_uncommitted_put_of_a_stopped_mirror_is_dropped_not_a_restart(pair, committed_before):
    """The lossy fan-out flake: a mirror is stopped after a put landed but before its commit
    (the replica's ``next`` is past its tail), and the next mirror of the same replica begins
    with a jump (or a put) at the replica's tail.  The replica drops the uncommitted bytes and
    continues; it used to take this for a restarted stream and retire itself when it had no
    committed message yet (its subscribers got ChannelClosed), or rebase."""
    pair.transport.jump(0, 0)
    tail, seq = 0, 0
    if committed_before:
        blob = frames(0, [10, 100, 0, 33])
        pair.transport.put(0, [memoryview(blob)], 0)
        pair.transport.commit(len(blob), len(blob) - ring.frame_size(33))
        tail, seq = len(blob), 4
        until(lambda: pair.sink.tail == tail, 5.0, "pair.sink.tail == tail", every=0.001)
    stale = frames(seq, [50, 60])
    pair.transport.put(tail, [memoryview(stale)], 0)   # never committed: mirror stopped
    until(lambda: pair.sink.next == tail + len(stale), 5.0,
          "pair.sink.next == tail + len(stale)", every=0.001)
    # The next mirror: its first word is a jump to a point inside the uncommitted bytes, the
    # two stale messages lost; then a put and commit of the message after them.
    at = tail + ring.frame_size(50)
    pair.transport.jump(at, seq + 2)
    more = frames(seq + 2, [20])
    pair.transport.put(at, [memoryview(more)], 0)
    pair.transport.commit(at + len(more), at)
    until(lambda: pair.sink.tail == at + len(more), 5.0,
          "pair.sink.tail == at + len(more)", every=0.001)
    assert not pair.sink.reset_needed and pair.sink.rebases == 0
    assert ring.stream_point(pair.view) == (at + len(more), seq + 3)
    reader = ring.RingReader(pair.view, 0, tail, seq)
    got = reader.take()
    assert got is not None and got[3] == seq + 2 and got[4] == 2   # exactly 2 lost
    # A put at the tail right after an uncommitted one (a mirror that resumes at our tail).
    pair.transport.put(pair.sink.tail, [memoryview(frames(seq + 3, [5]))], 0)
    until(lambda: pair.sink.next > pair.sink.tail, 5.0,
          "pair.sink.next > pair.sink.tail", every=0.001)
    pair.transport.put(pair.sink.tail, [memoryview(frames(seq + 3, [8]))], 0)
    end = pair.sink.tail + ring.frame_size(8)
    pair.transport.commit(end, pair.sink.tail)
    until(lambda: pair.sink.tail == end, 5.0, "pair.sink.tail == end", every=0.001)
    assert ring.stream_point(pair.view) == (end, seq + 4) and not pair.errors


def test_a_batch_torn_to_its_end_is_skipped_with_an_exact_count(pair):
    """Lossy: the publisher laps the mirror while it sends a batch, past the batch's end (the
    seqlock check after the put finds head >= tail).  PAD frames alone would carry no seq, so
    the seq at the replica's tail (where a new subscriber starts) would be lost; the source
    must not commit such a batch but jump past it (spec/ring.md, "Replica rings").  A real
    MirrorSource over ``pair``; the replica's stream point is checked after every step."""
    import os

    import posix_ipc

    from shimmy.daemon.peer.mirror import MirrorSource
    sink, t = pair.sink, pair.transport
    prefix = f"/shimmy-conf-torn-{os.getpid()}.s"
    sem = posix_ipc.Semaphore(prefix + "0", posix_ipc.O_CREX)
    mm, view = make_ring(ring.MODE_LOSSY)
    wakeups = ring.Wakeups(view, prefix)
    size = 1024 - ring.HEADER          # one frame per KiB, no wrap PADs: seq = position // 1024
    writer = ring.RingWriter(view, wakeups)
    lap = threading.Event()
    checked: list[tuple[int, int]] = []

    def exact():   # the replica's stream point, to check it names the message at its tail
        until(lambda: sink.tail == sink.next, 5.0, "the replica applied the step", every=0.001)
        checked.append(ring.stream_point(sink.v))

    class Lapped:
        """``pair.transport``, with the publisher lapping the mirror inside one put."""

        def put(self, start, views, guard):
            if lap.is_set():
                lap.clear()
                for _ in range(2 * CAP // 1024):
                    writer.publish(bytes([writer._seq & 0xFF]) * size, 1.0)
            t.put(start, views, guard)

        def commit(self, tail, last, pad_until=0):
            t.commit(tail, last, pad_until)
            exact()

        def jump(self, position, seq):
            t.jump(position, seq)
            exact()

        def __getattr__(self, name):
            return getattr(t, name)

    src = MirrorSource("conf/x", view, 0, prefix + "0", Lapped(), 0, 0, None)
    try:
        ring.daemon_activate_slot(view, 0, 0, os.getpid(), 1)   # the mirror's slot
        for _ in range(10):
            writer.publish(bytes([writer._seq & 0xFF]) * size, 1.0)
        src.start()
        until(lambda: sink.tail == writer._tail, 5.0, "sink.tail == writer._tail", every=0.001)
        lap.set()
        for _ in range(5):
            writer.publish(bytes([writer._seq & 0xFF]) * size, 1.0)
        until(lambda: not lap.is_set() and sink.tail == writer._tail, 5.0,
              "the replica caught up after the lap", every=0.001)
        src.stop()
        src.thread.join(2)
    finally:
        wakeups.close()
        sem.unlink()
        sem.close()
    assert src.error is None and src.stats["torn"] >= 1, (src.error, src.stats)
    assert [p for p in checked if p[1] != p[0] // 1024] == [], checked
    assert ring.stream_point(sink.v) == ring.stream_point(view) == (writer._tail, writer._seq)
    first, expect = ring.stream_point(sink.v, oldest=True)
    reader = ring.RingReader(sink.v, 0, first, expect)
    got = lost = 0
    while (m := reader.take()) is not None:     # every message intact, every gap counted
        pos, off, length, seq, missed = m
        assert seq == pos // 1024, m
        assert bytes(sink.v.mv[off:off + length]) == bytes([seq & 0xFF]) * size, m
        got += 1
        lost += missed
    assert expect + got + lost == writer._seq, (expect, got, lost, writer._seq)
