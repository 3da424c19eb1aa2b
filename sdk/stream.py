"""Byte streams: ``Stream``, ``StreamWriter``, ``StreamReader``.

A stream is an ordered, flow-controlled byte pipe between one writer and one reader on this node,
through a shared-memory ring (layout and memory ordering: ``shimmy/stream_ring.py``).  The daemon
is asked once per end (``stream_open``); every byte after that goes straight through the mapping.

    with shimmy.Stream("video/cam0").writer() as w:      # process A
        w.write(frame)                                   # blocks while the ring is full
    with shimmy.Stream("video/cam0").reader() as r:      # process B
        while chunk := r.read(1 << 16):                  # b"" at end of stream
            ...

Both ends are ``io.RawIOBase`` objects, so ``io.BufferedReader``, ``shutil.copyfileobj``,
``readline`` and ``with`` work.  Timeouts: every blocking call takes ``timeout=`` (seconds; None
waits forever, re-checking liveness every 0.25 s); the end's ``timeout`` attribute (set with
``writer(timeout=...)``) is the default for the plain ``io`` methods.

An end must never write the other end's words of the ring (spec/stream.md), and never work in
a forked child: the child opens its own ends.
"""

from __future__ import annotations

import io
import mmap
import time
from typing import Any

from shimmy import stream_ring
from shimmy.errors import BackpressureTimeout, InvalidArgument, StreamClosed
from shimmy.names import validate_name
from shimmy.ring import fence

from . import aio
from . import client as _client_mod
from .client import fork_generation, get_client

_DEFAULT = object()


def _check_timeout(timeout) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
        raise InvalidArgument(f"timeout must be None or a non-negative number of seconds, "
                              f"got {timeout!r}")
    return float(timeout)


def _check_size(what: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InvalidArgument(f"{what} must be a non-negative int, got {n!r}")
    return n


class Stream:
    """A named byte stream on this node; ``writer()`` and ``reader()`` open its two ends.

    ``capacity`` (bytes, a power of two, 4 KiB..1 GiB) is fixed by whichever end creates the
    stream; None accepts the existing stream's capacity (default 2 MiB for a new one).
    """

    def __init__(self, name: str, *, daemon: str | None = None, capacity: int | None = None,
                 spin_us: int | None = None):
        self.name = validate_name(name)
        if capacity is not None:
            stream_ring.check_capacity(capacity)
        if spin_us is not None and (isinstance(spin_us, bool) or not isinstance(spin_us, int)
                                    or spin_us < 0):
            raise InvalidArgument(f"spin_us must be a non-negative int, got {spin_us!r}")
        self.daemon = daemon
        self.capacity = capacity
        self.spin_us = stream_ring.DEFAULT_SPIN_US if spin_us is None else spin_us

    def writer(self, *, timeout: float | None = None) -> "StreamWriter":
        """Open the writing end (StreamBusy if another process holds it)."""
        return StreamWriter(self, timeout)

    def reader(self, *, timeout: float | None = None) -> "StreamReader":
        """Open the reading end (StreamBusy if another process holds it)."""
        return StreamReader(self, timeout)

    def __repr__(self) -> str:
        return f"<shimmy.Stream {self.name!r}>"


class _StreamEnd(io.RawIOBase):
    role = ""
    # stream_ring.WriterCursor / ReaderCursor (per subclass) once open; None once closed.
    _cursor: Any

    def __init__(self, stream: Stream, timeout: float | None):
        super().__init__()
        self._cursor = None  # set by the subclass once the mapping is up
        self.timeout = _check_timeout(timeout)
        self.name = stream.name
        self._fork_gen = fork_generation()
        self._client = get_client(stream.daemon)
        reply = self._client.request("stream_open", name=stream.name, role=self.role,
                                     capacity=stream.capacity)
        self.capacity = reply["capacity"]
        self._serial = reply["serial"]
        try:
            shm = _client_mod.open_shared_memory(reply["shm"])
            try:
                self._mm = mmap.mmap(shm.fd, shm.size)
            finally:
                shm.close_fd()
            self._view = stream_ring.StreamView(self._mm)
            self._sem_r = _client_mod.open_semaphore(reply["sem_reader"])
            self._sem_w = _client_mod.open_semaphore(reply["sem_writer"])
        except BaseException:
            self._tell_daemon_closed()
            raise
        self._sem_names = (reply["sem_reader"], reply["sem_writer"])

    # -- shared plumbing --------------------------------------------------------------------------
    def _check(self) -> None:
        if self.closed:
            raise StreamClosed(f"stream {self.name!r}: this {self.role} is closed")
        if self._fork_gen != fork_generation():
            raise StreamClosed(f"stream {self.name!r}: this {self.role} was opened before fork(); "
                               f"open it again in this process")

    def _timeout(self, timeout):
        return self.timeout if timeout is _DEFAULT else _check_timeout(timeout)

    def _tell_daemon_closed(self) -> None:
        if self._fork_gen == fork_generation() and not self._client.closed:
            try:
                self._client.request("stream_close", name=self.name, role=self.role,
                                     serial=self._serial)
            except Exception:  # ShimmyError, or whatever a half torn-down interpreter raises
                pass  # the daemon is gone (or going); it frees what we held when we die

    @property
    def position(self) -> int:
        """Bytes written (writer) or consumed (reader) on this stream so far."""
        self._check()
        return self._cursor.position

    @property
    def peer_pid(self) -> int:
        """Pid of the other end as the daemon recorded it (0 while none has opened it)."""
        return self._view.pid("reader" if self.role == "writer" else "writer")

    def close(self) -> None:
        if self.closed:
            return
        if self._cursor is None:  # never finished opening (refused by the daemon, say)
            super().close()
            return
        try:
            if self._fork_gen == fork_generation():
                self._cursor.close()  # writer: eof; reader: r_closed (both wake the peer)
            self._tell_daemon_closed()
        finally:
            self._cursor = None
            for sem in (self._sem_r, self._sem_w):
                sem.close()
            self._view.release()
            try:
                self._mm.close()
            except BufferError:
                pass  # a caller still holds a zero-copy view; the mapping lives until it goes
            super().close()

    def fileno(self) -> int:
        raise io.UnsupportedOperation(
            f"stream {self.name!r} has no file descriptor (shared memory)")

    def isatty(self) -> bool:
        return False

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<shimmy.Stream{self.role.capitalize()} {self.name!r} {state}>"


class StreamWriter(_StreamEnd):
    """The writing end.  ``close()`` is end-of-stream; the reader then reads b""."""

    role = "writer"

    def __init__(self, stream: Stream, timeout: float | None = None):
        super().__init__(stream, timeout)
        self._cursor = stream_ring.WriterCursor(self._view, self._sem_w, self._sem_r, fence,
                                                stream.spin_us)
        self._claimed = 0
        self._claim_view: memoryview | None = None

    def writable(self) -> bool:
        return True

    def write(self, b, timeout=_DEFAULT) -> int:
        """Copy all of ``b`` into the stream, waiting while the ring is full; return len(b).

        Raises BackpressureTimeout (with ``.written``) after ``timeout`` seconds without room,
        StreamBroken if the reader closed or died.
        """
        cursor = self._cursor
        if cursor is None or self._fork_gen != _client_mod._generation:
            self._check()
        timeout = self.timeout if timeout is _DEFAULT else _check_timeout(timeout)
        t = type(b)
        if t is not bytes and t is not bytearray:
            b = memoryview(b)
            if b.ndim != 1 or b.format != "B":
                b = b.cast("B")
        return cursor.write(b, timeout)

    def write_nowait(self, b) -> int:
        """Copy as much of ``b`` as fits right now; return the count (0 when full)."""
        self._check()
        with memoryview(b) as mv:
            if mv.ndim != 1 or mv.itemsize != 1:
                mv = mv.cast("B")
            return self._cursor.write_nowait(mv)

    def claim(self, max_n: int, *, timeout=_DEFAULT) -> memoryview:
        """Zero-copy write: a writable view of up to ``max_n`` contiguous free bytes of the ring.

        Fill it, then :meth:`commit` the number of bytes written.  The view may be shorter than
        ``max_n`` (free space, wrap point).  Waits while the ring is full.
        """
        self._check()
        _check_size("claim size", max_n)
        if max_n == 0:
            raise InvalidArgument("claim size must be at least 1 byte")
        timeout = self._timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            view = self._cursor.claim(max_n)
            if view is not None:
                self._claimed = len(view)
                self._claim_view = view
                return view
            if not self._cursor.wait_space(deadline):
                raise BackpressureTimeout(f"stream {self.name!r}: ring full for {timeout} s "
                                          f"(capacity {self.capacity})")

    def commit(self, n: int) -> None:
        """Make ``n`` bytes of the last :meth:`claim` visible to the reader."""
        self._check()
        _check_size("commit size", n)
        if n > self._claimed:
            raise InvalidArgument(f"commit of {n} bytes exceeds the {self._claimed} bytes "
                                  f"claimed")
        self._claimed = 0
        view, self._claim_view = self._claim_view, None
        if view is not None:
            try:
                view.release()  # no writes into the ring after the commit
            except BufferError:
                pass  # the caller holds a slice of it
        if n:
            self._cursor.commit(n)

    def flush(self) -> None:
        # Every write is committed before it returns; there is nothing buffered to flush.
        if self.closed:
            return

    async def write_async(self, b, timeout: float | None = None) -> int:
        return await aio.stream_write_async(self, b, timeout)


class StreamReader(_StreamEnd):
    """The reading end.  ``read`` returns b"" at a clean end of stream and raises StreamBroken
    (after everything committed was read) when the writer died without closing."""

    role = "reader"

    def __init__(self, stream: Stream, timeout: float | None = None):
        super().__init__(stream, timeout)
        self._cursor = stream_ring.ReaderCursor(self._view, self._sem_r, self._sem_w, fence,
                                                stream.spin_us)
        self._lent: memoryview | None = None

    def readable(self) -> bool:
        return True

    def _ready(self, timeout) -> int:
        self._check()
        if self._lent is not None:
            raise InvalidArgument(f"stream {self.name!r}: consume() the last read_view first")
        return self._cursor.ready(self._timeout(timeout))

    def readinto(self, b, timeout=_DEFAULT) -> int:
        """Copy up to len(b) bytes straight from shared memory into ``b``; 0 at end of stream.

        Waits while the stream is empty; returns as soon as any bytes are there (like a pipe).
        """
        cursor = self._cursor
        if cursor is None or self._lent is not None or self._fork_gen != _client_mod._generation:
            self._ready(0)  # raises the right error
        timeout = self.timeout if timeout is _DEFAULT else _check_timeout(timeout)
        if type(b) is not bytearray:
            b = memoryview(b)
            if b.ndim != 1 or b.format != "B":
                b = b.cast("B")
        if len(b) == 0:
            return 0
        return cursor.readinto_fast(b, timeout)

    def read(self, size: int | None = -1, timeout=_DEFAULT) -> bytes:
        """Up to ``size`` bytes (at least one unless at end of stream); -1/None reads to EOF."""
        if size is None or (isinstance(size, int) and size < 0):
            return self.readall(timeout)
        _check_size("read size", size)
        if size == 0:
            self._check()
            return b""
        avail = self._ready(timeout)
        if not avail:
            return b""
        return self._cursor.read_bytes(size, avail)

    def readall(self, timeout=_DEFAULT) -> bytes:
        parts: list[bytes] = []
        while True:
            chunk = self.read(self.capacity, timeout)
            if not chunk:
                return b"".join(parts)
            parts.append(chunk)

    def peek(self, size: int = 1, timeout=_DEFAULT) -> bytes:
        """Buffered bytes (up to ``size``, up to the wrap point) without consuming them; waits
        while empty.  Also makes ``readline`` fast (io.IOBase uses peek when it exists)."""
        avail = self._ready(timeout)
        if not avail:
            return b""
        return self._cursor.peek(max(size, 1), avail)

    def read_view(self, max_n: int, *, timeout=_DEFAULT) -> memoryview:
        """Zero-copy read: a read-only view of up to ``max_n`` buffered bytes inside the ring.

        The view is contiguous, so it may be shorter than what is buffered (it stops at the wrap
        point).  It stays valid until :meth:`consume`, which releases it; an empty view means end
        of stream.  Waits while the stream is empty.
        """
        if type(max_n) is not int or max_n <= 0:
            _check_size("read_view size", max_n)
            raise InvalidArgument("read_view size must be at least 1 byte")
        cursor = self._cursor
        if cursor is None or self._lent is not None or self._fork_gen != _client_mod._generation:
            self._ready(0)  # raises the right error
        avail = cursor.available()
        if not avail:
            avail = cursor.ready(self.timeout if timeout is _DEFAULT else _check_timeout(timeout))
            if not avail:
                return memoryview(b"")
        view = cursor.view(max_n, avail)
        self._lent = view
        return view

    def consume(self, n: int) -> None:
        """Hand ``n`` bytes of the last :meth:`read_view` back to the writer (releases the view)."""
        lent = self._lent
        if (lent is not None and type(n) is int and 0 < n <= len(lent)
                and self._cursor is not None):
            self._lent = None  # fast path
            try:
                lent.release()
            except BufferError:
                pass
            self._cursor.consume(n)
            return
        self._check()
        _check_size("consume size", n)
        limit = 0 if lent is None else len(lent)
        if n > limit:
            raise InvalidArgument(f"consume of {n} bytes exceeds the {limit} bytes of the last "
                                  f"read_view")
        if lent is not None:
            self._lent = None
            try:
                lent.release()
            except BufferError:
                pass  # the caller holds a slice of it; consuming still hands the bytes back
        if n:
            self._cursor.consume(n)

    def close(self) -> None:
        lent = getattr(self, "_lent", None)
        if not self.closed and lent is not None:
            try:
                lent.release()
            except BufferError:
                pass
            self._lent = None
        super().close()

    async def read_async(self, size: int = -1, timeout: float | None = None) -> bytes:
        return await aio.stream_read_async(self, size, timeout)

    async def readinto_async(self, b, timeout: float | None = None) -> int:
        return await aio.stream_readinto_async(self, b, timeout)
