"""Transports under test, behind one small interface used by every suite.

A *link* is one process's end of a connection between two benchmark workers:

- ``send(data)``: send one message (any bytes-like object).
- ``recv()``: the next message as a bytes-like object (blocking, bounded by RECV_TIMEOUT).
  What it returns and what it costs is part of what each transport is measured on:
  shimmy's copy path returns ``bytes(msg)``, its zero-copy path ``msg.data`` (a view into the
  ring, no copy); ZeroMQ returns the ``bytes`` pyzmq gives; raw TCP returns a view of its own
  receive buffer (one copy, out of the kernel); iceoryx2 returns ``ctypes.string_at`` of the
  sample (one copy out of shared memory).
- ``address``: what a connecting side needs (sockets); ``connect(address)``, ``accept()``.

Kinds: ``pair`` (both sides send and receive: ping-pong), ``pipe`` (``tx`` sends, ``rx``
receives: one-way throughput) and ``fanout`` (one ``tx``, many ``rx``; shimmy channel or ZeroMQ
PUB/SUB).  Links are cached in the worker's state, so repetitions reuse open sockets/channels.

Transport names: ``shimmy`` (options: spin_us, capacity, zero_copy), ``zmq-ipc``, ``zmq-tcp``,
``tcp`` (raw socket on 127.0.0.1, 4-byte length prefix) and ``iceoryx2`` (busy polling).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import struct
import tempfile
import time

RECV_TIMEOUT = 10.0  # seconds; a benchmark never waits forever for a message

_LEN = struct.Struct("<I")


def iceoryx2_status() -> tuple[bool, str]:
    """(available, version or the reason it is not)."""
    try:
        import iceoryx2  # noqa: F401
    except Exception as exc:  # ImportError, or a broken binary wheel
        return False, f"iceoryx2 not importable ({type(exc).__name__}: {exc}); pip install iceoryx2"
    try:
        from importlib.metadata import version
        return True, version("iceoryx2")
    except Exception:
        return True, "unknown"


# -- shimmy ---------------------------------------------------------------------------------------

class ShimmyLink:
    def __init__(self, kind: str, side: str, name: str, daemon: str, capacity: int | None = None,
                 spin_us: int | None = None, zero_copy: bool = False, mode: str = "reliable"):
        import shimmy
        opts = dict(daemon=daemon, mode=mode, capacity=capacity, spin_us=spin_us)
        if kind == "pair":
            tx, rx = (name + "/a2b", name + "/b2a") if side == "a" else (name + "/b2a", name + "/a2b")
        elif side == "tx":
            tx, rx = name, None
        else:
            tx, rx = None, name
        self.address = None
        self.zero_copy = zero_copy
        self._rx_ch = shimmy.Channel(rx, **opts) if rx else None
        self.sub = self._rx_ch.subscribe(start="next") if rx else None
        self.tx_ch = shimmy.Channel(tx, **opts) if tx else None
        if self.tx_ch is not None:
            self.tx_ch.publish(b"")  # take the publisher role now, not inside the timed loop
        if self.sub is not None:
            self.sub.receive_nowait()  # that empty message, if this side also subscribes to it
        self.last = None

    def connect(self, address) -> None:
        pass

    def accept(self) -> None:
        pass

    def send(self, data) -> None:
        if self.zero_copy:
            with self.tx_ch.loan(len(data)) as buf:
                buf[:] = data
        else:
            self.tx_ch.publish(data)

    def recv(self):
        if not self.zero_copy:  # copy path: bytes straight out of the ring, no Message object
            data = self.sub.receive_bytes(RECV_TIMEOUT)
            while not data:  # the publisher-role probe of another process
                data = self.sub.receive_bytes(RECV_TIMEOUT)
            return data
        msg = self.sub.receive(RECV_TIMEOUT)
        while not msg.data:
            msg = self.sub.receive(RECV_TIMEOUT)
        self.last = msg
        return msg.data

    def close(self) -> None:
        for obj in (self.sub, self._rx_ch, self.tx_ch):
            if obj is not None:
                try:
                    obj.close()
                except Exception:
                    pass


# -- ZeroMQ ---------------------------------------------------------------------------------------

_ZMQ_TYPES = {("pair", "a"): "PAIR", ("pair", "b"): "PAIR", ("pipe", "tx"): "PUSH",
              ("pipe", "rx"): "PULL", ("fanout", "tx"): "PUB", ("fanout", "rx"): "SUB"}
# Which side binds: the echo server, the receiver of a pipe, the publisher of a fan-out.
_BINDS = {("pair", "b"), ("pipe", "rx"), ("fanout", "tx")}


class ZmqLink:
    def __init__(self, kind: str, side: str, name: str, proto: str, **_):
        import zmq
        self._zmq = zmq
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(getattr(zmq, _ZMQ_TYPES[(kind, side)]))
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, int(RECV_TIMEOUT * 1000))
        if (kind, side) == ("fanout", "rx"):
            self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.address = None
        self._connected: set = set()
        if (kind, side) in _BINDS:
            if proto == "ipc":
                self._dir = tempfile.mkdtemp(prefix="shimmy-bench-zmq-")
                self.address = f"ipc://{self._dir}/{name.replace('/', '_')}"
                self.sock.bind(self.address)
            else:
                port = self.sock.bind_to_random_port("tcp://127.0.0.1")
                self.address = f"tcp://127.0.0.1:{port}"

    def connect(self, address) -> None:
        # Once only: a second connect to the same endpoint adds a second pipe, and PUSH/PAIR
        # would round-robin over both (messages overtaking each other).
        if address and address not in self._connected:
            self.sock.connect(address)
            self._connected.add(address)

    def accept(self) -> None:
        pass

    def send(self, data) -> None:
        self.sock.send(data)

    def recv(self):
        return self.sock.recv()

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()
        if getattr(self, "_dir", None):
            shutil.rmtree(self._dir, ignore_errors=True)


# -- raw TCP --------------------------------------------------------------------------------------

class TcpLink:
    """Length-prefixed frames on one TCP connection (127.0.0.1, TCP_NODELAY), scatter-gather
    sends (header + payload in one sendmsg) and a buffered receiver that parses many small frames
    out of one recv_into."""

    BUF = 1 << 21

    def __init__(self, kind: str, side: str, name: str, **_):
        self.sock = None
        self.address = None
        self._listener = None
        if (kind, side) in _BINDS:
            self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._listener.bind(("127.0.0.1", 0))
            self._listener.listen(4)
            self.address = self._listener.getsockname()
        self._buf = bytearray(self.BUF)
        self._view = memoryview(self._buf)
        self._start = self._end = 0

    def _setup(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(RECV_TIMEOUT)
        self.sock = sock

    def connect(self, address) -> None:
        if address and self.sock is None:
            self._setup(socket.create_connection(tuple(address), timeout=RECV_TIMEOUT))

    def accept(self) -> None:
        if self.sock is None and self._listener is not None:
            self._listener.settimeout(RECV_TIMEOUT)
            conn, _ = self._listener.accept()
            self._setup(conn)

    def send(self, data) -> None:
        n = len(data)
        sent = self.sock.sendmsg([_LEN.pack(n), data])
        if sent < n + 4:  # rare for small frames; finish the rest
            rest = (_LEN.pack(n) + bytes(data))[sent:] if sent < 4 else memoryview(data)[sent - 4:]
            self.sock.sendall(rest)

    def _fill(self, need: int) -> None:
        """Make at least ``need`` bytes available from _start."""
        if need > self.BUF:
            self._grow(need)
        if self._start + need > len(self._buf):
            n = self._end - self._start
            self._view[:n] = self._view[self._start:self._end]
            self._start, self._end = 0, n
        while self._end - self._start < need:
            got = self.sock.recv_into(self._view[self._end:])
            if not got:
                raise ConnectionError("peer closed")
            self._end += got

    def _grow(self, need: int) -> None:
        size = 1 << (need - 1).bit_length()
        new = bytearray(size)
        n = self._end - self._start
        new[:n] = self._view[self._start:self._end]
        self._view.release()
        self._buf, self._start, self._end = new, 0, n
        self._view = memoryview(self._buf)
        self.BUF = size

    def recv(self):
        if self._end - self._start < 4:
            self._fill(4)
        (n,) = _LEN.unpack_from(self._buf, self._start)
        if self._end - self._start < 4 + n:
            self._fill(4 + n)
        s = self._start + 4
        self._start = s + n
        return self._view[s:s + n]

    def close(self) -> None:
        for s in (self.sock, self._listener):
            if s is not None:
                s.close()


# -- iceoryx2 -------------------------------------------------------------------------------------

class IceoryxLink:
    """iceoryx2 publish-subscribe over ``Slice[c_uint8]`` with busy-polling receive (its fastest
    mode from Python: no event/listener, the subscriber spins on ``receive()``)."""

    def __init__(self, kind: str, side: str, name: str, max_size: int = 1 << 20, **_):
        import iceoryx2 as iox2
        try:
            iox2.set_log_level(iox2.LogLevel.Error)
        except Exception:
            pass
        self.node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
        # iceoryx2 service names are machine-wide: make them unique to this bench run, so that
        # a run killed before cleanup (stale publisher ports) cannot block the next one.
        name = f"{name}_{os.environ.get('SHIMMY_BENCH_RUN', os.getppid())}"
        if kind == "pair":
            tx, rx = (name + "_a2b", name + "_b2a") if side == "a" else (name + "_b2a", name + "_a2b")
        elif side == "tx":
            tx, rx = name, None
        else:
            tx, rx = None, name
        self.address = None
        self._svcs = []

        def service(n):
            svc = (self.node.service_builder(iox2.ServiceName.new(n))
                   .publish_subscribe(iox2.Slice[ctypes.c_uint8])
                   .max_publishers(1).max_subscribers(8).history_size(0)
                   .subscriber_max_buffer_size(8).enable_safe_overflow(False)
                   .open_or_create())
            self._svcs.append(svc)
            return svc

        self.sub = service(rx).subscriber_builder().create() if rx else None
        self.pub = (service(tx).publisher_builder().initial_max_slice_len(max_size).create()
                    if tx else None)

    def connect(self, address) -> None:
        pass

    def accept(self) -> None:
        pass

    def send(self, data) -> None:
        n = len(data)
        if not isinstance(data, bytes):
            data = bytes(data)
        s = self.pub.loan_slice_uninit(n)
        ctypes.memmove(s.payload_ptr, data, n)
        s.assume_init().send()

    def recv(self):
        receive = self.sub.receive
        s = receive()
        if s is None:
            deadline = time.perf_counter() + RECV_TIMEOUT
            i = 0
            while s is None:
                s = receive()
                i += 1
                if not i & 0xFFF and time.perf_counter() > deadline:
                    raise TimeoutError("iceoryx2: no sample within RECV_TIMEOUT")
        return ctypes.string_at(s.payload_ptr, s.header.number_of_elements)

    def close(self) -> None:
        for obj in (self.sub, self.pub):
            if obj is not None:
                try:
                    obj.delete()
                except Exception:
                    pass
        self._svcs.clear()
        self.node = None


def open_link(ctl, transport: str, kind: str, side: str, name: str, **opts):
    """The cached link for (transport, kind, side, name) in this worker, opened on first use."""
    key = ("link", transport, kind, side, name, tuple(sorted(opts.items())))
    link = ctl.state.get(key)
    if link is None:
        if transport == "shimmy":
            link = ShimmyLink(kind, side, name, **opts)
        elif transport in ("zmq-ipc", "zmq-tcp"):
            link = ZmqLink(kind, side, name, transport.split("-")[1], **opts)
        elif transport == "tcp":
            link = TcpLink(kind, side, name, **opts)
        elif transport == "iceoryx2":
            link = IceoryxLink(kind, side, name, **opts)
        else:
            raise ValueError(f"unknown transport {transport!r}")
        ctl.state[key] = link
        ctl.state.setdefault("_closers", []).append(link.close)
    return link


def payload(size: int) -> bytes:
    """Message body used everywhere (never 1 or 2 bytes long: those are control markers)."""
    return os.urandom(16) * (size // 16) + os.urandom(size % 16)


END = b"E"       # one-byte end marker: the sender is done
WARM = b"WW"     # two-byte warm-up marker (fan-out slow-joiner handshake)
