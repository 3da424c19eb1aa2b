"""The transport conformance suite (tests/test_peer_transport.py) against RdmaTransport: real RC
QPs on the lab's rxe0, source and replica in one process (two QPs on one device), the peer link a
real TCP connection on 127.0.0.1 (credits).  The replica's guard acknowledgement and the replica's
``ready`` are handed to the source directly here; the daemon routes them over the link (that path
runs in test_two_node.py)."""

from __future__ import annotations

import mmap
import time

import pytest
import test_peer_transport as conformance

from shimmy import ring
from shimmy.daemon.peer import rdma
from shimmy.daemon.peer.transport import TransportClosed

CAP = conformance.CAP


def _place(view, start, views):
    data = b"".join(bytes(v) for v in views)
    p = 0
    for off, ln in rdma.split_range(start, len(data), CAP):
        at = view.data_offset + off
        view.mv[at:at + ln] = data[p:p + ln]
        p += ln


class Placing:
    """The conformance tests put arbitrary bytes; RDMA sends from the source ring's memory, so
    each put first places its bytes in a real source ring at the positions they claim."""

    def __init__(self, transport, view):
        self.t, self.v = transport, view

    def put(self, start, views, guard):
        _place(self.v, start, views)
        return self.t.put(start, views, guard)

    def put_commit(self, start, views, guard, tail, last):
        _place(self.v, start, views)
        return self.t.put_commit(start, views, guard, tail, last)

    def __getattr__(self, name):
        return getattr(self.t, name)


class RdmaPair(conformance.TcpPair):
    def __init__(self, threshold):
        super().__init__()               # real TCP link pair + replica ring and sink
        self.transport.close()           # (the TCP transport it made is not used)
        self.src_mm = mmap.mmap(-1, ring.segment_size(CAP, conformance.SUBS))
        ring.format_ring(self.src_mm, "conf/x", ring.MODE_LOSSY, CAP, conformance.SUBS)
        self.src_view = ring.RingView(self.src_mm)
        holder = {}
        self.rx = rdma.RdmaReceiver("", self.sink, self.view, threshold,
                                    lambda h: holder["t"].guard_acked_to(h),
                                    lambda why: self.errors.append(AssertionError(why)))
        t = rdma.RdmaTransport("", self.src_link, 7, self.src_view, self.rx.offer(), threshold,
                               False, 5.0)
        holder["t"] = t
        self.rx.connect(t.accept())
        t.ready()
        self.rdma = t
        self.transport = Placing(t, self.src_view)

    def close(self):
        self.rdma.close()
        self.rx.stop()
        self.src_link.close()
        self.dst_link.close()


@pytest.fixture(params=[0, 4032], ids=["rdma-write", "rdma-cpu-path"])
def pair(request):
    p = RdmaPair(request.param)
    yield p
    p.close()
    assert not p.errors, p.errors


# Two conformance tests watch the TCP receiving side's bookkeeping (``put_target``, ``next``);
# over RDMA they have variants below or do not apply.
TCP_ONLY = {"test_source_cuts_batches_so_replica_head_never_passes_last",
            # RDMA bytes reach the replica's bookkeeping only with their commit (the
            # WRITE_WITH_IMM completion), so a stopped mirror leaves no uncommitted put behind.
            "test_uncommitted_put_of_a_stopped_mirror_is_dropped_not_a_restart"}
for _name in dir(conformance):
    if _name.startswith("test_") and _name not in TCP_ONLY:
        globals()[_name] = getattr(conformance, _name)


def test_source_cuts_batches_replica_head_stays_at_or_below_last(pair):
    """RDMA variant of the batch-cutting test: the replica's head moves by the guard
    (``advance_head``) or the CPU path, so (head, last) is sampled from another thread for the
    whole transfer of a ring-long batch; every sample keeps head <= last."""
    import threading
    q = pair.sink.q
    seen: list[tuple[int, int]] = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            seen.append((q[ring.OFF_HEAD // 8], q[ring.OFF_LAST // 8]))
            time.sleep(0)   # let the transfer's threads run
    th = threading.Thread(target=sample)
    th.start()
    try:
        view = conformance.ring_long_batch(pair)
    finally:
        stop.set()
        th.join(5)
    assert len(seen) >= 3, seen
    assert all(head <= last for head, last in seen), [x for x in seen if x[0] > x[1]][:5]
    assert ring.stream_point(pair.sink.v) == ring.stream_point(view)


def test_qp_error_surfaces_as_transport_closed(pair):
    pair.transport.jump(0, 0)
    pair.rdma.ep.to_error()
    blob = conformance.frames(0, [100] * 8)
    with pytest.raises(TransportClosed, match="completion status|post_send"):
        for _ in range(50):
            pair.transport.put(0, [memoryview(blob)], 0)
            pair.transport.commit(len(blob), 0)
    assert pair.rdma.failure


def test_guard_moves_replica_head_before_bytes_land(pair):
    """Lossy lapping over RDMA: the replica's head passes the frames a write will overwrite."""
    pair.transport.jump(0, 0)
    pos, seq = 0, 0
    sizes = [1000] * 4
    for _ in range(3 * CAP // (len(sizes) * 1024)):
        blob = conformance.frames(seq, sizes)
        head = max(0, pos + len(blob) - CAP)
        pair.transport.put(pos, [memoryview(blob)], head)
        pair.transport.commit(pos + len(blob), pos + len(blob) - ring.frame_size(1000))
        pos += len(blob)
        seq += len(sizes)
    conformance.until(lambda: pair.sink.tail == pos, 5.0, "pair.sink.tail == pos", every=0.001)
    assert pair.sink.head >= pos - CAP
    assert conformance.data_at(pair.view, pos - len(blob), len(blob)) == blob


def test_put_lands_at_same_offset_and_commit_makes_it_visible(pair):
    """RDMA variant of the conformance test: the replica CPU learns of put bytes only from the
    commit record, so 'landed but not visible' is checked on the ring memory itself."""
    blob = conformance.frames(0, [10, 100, 0, 33])
    pair.transport.jump(0, 0)
    pair.transport.put(0, [memoryview(blob)], 0)
    conformance.until(lambda: pair.sink.fed, 5.0, "pair.sink.fed", every=0.001)
    assert pair.view.q[ring.W_TAIL] == 0           # not visible before the commit
    last = len(blob) - ring.frame_size(33)
    pair.transport.commit(len(blob), last)
    conformance.until(lambda: pair.view.q[ring.W_TAIL] == len(blob), 5.0,
                      "the replica's tail == len(blob)", every=0.001)
    assert conformance.data_at(pair.view, 0, len(blob)) == blob
    assert ring.stream_point(pair.view) == (len(blob), 4)
