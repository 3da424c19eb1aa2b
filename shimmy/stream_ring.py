"""The stream ring: an SPSC byte ring for ``shimmy.Stream`` (one writer, one reader).

One stream is one POSIX shared-memory object created, sized and reclaimed by the node daemon, plus
two named semaphores (``...r``: the reader sleeps on it, ``...w``: the writer sleeps on it).
Byte layout (all integers little-endian; ``spec/stream.md`` states it with the reasoning)::

    0      control page (4 KiB)
           +0    magic "SHMYSTRM" u64 | +8 layout version u32 | +12 reserved u32
           +16   capacity u64         | +24 data_offset u32
           +32   created_ns u64       | +40 retired u64 (daemon: 1 = stream gone, stop)
           +64   name length u32 + name bytes (up to 200)       -- daemon, write-once
           +320  tail u64         writer: bytes committed so far (commit word)
           +328  eof u64          writer: 1 = clean end of stream, stored after the final tail
           +336  w_waiting u64    writer: its sleep epoch (never 0) while about to sleep for room
           +384  head u64         reader: bytes consumed so far
           +392  r_closed u64     reader: 1 = the reader closed its end (writes now fail)
           +400  r_waiting u64    reader: its sleep epoch (never 0) while about to sleep for data
           +448  w_broken u64     daemon: the writer died without closing
           +456  r_broken u64     daemon: the reader died
           +464  writer pid u32 | +468 reader pid u32                 -- daemon
    4096   capacity bytes of data (capacity is a power of two)

Single writer per word: every word above has exactly one process that stores it (the owner named
on its line); the three owners' words sit on three different 64-byte cache lines.  ``tail`` and
``head`` are positions in the endless stream; the ring offset is ``position & (capacity - 1)``.
``tail - head`` is the number of buffered bytes, ``0 <= tail - head <= capacity``.  Unlike pub/sub
frames, stream bytes may wrap: a copy that crosses the end of the data area is split in two.

Memory ordering (x86-64, TSO; see the SYNC POINT comments):

* commit: the writer copies bytes, then stores ``tail`` with one aligned 8-byte store.  TSO keeps
  store order, so a reader whose load of ``tail`` sees the new value also sees the bytes.
* consume: the reader copies bytes out, then stores ``head``.  A load is never reordered with a
  later store on x86, so the writer (which loads ``head``) never overwrites bytes still being read.
* end of stream: the writer stores ``tail`` then ``eof``; the reader loads ``eof`` then ``tail``
  (loads are not reordered with loads on x86), so seeing eof=1 means the tail it loads is final.
* wake-ups are two Dekker pairs, each "store my flag, FENCE, load the other's word":
  writer commit (tail / r_waiting) against reader sleep (r_waiting / tail), and reader consume
  (head / w_waiting) against writer sleep (w_waiting / head).  With a full fence on both sides at
  least one side sees the other's store, so a sleeper is always posted or never sleeps.
* the daemon's broken flags are stored after the dead process's last store (the daemon learns of
  the death by EOF on a socket, a kernel round trip), then it posts the survivor's semaphore.

On ARM (weaker ordering) the commit store would need release semantics and the loads of
``tail``/``head``/``eof`` acquire semantics; memoryview stores give neither, so this module is
x86-64-only as written (the fence the SDK passes in, ``shimmy.ring.fence``, is a full barrier on
both).  The C fast paths of ``write`` and ``readinto_fast`` (shimmy/_ringcore.c) make the same
loads and stores in the same order and state it to the compiler as well: release stores of
``tail`` and ``head``, acquire loads of them, a sequentially consistent fence in each Dekker pair.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from typing import Any, Callable

import posix_ipc

from shimmy.errors import (BackpressureTimeout, InvalidArgument, ReceiveTimeout,
                           StreamBroken)
from shimmy.ring import SegmentView, check_layout, check_lookups, core_layout, corrupted
from shimmy.ring import _core

# The per-chunk paths in C (shimmy/_ringcore.c, where it is built and SHIMMY_PURE_PYTHON is not
# set): WriterCursor.write and ReaderCursor.readinto_fast run their common case there and hand
# the rest to their Python twins here (``_write_py``, ``_readinto_fast_py``), the reference.
_WriterBase: Any = _core.StreamWriterCore if _core else object
_ReaderBase: Any = _core.StreamReaderCore if _core else object

MAGIC = 0x4D525453594D4853  # b"SHMYSTRM" read as a little-endian u64
LAYOUT_VERSION = 1

PAGE = 4096
CONTROL_SIZE = PAGE
DATA_OFFSET = PAGE

OFF_MAGIC = 0
OFF_VERSION = 8
OFF_CAPACITY = 16
OFF_DATA_OFFSET = 24
OFF_CREATED = 32
OFF_RETIRED = 40  # same offset as in the pub/sub ring: Segments.destroy() sets it for both
OFF_NAME = 64
# writer's line
OFF_TAIL = 320
OFF_EOF = 328
OFF_W_WAITING = 336
# reader's line
OFF_HEAD = 384
OFF_R_CLOSED = 392
OFF_R_WAITING = 400
# daemon's line
OFF_W_BROKEN = 448
OFF_R_BROKEN = 456
OFF_W_PID = 464
OFF_R_PID = 468

MIN_CAPACITY = 4096
MAX_CAPACITY = 1 << 30
DEFAULT_CAPACITY = 1 << 21  # 2 MiB: big enough to pipeline 1 MiB writes, small enough for L2/L3

MAX_SLEEP = 0.25       # a sleeping end re-checks its condition (and liveness) at least this often
DEFAULT_SPIN_US = 50   # spin this long before sleeping on the semaphore


class PartialWrite(BackpressureTimeout):
    """BackpressureTimeout of a stream write, with ``written``: the bytes that went in before."""

    def __init__(self, message: str, written: int):
        super().__init__(message)
        self.written = written


def check_capacity(capacity: object) -> int:
    if not isinstance(capacity, int) or isinstance(capacity, bool):
        raise InvalidArgument(f"stream capacity must be an int, got {type(capacity).__name__}")
    if capacity < MIN_CAPACITY or capacity > MAX_CAPACITY or capacity & (capacity - 1):
        raise InvalidArgument(f"stream capacity {capacity} must be a power of two between "
                              f"{MIN_CAPACITY} and {MAX_CAPACITY}")
    return capacity


def segment_size(capacity: int) -> int:
    return DATA_OFFSET + capacity


def format_stream(mm: mmap.mmap, name: str, capacity: int) -> None:
    """Write a fresh control page (daemon only, before anyone else can open the segment)."""
    mv = memoryview(mm)
    struct.pack_into("<QIIQI", mv, 0, MAGIC, LAYOUT_VERSION, 0, capacity, DATA_OFFSET)
    struct.pack_into("<QQ", mv, OFF_CREATED, time.time_ns(), 0)
    raw = name.encode()
    struct.pack_into("<I", mv, OFF_NAME, len(raw))
    mv[OFF_NAME + 4:OFF_NAME + 4 + len(raw)] = raw
    mv.release()


class StreamView(SegmentView):
    """A process's mapping of one stream segment (validation and views: ``SegmentView``)."""

    KIND = "stream"
    MAGIC = MAGIC
    LAYOUT_VERSION = LAYOUT_VERSION
    DATA_OFFSET_AT = OFF_DATA_OFFSET

    def word(self, off: int) -> int:
        return self.q[off // 8]

    def pid(self, role: str) -> int:
        return self.u32[(OFF_W_PID if role == "writer" else OFF_R_PID) // 4]


# -- daemon side ---------------------------------------------------------------------------------
def daemon_set_pid(view: StreamView, role: str, pid: int) -> None:
    view.u32[(OFF_W_PID if role == "writer" else OFF_R_PID) // 4] = pid & 0xFFFFFFFF


def daemon_mark_broken(view: StreamView, role: str) -> None:
    """The ``role`` end died without closing.  The caller posts the survivor's semaphore after."""
    view.q[(OFF_W_BROKEN if role == "writer" else OFF_R_BROKEN) // 8] = 1


class _End:
    """What both cursors share: the view, the two semaphores, the fence and the bounded sleep."""

    _peer: posix_ipc.Semaphore   # read by _ringcore.c by name (checked at import, end of file)
    _attach: Callable[..., None]  # the C base's (where built): maps the ring for its fast paths

    def __init__(self, view: StreamView, my_sem, peer_sem, barrier: Callable[[], None],
                 spin_us: int = DEFAULT_SPIN_US):
        self.v = view
        self._mv = view.mv
        self._q = view.q
        self._cap = view.capacity
        self._mask = view.capacity - 1
        self._base = view.data_offset
        self._sem = my_sem       # I sleep on this one
        self._peer = peer_sem    # I post this one when the peer may be asleep
        self._epoch = 0          # my last sleep epoch (stored in my waiting word)
        self._posted = 0         # the peer's sleep epoch I posted last
        self._barrier = barrier
        self._spin = spin_us / 1e6

    def _sleep(self, waiting_word: int, ready: Callable[[], bool], deadline: float | None) -> bool:
        """Wait until ``ready()`` (True) or the deadline passes (False).

        Spin briefly, then sleep on our semaphore under the Dekker protocol: store the waiting
        word, FENCE, re-check, sleep at most MAX_SLEEP, repeat.  ``ready`` must also turn True
        when the peer is gone or the stream retired, so the caller can raise.
        """
        spin = self._spin
        if deadline is not None:
            spin = min(spin, deadline - time.monotonic())  # timeout=0 must not spin
        if spin > 0:
            # Spin with sched_yield: when the peer shares our CPU (a busy or small machine) the
            # yield lets it run and produce what we wait for; with a CPU of its own the call
            # returns at once.  Measured on the 2-core test VM under load: 64 KiB chunks about
            # 1.4x faster (readinto) and 1.4-1.8x (read_view) than a plain spin.
            end = time.perf_counter() + spin
            sched_yield = os.sched_yield
            while True:
                if ready():
                    return True
                if time.perf_counter() >= end:
                    break
                sched_yield()
        q = self._q
        try:
            while True:
                q[waiting_word] = self.next_epoch()
                # SYNC POINT (Dekker, sleeper side): waiting store, FENCE, then ready() loads the
                # peer's commit word.  Pairs with _post_peer_if_waiting on the other end.
                self._barrier()
                if ready():
                    return True
                if deadline is None:
                    wait = MAX_SLEEP
                else:
                    wait = deadline - time.monotonic()
                    if wait <= 0:
                        return False
                    wait = min(wait, MAX_SLEEP)
                try:
                    self._sem.acquire(wait)
                except posix_ipc.BusyError:  # timed out; the loop re-checks
                    pass
        finally:
            q[waiting_word] = 0

    def _attach_native(self) -> None:
        """Open the end, and hand it to the C paths (shimmy/_ringcore.c) where they are built;
        the last step of each cursor's ``__init__``."""
        self.closed = False
        if _core is not None:
            self._attach(self.v.mm, self.v.data_offset, self.v.capacity)
            self.v.cores.append(self)

    def _close_end(self, word: int) -> bool:
        """Close this end once: store 1 in my closing ``word`` (eof, r_closed), fence, and always
        wake the peer.  False when the end was closed already."""
        if self.closed:
            return False
        self.closed = True
        self._q[word] = 1
        self._barrier()
        self._peer.release()
        return True

    def next_epoch(self) -> int:
        """A new sleep epoch for our waiting word (never 0, never repeated).  The peer posts
        each epoch once, so while we are still waking up its further commits cost no syscall
        (the same scheme as the pub/sub ring's waiting bytes)."""
        self._epoch += 1
        return self._epoch

    def _post_peer_if_waiting(self, peer_waiting_word: int) -> None:
        # SYNC POINT (Dekker, waker side): the caller has just stored its commit word (tail or
        # head); FENCE, then load the peer's waiting word.  Either the peer's re-check saw our
        # store, or we see its epoch here and post its semaphore (once per epoch).
        self._barrier()
        w = self._q[peer_waiting_word]
        if w and w != self._posted:
            self._posted = w
            self._peer.release()

    def retired(self) -> bool:
        return self._q[OFF_RETIRED // 8] != 0

    def _check(self, head: int, tail: int) -> None:
        """Validate a freshly loaded head or tail: ``0 <= tail - head <= capacity`` (any other
        value was not stored by the other end; spec/ring.md, "Validation")."""
        if not 0 <= tail - head <= self._cap:
            raise corrupted(self.v, f"head {head} and tail {tail} are not within "
                                    f"0..capacity {self._cap} of each other", OFF_TAIL)


class WriterCursor(_End, _WriterBase):
    """The single writer's cursor.  It alone stores tail, eof, w_waiting and the data bytes."""

    def __init__(self, view, my_sem, peer_sem, barrier, spin_us=DEFAULT_SPIN_US):
        super().__init__(view, my_sem, peer_sem, barrier, spin_us)
        self._tail = self._q[OFF_TAIL // 8]
        self._head = self._q[OFF_HEAD // 8]
        self._check(self._head, self._tail)
        # Commit at least every quarter ring so that a large write is pipelined with the reader.
        self._piece = max(self._cap // 4, 4096)
        self._attach_native()

    @property
    def position(self) -> int:
        return self._tail

    def reader_gone(self) -> bool:
        q = self._q
        return bool(q[OFF_R_CLOSED // 8] or q[OFF_R_BROKEN // 8] or q[OFF_RETIRED // 8])

    def _broken(self) -> StreamBroken:
        q = self._q
        if q[OFF_RETIRED // 8]:
            why = "the daemon retired the stream (deleted or restarted)"
        elif q[OFF_R_BROKEN // 8]:
            why = f"its reader (pid {self.v.pid('reader')}) died"
        else:
            why = f"its reader (pid {self.v.pid('reader')}) closed its end"
        return StreamBroken(f"stream {self.v.name!r}: {why}; nothing more can be written")

    def free(self) -> int:
        """Room for this many bytes now (reloads head when the cached value shows no room)."""
        free = self._cap - (self._tail - self._head)
        if free == 0:
            # SYNC POINT (acquire head): pairs with the reader's head store in ReaderCursor.consume.
            self._head = self._q[OFF_HEAD // 8]
            self._check(self._head, self._tail)
            free = self._cap - (self._tail - self._head)
        return free

    def _space_ready(self) -> bool:
        head = self._q[OFF_HEAD // 8]
        self._check(head, self._tail)
        if self._cap - (self._tail - head) > 0:
            return True
        return self.reader_gone()

    def wait_space(self, deadline: float | None) -> bool:
        """Block until there is room (or the reader is gone); False when the deadline passed."""
        return self._sleep(OFF_W_WAITING // 8, self._space_ready, deadline)

    def write_nowait(self, data: memoryview) -> int:
        """Copy as much of ``data`` (a byte memoryview) as fits now; return the count."""
        if self.reader_gone():
            raise self._broken()
        n = len(data)
        done = 0
        while done < n:
            free = self.free()
            if not free:
                break
            k = min(free, n - done, self._piece)
            self._copy_in(data, done, k)
            done += k
            self._commit(k)
        return done

    def _write_py(self, data, timeout: float | None) -> int:
        """Copy all of ``data`` (bytes, bytearray or a byte memoryview) in, waiting (bounded by
        ``timeout``) while the ring is full.  ``write`` (_ringcore.c's fast path, or this)."""
        # Fast path, flattened (Python calls cost more than the copy for small writes): the
        # whole write fits now and in one piece.  Same stores, same order as the slow path.
        n = len(data)
        q = self._q
        if not (q[OFF_R_CLOSED // 8] or q[OFF_R_BROKEN // 8] or q[OFF_RETIRED // 8]):
            tail = self._tail
            cap = self._cap
            if cap - (tail - self._head) < n:
                self._head = q[OFF_HEAD // 8]  # SYNC POINT (acquire head), as in free()
                self._check(self._head, self._tail)
            if n <= cap - (tail - self._head) and n <= self._piece:
                off = tail & self._mask
                base = self._base
                if off + n <= cap:
                    self._mv[base + off:base + off + n] = data
                else:
                    first = cap - off
                    data = memoryview(data)
                    self._mv[base + off:base + cap] = data[:first]
                    self._mv[base:base + n - first] = data[first:]
                tail += n
                self._tail = tail
                q[OFF_TAIL // 8] = tail  # SYNC POINT (commit), as in _commit()
                self._barrier()          # SYNC POINT (Dekker, waker side)
                w = q[OFF_R_WAITING // 8]
                if w and w != self._posted:
                    self._posted = w
                    self._peer.release()
                return n
        data = memoryview(data)
        done = self.write_nowait(data)
        if done == n:
            return n
        deadline = None if timeout is None else time.monotonic() + timeout
        while done < n:
            if not self.wait_space(deadline):
                raise PartialWrite(
                    f"stream {self.v.name!r}: ring full for {timeout} s (capacity {self._cap} "
                    f"bytes, reader pid {self.v.pid('reader') or 'none yet'}); wrote {done} of "
                    f"{n} bytes", done)
            done += self.write_nowait(data[done:])
        return n

    if _core is None:   # pure Python: the reference version is the fast path
        write = _write_py

    def _copy_in(self, data: memoryview, start: int, k: int) -> None:
        off = self._tail & self._mask
        first = self._cap - off
        base = self._base
        mv = self._mv
        if k <= first:
            mv[base + off:base + off + k] = data[start:start + k]
        else:  # the write wraps: split it at the end of the data area
            mv[base + off:base + self._cap] = data[start:start + first]
            mv[base:base + k - first] = data[start + first:start + k]

    def claim(self, max_n: int) -> memoryview | None:
        """Writable view of up to ``max_n`` contiguous free bytes, or None when full (zero-copy)."""
        if self.reader_gone():
            raise self._broken()
        free = self.free()
        if not free:
            return None
        off = self._tail & self._mask
        k = min(free, max_n, self._cap - off)
        return self._mv[self._base + off:self._base + off + k]

    def _commit(self, k: int) -> None:
        self._tail += k
        # SYNC POINT (commit): one aligned 8-byte store after every byte of the chunk; pairs with
        # the reader's load of tail (ReaderCursor.available).
        self._q[OFF_TAIL // 8] = self._tail
        self._post_peer_if_waiting(OFF_R_WAITING // 8)

    def commit(self, k: int) -> None:
        self._commit(k)

    def close(self) -> None:
        """Clean end of stream: eof after the final tail, then always wake the reader."""
        # SYNC POINT (eof): stored after the last tail store; the reader loads eof before tail.
        self._close_end(OFF_EOF // 8)


class ReaderCursor(_End, _ReaderBase):
    """The single reader's cursor.  It alone stores head, r_closed and r_waiting."""

    def __init__(self, view, my_sem, peer_sem, barrier, spin_us=DEFAULT_SPIN_US):
        super().__init__(view, my_sem, peer_sem, barrier, spin_us)
        self._head = self._q[OFF_HEAD // 8]
        self._tail = self._q[OFF_TAIL // 8]
        self._check(self._head, self._tail)
        self._ro = view.mv.toreadonly()
        self._attach_native()

    @property
    def position(self) -> int:
        return self._head

    def available(self) -> int:
        avail = self._tail - self._head
        if avail == 0:
            # SYNC POINT (acquire tail): pairs with the writer's tail store in _commit.
            self._tail = self._q[OFF_TAIL // 8]
            self._check(self._head, self._tail)
            avail = self._tail - self._head
        return avail

    def at_end(self) -> int:
        """With nothing buffered: 0 = more may come, 1 = clean EOF; raises StreamBroken."""
        q = self._q
        # Load eof / broken first, then tail again: the writer stored tail before eof (and the
        # daemon sets broken only after the writer is dead), so a non-zero flag means the tail
        # loaded afterwards is final.
        eof = q[OFF_EOF // 8]
        broken = q[OFF_W_BROKEN // 8] or q[OFF_RETIRED // 8]
        if not eof and not broken:
            return 0
        if self.available():
            return 0
        if eof:
            return 1
        if q[OFF_RETIRED // 8]:
            raise StreamBroken(f"stream {self.v.name!r}: the daemon retired the stream "
                               f"(deleted or restarted)")
        raise StreamBroken(f"stream {self.v.name!r}: its writer (pid {self.v.pid('writer')}) "
                           f"died without closing; {self._head} bytes were delivered")

    def _data_ready(self) -> bool:
        q = self._q
        return (q[OFF_TAIL // 8] != self._head or q[OFF_EOF // 8] != 0
                or q[OFF_W_BROKEN // 8] != 0 or q[OFF_RETIRED // 8] != 0)

    def wait_data(self, deadline: float | None) -> bool:
        return self._sleep(OFF_R_WAITING // 8, self._data_ready, deadline)

    def ready(self, timeout: float | None) -> int:
        """Bytes available now, waiting (bounded) while empty; 0 means clean EOF."""
        avail = self.available()
        if avail:
            return avail
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.at_end():
                return 0
            avail = self.available()
            if avail:
                return avail
            if not self.wait_data(deadline):
                avail = self.available()
                if avail or self.at_end():
                    return avail
                raise ReceiveTimeout(
                    f"stream {self.v.name!r}: no data within {timeout} s (writer pid "
                    f"{self.v.pid('writer') or 'none yet'})")

    def _readinto_fast_py(self, buf, timeout: float | None) -> int:
        """``ready`` + ``readinto`` flattened for the common case (bytes already buffered, no
        wrap); falls back to them otherwise.  ``buf`` is a writable byte buffer, len > 0.
        ``readinto_fast`` (_ringcore.c's fast path, or this)."""
        head = self._head
        avail = self._tail - head
        if not avail:
            self._tail = self._q[OFF_TAIL // 8]  # SYNC POINT (acquire tail)
            self._check(head, self._tail)
            avail = self._tail - head
        if avail:
            k = len(buf)
            if avail < k:
                k = avail
            off = head & self._mask
            if off + k <= self._cap:
                base = self._base + off
                buf[:k] = self._mv[base:base + k]
                head += k
                self._head = head
                q = self._q
                q[OFF_HEAD // 8] = head  # SYNC POINT (release), as in consume()
                self._barrier()          # SYNC POINT (Dekker, waker side)
                w = q[OFF_W_WAITING // 8]
                if w and w != self._posted:
                    self._posted = w
                    self._peer.release()
                return k
        avail = self.ready(timeout)
        if not avail:
            return 0
        return self.readinto(memoryview(buf), avail)

    if _core is None:   # pure Python: the reference version is the fast path
        readinto_fast = _readinto_fast_py

    def readinto(self, buf: memoryview, avail: int) -> int:
        """Copy up to ``len(buf)`` of the ``avail`` buffered bytes into ``buf`` and consume them."""
        k = min(avail, len(buf))
        off = self._head & self._mask
        first = self._cap - off
        base = self._base
        mv = self._mv
        if k <= first:
            buf[:k] = mv[base + off:base + off + k]
        else:
            buf[:first] = mv[base + off:base + self._cap]
            buf[first:k] = mv[base:base + k - first]
        self.consume(k)
        return k

    def read_bytes(self, n: int, avail: int) -> bytes:
        k = min(avail, n)
        off = self._head & self._mask
        first = self._cap - off
        base = self._base
        if k <= first:
            out = bytes(self._mv[base + off:base + off + k])
        else:
            out = (bytes(self._mv[base + off:base + self._cap])
                   + bytes(self._mv[base:base + k - first]))
        self.consume(k)
        return out

    def view(self, max_n: int, avail: int) -> memoryview:
        """Read-only view of up to ``max_n`` contiguous buffered bytes (stops at the wrap point)."""
        off = self._head & self._mask
        k = min(avail, max_n, self._cap - off)
        return self._ro[self._base + off:self._base + off + k]

    def peek(self, n: int, avail: int) -> bytes:
        off = self._head & self._mask
        k = min(avail, n, self._cap - off)
        return bytes(self._mv[self._base + off:self._base + off + k])

    def consume(self, k: int) -> None:
        self._head += k
        q = self._q
        # SYNC POINT (release): stored after the bytes were copied out; pairs with the writer's
        # load of head in WriterCursor.free.
        q[OFF_HEAD // 8] = self._head
        # SYNC POINT (Dekker, waker side): as _post_peer_if_waiting, inlined (hot path).
        self._barrier()
        w = q[OFF_W_WAITING // 8]
        if w and w != self._posted:
            self._posted = w
            self._peer.release()

    def close(self) -> None:
        """The reader is done: the writer's next write raises StreamBroken (like EPIPE)."""
        if not self._close_end(OFF_R_CLOSED // 8):
            return
        try:
            self._ro.release()
        except BufferError:
            pass  # a caller still holds a read_view slice; it dies with the mapping


if _core is not None:   # refuse a C module built for another stream layout or other names, now
    check_layout(core_layout(), {name: globals().get(name[2:]) for name in core_layout()
                                 if name.startswith("S_")})
    check_lookups(_core.LOOKUPS, {"StreamWriterCore": WriterCursor,
                                  "StreamReaderCore": ReaderCursor, "peer": posix_ipc.Semaphore})
