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
``tcp`` (raw socket on 127.0.0.1, 4-byte length prefix), ``unix`` (the same framing on a unix
stream socket), ``pipe`` (the same framing on kernel pipes: FIFOs, as os.pipe() between unrelated
processes), ``udp`` (one datagram per message on 127.0.0.1; lossy, at most 65,507 bytes),
``redis`` (Redis pub/sub through a local redis-server, see :func:`redis_address`) and
``iceoryx2`` (busy polling).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import struct
import tempfile
import time
from typing import Any

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


def _directions(kind: str, side: str, name: str, sep: str) -> tuple[str | None, str | None]:
    """(name sent on, name received on) for one side: a pair uses one name per direction."""
    if kind == "pair":
        a2b, b2a = f"{name}{sep}a2b", f"{name}{sep}b2a"
        return (a2b, b2a) if side == "a" else (b2a, a2b)
    return (name, None) if side == "tx" else (None, name)


# -- shimmy ---------------------------------------------------------------------------------------

class ShimmyLink:
    def __init__(self, kind: str, side: str, name: str, daemon: str, capacity: int | None = None,
                 spin_us: int | None = None, zero_copy: bool = False, mode: str = "reliable",
                 rewind: bool = False):
        import shimmy
        opts = dict(daemon=daemon, mode=mode, capacity=capacity, spin_us=spin_us, rewind=rewind)
        tx, rx = _directions(kind, side, name, "/")
        self.address = None
        self.zero_copy = zero_copy
        self._rx_ch: Any = None
        self.sub: Any = None
        if rx:
            self._rx_ch = shimmy.Channel(rx, **opts)
            self.sub = self._rx_ch.subscribe(start="next")
        self.tx_ch: Any = shimmy.Channel(tx, **opts) if tx else None
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


# -- byte-stream transports: raw TCP, unix socket, pipe ---------------------------------------

class _FramedLink:
    """Length-prefixed frames (4-byte length, then the payload) over a byte stream, with a
    buffered receiver that parses many small frames out of one read.  Subclasses provide
    ``_read_into(view) -> int`` and ``send``."""

    BUF = 1 << 21

    def __init__(self) -> None:
        self._buf = bytearray(self.BUF)
        self._view = memoryview(self._buf)
        self._start = self._end = 0

    def _read_into(self, view: memoryview) -> int:
        raise NotImplementedError

    def _fill(self, need: int) -> None:
        """Make at least ``need`` bytes available from _start."""
        if need > self.BUF:
            self._grow(need)
        if self._start + need > len(self._buf):
            n = self._end - self._start
            self._view[:n] = self._view[self._start:self._end]
            self._start, self._end = 0, n
        while self._end - self._start < need:
            got = self._read_into(self._view[self._end:])
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


class TcpLink(_FramedLink):
    """Frames on one TCP connection (127.0.0.1, TCP_NODELAY); scatter-gather sends (header +
    payload in one sendmsg)."""

    FAMILY = socket.AF_INET

    def __init__(self, kind: str, side: str, name: str, **_):
        super().__init__()
        self.sock: Any = None
        self.address = None
        self._listener = None
        self._dir = None
        if (kind, side) in _BINDS:
            self._listener = socket.socket(self.FAMILY, socket.SOCK_STREAM)
            if self.FAMILY == socket.AF_UNIX:
                self._dir = tempfile.mkdtemp(prefix="shimmy-bench-unix-")
                self._listener.bind(os.path.join(self._dir, "s"))
            else:
                self._listener.bind(("127.0.0.1", 0))
            self._listener.listen(4)
            self.address = self._listener.getsockname()

    def _setup(self, sock: socket.socket) -> None:
        if self.FAMILY == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(RECV_TIMEOUT)
        self.sock = sock

    def connect(self, address) -> None:
        if address and self.sock is None:
            sock = socket.socket(self.FAMILY, socket.SOCK_STREAM)
            sock.settimeout(RECV_TIMEOUT)
            sock.connect(address if self.FAMILY == socket.AF_UNIX else tuple(address))
            self._setup(sock)

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

    def _read_into(self, view: memoryview) -> int:
        return self.sock.recv_into(view)

    def close(self) -> None:
        for s in (self.sock, self._listener):
            if s is not None:
                s.close()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)


class UnixLink(TcpLink):
    """The same frames on a unix domain stream socket."""

    FAMILY = socket.AF_UNIX


class PipeLink(_FramedLink):
    """The same frames on kernel pipes.  Benchmark workers are unrelated processes, so the pipes
    are FIFOs (what os.pipe() gives a parent and its child, reachable by path).  The binding side
    opens its FIFOs read-write, which never blocks, so the other side's opens return at once."""

    def __init__(self, kind: str, side: str, name: str, **_):
        super().__init__()
        self.address = None
        self._dir = None
        self._rfd = self._wfd = -1
        self._kind, self._side = kind, side
        if (kind, side) in _BINDS:
            self._dir = tempfile.mkdtemp(prefix="shimmy-bench-pipe-")
            self.address = self._dir
            for fifo in ("a2b", "b2a") if kind == "pair" else ("a2b",):
                os.mkfifo(os.path.join(self._dir, fifo), 0o600)
            self._open(self._dir, os.O_RDWR, os.O_RDWR)

    def _open(self, path: str, rflags: int, wflags: int) -> None:
        # a (client/sender) writes a2b and reads b2a; b (server/receiver) the other way round.
        writer = self._side in ("a", "tx")
        if self._kind == "pair" or not writer:
            self._rfd = os.open(os.path.join(path, "b2a" if writer else "a2b"), rflags)
        if self._kind == "pair" or writer:
            self._wfd = os.open(os.path.join(path, "a2b" if writer else "b2a"), wflags)

    def connect(self, address) -> None:
        if address and self._rfd < 0 and self._wfd < 0:
            self._open(address, os.O_RDONLY, os.O_WRONLY)

    def accept(self) -> None:
        pass

    def send(self, data) -> None:
        parts: list[Any] = [_LEN.pack(len(data)), memoryview(data).cast("B")]
        total = 4 + len(parts[1])
        done = os.writev(self._wfd, parts)
        while done < total:  # a pipe takes up to its buffer (64 KiB) per call
            rest = (b"".join(bytes(p) for p in parts))[done:] if done < 4 else parts[1][done - 4:]
            done += os.write(self._wfd, rest[:1 << 20])

    def _read_into(self, view: memoryview) -> int:
        return os.readv(self._rfd, [view])

    def close(self) -> None:
        for fd in (self._rfd, self._wfd):
            if fd >= 0:
                os.close(fd)
        self._rfd = self._wfd = -1
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)


# -- UDP ------------------------------------------------------------------------------------------

UDP_MAX = 65507  # largest UDP payload over IPv4


class UdpLink:
    """One datagram per message on 127.0.0.1.  UDP drops datagrams when the receiver's socket
    buffer is full, so in one-way runs the receiver counts what arrived (loss is reported), the
    sender repeats the end marker, and a receiver that hears nothing for END_SILENCE seconds
    treats the sender as done."""

    END_SILENCE = 1.0

    def __init__(self, kind: str, side: str, name: str, **_):
        self.kind, self.side = kind, side
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        self.address = self.sock.getsockname() if (kind, side) in _BINDS else None
        self._peer: Any = None
        self._buf = bytearray(UDP_MAX + 1)
        self._view = memoryview(self._buf)
        self._lossy_rx = (kind, side) == ("pipe", "rx")
        self.sock.settimeout(self.END_SILENCE if self._lossy_rx else RECV_TIMEOUT)

    def connect(self, address) -> None:
        if address:
            self._peer = tuple(address)
            self.sock.connect(self._peer)

    def accept(self) -> None:
        if self._lossy_rx:   # leftovers of the previous repetition (repeated end markers)
            self.sock.setblocking(False)
            try:
                while True:
                    self.sock.recv_into(self._view)
            except BlockingIOError:
                pass
            self.sock.settimeout(self.END_SILENCE)

    def send(self, data) -> None:
        if self._peer is None:
            raise RuntimeError("udp: nobody to send to yet")
        self.sock.send(data)
        if self.kind == "pipe" and len(data) == 1:   # the end marker: make it through
            for _ in range(4):
                time.sleep(0.002)
                self.sock.send(data)

    def recv(self):
        try:
            n, addr = self.sock.recvfrom_into(self._view)
        except socket.timeout:
            if self._lossy_rx:
                return END
            raise
        if self._peer is None:   # the echo server answers whoever spoke first
            self._peer = addr
            self.sock.connect(addr)
        return self._view[:n]

    def close(self) -> None:
        self.sock.close()


# -- Redis pub/sub --------------------------------------------------------------------------------

def redis_address() -> tuple[str, int] | None:
    """The redis-server this benchmark run started (``SHIMMY_BENCH_REDIS=host:port``), if any."""
    text = os.environ.get("SHIMMY_BENCH_REDIS")
    if not text:
        return None
    host, port = text.rsplit(":", 1)
    return host, int(port)


class RedisLink:
    """Redis pub/sub with redis-py: ``PUBLISH`` per message (a request-reply to the server),
    subscribers read pushed messages.  The server runs with no output-buffer limit for pub/sub
    clients (so a slow subscriber is not disconnected mid-run) and no persistence."""

    def __init__(self, kind: str, side: str, name: str, **_):
        import redis
        addr = redis_address()
        if addr is None:
            raise RuntimeError("no redis-server for this run (SHIMMY_BENCH_REDIS unset)")
        self.r = redis.Redis(host=addr[0], port=addr[1], socket_timeout=RECV_TIMEOUT)
        run = os.environ.get("SHIMMY_BENCH_RUN", "")
        name = f"{run}:{name}"
        tx, rx = _directions(kind, side, name, "/")
        self.address = None
        self._tx: Any = tx
        self.ps: Any = None
        if rx:
            self.ps = self.r.pubsub(ignore_subscribe_messages=True)
            self.ps.subscribe(rx)
            deadline = time.monotonic() + RECV_TIMEOUT
            while self.r.pubsub_numsub(rx)[0][1] < 1:   # subscribed before we say ready
                if time.monotonic() > deadline:
                    raise TimeoutError("redis: subscription not confirmed")
                self.ps.get_message(timeout=0.01)

    def connect(self, address) -> None:
        pass

    def accept(self) -> None:
        pass

    def send(self, data) -> None:
        self.r.publish(self._tx, bytes(data) if not isinstance(data, bytes) else data)

    def recv(self):
        get = self.ps.get_message
        deadline = time.monotonic() + RECV_TIMEOUT
        while True:
            m = get(timeout=RECV_TIMEOUT)
            if m is not None and m["type"] == "message":
                return m["data"]
            if time.monotonic() > deadline:
                raise TimeoutError("redis: no message within RECV_TIMEOUT")

    def close(self) -> None:
        if self.ps is not None:
            self.ps.close()
        self.r.close()


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
        tx, rx = _directions(kind, side, name, "_")
        self.address = None
        self._svcs: list = []

        def service(n):
            svc = (self.node.service_builder(iox2.ServiceName.new(n))
                   .publish_subscribe(iox2.Slice[ctypes.c_uint8])
                   .max_publishers(1).max_subscribers(8).history_size(0)
                   .subscriber_max_buffer_size(8).enable_safe_overflow(False)
                   .open_or_create())
            self._svcs.append(svc)
            return svc

        self.sub: Any = service(rx).subscriber_builder().create() if rx else None
        # Block (retry) when a subscriber's buffer is full, like shimmy's reliable mode: the
        # one-way runs check that every message arrived.
        self.pub: Any = (service(tx).publisher_builder().initial_max_slice_len(max_size)
                    .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
                    .create() if tx else None)

    def connect(self, address) -> None:
        self._connect()

    def accept(self) -> None:
        self._connect()

    def _connect(self) -> None:
        # Both ends exist by now (the other side said ready): let the publisher see the
        # subscriber before the first send, or that send reaches nobody.
        if self.pub is not None:
            self.pub.update_connections()

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


_LINKS = {"shimmy": ShimmyLink, "tcp": TcpLink, "unix": UnixLink, "pipe": PipeLink,
          "udp": UdpLink, "redis": RedisLink, "iceoryx2": IceoryxLink}   # ZeroMQ: its own call


def open_link(ctl, transport: str, kind: str, side: str, name: str, **opts):
    """The cached link for (transport, kind, side, name) in this worker, opened on first use."""
    key = ("link", transport, kind, side, name, tuple(sorted(opts.items())))
    link = ctl.state.get(key)
    if link is None:
        if transport in ("zmq-ipc", "zmq-tcp"):
            link = ZmqLink(kind, side, name, transport.split("-")[1], **opts)
        elif transport in _LINKS:
            link = _LINKS[transport](kind, side, name, **opts)
        else:
            raise ValueError(f"unknown transport {transport!r}")
        ctl.state[key] = link
        ctl.state.setdefault("_closers", []).append(link.close)
    return link


def accepted_link(ctl, transport: str, kind: str, side: str, name: str, opts: dict):
    """The listening side of a two-worker suite: open the link, tell the parent its address,
    wait for the other side."""
    link = open_link(ctl, transport, kind, side, name, **opts)
    ctl.ready(link.address)
    link.accept()
    return link


def connected_link(ctl, transport: str, kind: str, side: str, name: str, opts: dict, address):
    """The dialling side of a two-worker suite: open the link, connect to ``address``, then
    tell the parent it is ready."""
    link = open_link(ctl, transport, kind, side, name, **opts)
    link.connect(address)
    ctl.ready()
    return link


def payload(size: int) -> bytes:
    """Message body used everywhere (never 1 or 2 bytes long: those are control markers)."""
    return os.urandom(16) * (size // 16) + os.urandom(size % 16)


END = b"E"       # one-byte end marker: the sender is done
WARM = b"WW"     # two-byte warm-up marker (fan-out slow-joiner handshake)
