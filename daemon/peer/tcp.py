"""The peer link (one authenticated TCP connection between two daemons) and the TCP transport.

Framing: every message starts with a fixed 40-byte header ``HDR`` (kind u8, 3 pad, mirror id
u32, four u64 arguments).  Kinds:

========  =====================================  =========================================
kind      arguments                              followed by
========  =====================================  =========================================
CTRL      a = payload length                     msgpack map (<= peer_max_control_bytes)
PUT       a = start, b = end, c = guard head     ``end - start`` raw ring bytes
COMMIT    a = tail, b = last, c = pad_until       -
JUMP      a = position, b = seq at position       -
CREDIT    a = consumed position, b = replica tail -
PING      -                                      -
========  =====================================  =========================================

The data path: a mirror's batch is *one* ``sendmsg([PUT header, ring view, (ring view after the
wrap), COMMIT header])`` straight from the source ring's memory (reliable sources; lossy ones
send the COMMIT on its own after their seqlock check).  The reader takes headers with one
``recv`` into a small read-ahead buffer (``READ_AHEAD``), which usually brings the payload of a
small batch and the COMMIT after it too: one system call per small batch, not three.  The rest
of a large payload is ``recv_into``-ed straight into the replica ring's memory at the same
offsets.  No Python object is made per message; a few are made per batch.  The common case of
both ends runs in C where it is built (shimmy/_relaycore.c, daemon/peer/relay.py): the mirror's
send of a reliable batch (``MirrorSource``'s pump), and the landing of a batch the read-ahead
buffer holds whole, with its COMMIT (``ReplicaSink.land``).

Threads: the dialer/acceptor thread that owns the connection runs :meth:`Link.run_reader`; a
small writer thread sends queued control messages and keepalives; mirror source threads send
data.  One lock serialises whole messages on the socket; the daemon's main thread never takes it
(it only queues control messages), so a stalled peer can never freeze the control plane.
"""

from __future__ import annotations

import collections
import logging
import socket
import ssl
import struct
import threading
import time
from typing import Callable, Sequence

import msgpack

from .transport import ReplicaSink, Transport, TransportClosed

log = logging.getLogger("shimmy.peer")

HDR = struct.Struct("<BxxxIQQQQ")
K_CTRL, K_PUT, K_COMMIT, K_JUMP, K_CREDIT, K_PING = 1, 2, 3, 4, 5, 6
DISCARD_CHUNK = 1 << 16
# Bytes one read-ahead recv may take: a header and what follows it in the stream (the payload of
# a small batch, its COMMIT, the next header).  Small, so that at most this much of a large
# payload is copied twice (buffer, then ring) before the rest goes straight into the ring.
READ_AHEAD = 4096


class LinkError(Exception):
    """The other side broke the protocol; ``reason`` is 'protocol' or 'size'."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class Link:
    """One authenticated connection to a peer daemon (either direction)."""

    _ids = iter(range(1, 1 << 62))

    def __init__(self, sock: socket.socket, node: str, remote: str, addr: str, dialed: bool,
                 max_control: int, keepalive: float):
        self.id = next(self._ids)
        self.sock = sock
        self.node = node
        self.remote = remote
        self.addr = addr
        self.dialed = dialed
        self.tls = isinstance(sock, ssl.SSLSocket)
        self._recv_flags = 0
        timeout = sock.gettimeout()
        if not self.tls and timeout:
            # The link timeout moves into the kernel (SO_RCVTIMEO/SO_SNDTIMEO) and the socket
            # blocks: a put's bytes then arrive in one recv (MSG_WAITALL) and a batch leaves in
            # one sendmsg, each one GIL release, instead of a poll() plus a partial call per
            # socket-buffer's worth (Python's own timeouts): 1 MiB messages cost the receiving
            # daemon 273 µs of CPU each that way.
            tv = struct.pack("ll", int(timeout), int(timeout % 1 * 1e6))
            sock.settimeout(None)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
            self._recv_flags = socket.MSG_WAITALL
        self.max_control = max_control
        self.keepalive = keepalive
        self.lock = threading.Lock()
        self.closed = False
        self.up_since = time.time()
        self.sinks: dict[int, ReplicaSink] = {}       # replica side, by mirror id
        self.transports: dict[int, Transport] = {}    # source side (credits), by mirror id
        self._ctrl: collections.deque = collections.deque()
        # Read-ahead (reader thread only): bytes [_r0, _r1) of _rbuf are received, not yet used.
        self._rbuf = bytearray(READ_AHEAD)
        self._rview = memoryview(self._rbuf)
        self._r0 = self._r1 = 0
        self._wake = threading.Event()
        self.stats = {"bytes_sent": 0, "bytes_received": 0, "batches_sent": 0,
                      "batches_received": 0, "control_sent": 0, "control_received": 0}
        self._writer = threading.Thread(target=self._run_writer, name=f"peer-w-{remote}",
                                        daemon=True)
        self._writer.start()

    # -- sending -------------------------------------------------------------------------------
    def send(self, parts: Sequence, more: bool = False) -> None:
        """Send one whole message (header + payload views) atomically; raise TransportClosed."""
        if self.closed:
            raise TransportClosed(f"link to {self.remote} is closed")
        with self.lock:
            try:
                self._send_locked(parts, more)
            except OSError as exc:
                self.close()
                raise TransportClosed(f"link to {self.remote}: {exc}") from None

    def _send_locked(self, parts: Sequence, more: bool) -> None:
        sock = self.sock
        if self.tls:  # SSLSocket has no sendmsg; each part still goes without a Python copy
            n = 0
            for p in parts:
                sock.sendall(p)
                n += len(p)
            self.stats["bytes_sent"] += n
            return
        flags = socket.MSG_MORE if more else 0
        total = 0
        for p in parts:
            total += len(p)
        sent = sock.sendmsg(parts, (), flags)
        self.stats["bytes_sent"] += total
        if sent == total:
            return
        # Partial send (socket buffer full past the timeout slice): continue with the rest.
        rest = []
        for p in parts:
            if sent >= len(p):
                sent -= len(p)
                continue
            rest.append(memoryview(p)[sent:])
            sent = 0
        while rest:
            sent = sock.sendmsg(rest, (), flags)
            while rest and sent >= len(rest[0]):
                sent -= len(rest[0])
                rest.pop(0)
            if rest and sent:
                rest[0] = rest[0][sent:]

    def send_ctrl(self, obj: dict) -> None:
        """Queue a control message; never blocks (safe from the daemon's main thread)."""
        if not self.closed:
            self._ctrl.append(msgpack.packb(obj))
            self._wake.set()

    def send_ctrl_now(self, obj: dict) -> None:
        """Send a control message from the calling thread (not the daemon's main thread: it
        blocks like ``send``, raises TransportClosed), ahead of those still queued."""
        self._send_ctrl_payload(msgpack.packb(obj))

    def _send_ctrl_payload(self, payload: bytes) -> None:
        self.send([HDR.pack(K_CTRL, 0, len(payload), 0, 0, 0), payload])
        self.stats["control_sent"] += 1

    def send_credit(self, mirror_id: int, consumed: int, tail: int) -> None:
        """Replica side: report what mirror ``mirror_id``'s replica consumed and holds (the
        source's ``Transport.credited``); blocks like ``send``, raises TransportClosed."""
        self.send([HDR.pack(K_CREDIT, mirror_id, consumed, tail, 0, 0)])

    def try_send_credit(self, mirror_id: int, consumed: int, tail: int) -> bool:
        """``send_credit`` from a thread that must never block on this socket: the link's
        reader, which lands a replica's commit and finds a credit due (a reader blocked on its
        own send, while the peer's reader is blocked the same way, would stall both links until
        the timeout).  True when sent; False when the link is busy (another thread holds its
        lock), its send buffer is full, or it is TLS: the credit thread sends it instead."""
        if self.closed or self.tls or not self.lock.acquire(blocking=False):
            return False
        try:
            msg = HDR.pack(K_CREDIT, mirror_id, consumed, tail, 0, 0)
            sent = self.sock.send(msg, socket.MSG_DONTWAIT)
            if sent < len(msg):   # 40 bytes partly queued: the rest must follow, blocking
                self.sock.sendall(memoryview(msg)[sent:])
            self.stats["bytes_sent"] += len(msg)
            return True
        except BlockingIOError:
            return False
        except OSError:
            self.close()
            return False
        finally:
            self.lock.release()

    def _run_writer(self) -> None:
        ping = HDR.pack(K_PING, 0, 0, 0, 0, 0)
        try:
            while not self.closed:
                self._wake.wait(self.keepalive)
                self._wake.clear()
                if self.closed:
                    return
                if not self._ctrl:
                    self.send([ping])
                while self._ctrl:
                    self._send_ctrl_payload(self._ctrl.popleft())
        except TransportClosed:
            pass

    # -- receiving -----------------------------------------------------------------------------
    def _fill(self, need: int) -> int:
        """Until at least ``need`` (<= READ_AHEAD) unread bytes are in the read-ahead buffer;
        return where they start.  Each recv takes whatever has arrived, up to the buffer's end."""
        r0, r1 = self._r0, self._r1
        if r1 - r0 >= need:
            return r0
        rv = self._rview
        if r0 + need > READ_AHEAD:   # move the unread bytes to the front
            rv[:r1 - r0] = rv[r0:r1]
            r0, r1 = 0, r1 - r0
        elif r0 == r1:
            r0 = r1 = 0
        sock = self.sock
        got = r1
        while r1 - r0 < need:
            k = sock.recv_into(rv[r1:], 0, 0)
            if k == 0:
                raise TransportClosed(f"{self.remote} closed the link")
            r1 += k
        self.stats["bytes_received"] += r1 - got
        self._r0, self._r1 = r0, r1
        return r0

    def _take_into(self, view: memoryview) -> None:
        """Fill ``view`` with the next bytes of the stream: what the read-ahead buffer holds
        first, the rest straight from the socket."""
        r0 = self._r0
        k = self._r1 - r0
        if k:
            n = len(view)
            if k >= n:
                view[:] = self._rview[r0:r0 + n]
                self._r0 = r0 + n
                return
            view[:k] = self._rview[r0:r0 + k]
            self._r0 = self._r1
            view = view[k:]
        self._recv_into(view)

    def _recv_into(self, view: memoryview) -> None:
        """Straight from the socket (the read-ahead buffer must be empty)."""
        sock = self.sock
        n = len(view)
        got = 0
        flags = self._recv_flags
        while got < n:
            k = sock.recv_into(view[got:] if got else view, 0, flags)
            if k == 0:
                raise TransportClosed(f"{self.remote} closed the link")
            got += k
        self.stats["bytes_received"] += n

    def _discard(self, n: int) -> None:
        scratch = memoryview(bytearray(min(n, DISCARD_CHUNK)))
        while n:
            k = min(n, len(scratch))
            self._take_into(scratch[:k])
            n -= k

    def run_reader(self, on_ctrl: Callable[["Link", dict], None], max_put: int) -> None:
        """Read until the link dies.  Raises LinkError on a protocol violation, TransportClosed
        (or OSError) when the connection ends."""
        unpack = HDR.unpack_from
        hsize = HDR.size
        rbuf = self._rbuf
        fill = self._fill
        take_into = self._take_into
        sinks = self.sinks
        stats = self.stats
        try:
            while True:
                at = fill(hsize)
                kind, mid, a, b, c, d = unpack(rbuf, at)
                self._r0 = at + hsize
                if kind == K_PUT:
                    n = b - a
                    if n <= 0 or n > max_put:
                        raise LinkError("size", f"put of {n} bytes (limit "
                                                f"peer_max_replica_capacity={max_put})")
                    sink = sinks.get(mid)
                    if sink is None:
                        self._discard(n)   # a mirror we already stopped: drain its bytes
                        continue
                    r0 = sink.land(rbuf, self._r0, self._r1, mid, a, b, c)
                    if r0 >= 0:   # the whole batch and its COMMIT were buffered: landed in C
                        self._r0 = r0
                        stats["batches_received"] += 1
                        continue
                    for view in sink.put_target(a, b, c):
                        take_into(view)
                    stats["batches_received"] += 1
                elif kind == K_COMMIT:
                    sink = sinks.get(mid)
                    if sink is not None:
                        sink.commit(a, b, c)
                elif kind == K_CREDIT:
                    transport = self.transports.get(mid)
                    if transport is not None:
                        transport.credited(a, b)
                elif kind == K_JUMP:
                    sink = sinks.get(mid)
                    if sink is not None:
                        sink.jump(a, b)
                elif kind == K_CTRL:
                    if a > self.max_control:
                        raise LinkError("size", f"control message of {a} bytes exceeds "
                                                f"peer_max_control_bytes={self.max_control}")
                    payload = bytearray(a)
                    take_into(memoryview(payload))
                    try:
                        obj = msgpack.unpackb(payload, raw=False, strict_map_key=True)
                    except Exception as exc:
                        raise LinkError("protocol", f"control message is not msgpack: "
                                                    f"{type(exc).__name__}") from None
                    if not isinstance(obj, dict) or not isinstance(obj.get("t"), str):
                        raise LinkError("protocol", "control message is not a map with 't'")
                    stats["control_received"] += 1
                    on_ctrl(self, obj)
                elif kind != K_PING:
                    raise LinkError("protocol", f"unknown message kind {kind}")
        finally:
            self.close()

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._wake.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass

    def describe(self) -> dict:
        return {"node": self.remote, "addr": self.addr, "dialed": self.dialed, "tls": self.tls,
                "up_s": round(time.time() - self.up_since, 3), **self.stats}


class TcpTransport(Transport):
    """Source end of one mirror over a :class:`Link`."""

    kind = "tcp"

    def __init__(self, link: Link, mirror_id: int):
        self.link = link
        self.mid = mirror_id
        self._closed = False
        link.transports[mirror_id] = self

    def _check(self) -> None:
        if self._closed:
            raise TransportClosed("transport closed")

    def put(self, start: int, views, guard: int) -> None:
        self._check()
        total = 0
        for v in views:
            total += len(v)
        self.link.send([HDR.pack(K_PUT, self.mid, start, start + total, guard, 0), *views],
                       more=True)
        self.link.stats["batches_sent"] += 1

    def put_commit(self, start: int, views, guard: int, tail: int, last: int) -> None:
        """``put`` then ``commit(tail, last)`` in one ``sendmsg``."""
        self._check()
        total = 0
        for v in views:
            total += len(v)
        self.link.send([HDR.pack(K_PUT, self.mid, start, start + total, guard, 0), *views,
                        HDR.pack(K_COMMIT, self.mid, tail, last, 0, 0)])
        self.link.stats["batches_sent"] += 1

    def commit(self, tail: int, last: int, pad_until: int = 0) -> None:
        self._check()
        self.link.send([HDR.pack(K_COMMIT, self.mid, tail, last, pad_until, 0)])

    def jump(self, position: int, seq: int) -> None:
        self._check()
        self.link.send([HDR.pack(K_JUMP, self.mid, position, seq, 0, 0)])

    def relay_link(self) -> tuple[Link, int] | None:
        return None if self.link.tls else (self.link, self.mid)

    def close(self) -> None:
        self._closed = True
        self.link.transports.pop(self.mid, None)
