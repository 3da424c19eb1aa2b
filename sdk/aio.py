"""asyncio support: ``await sub.receive_async()``, ``async for msg in sub``, async stream I/O.

Nothing here polls on the event loop's thread.  Every operation first tries the non-blocking
path on the loop thread (a message or bytes already there cost one call).  When it would block,
the wait moves to a helper thread, one per subscription or stream end, created on first use and
ended after 30 s idle:

* the helper runs the same Dekker protocol as the blocking API (store the waiting word, fence,
  re-check, sleep on the posix semaphore for at most ``HELPER_SLEEP``, repeat), so publishers
  and writers need no change: they post the semaphore as they always do;
* when the condition holds (or the deadline passes) it resolves an asyncio future with
  ``loop.call_soon_threadsafe`` (measured against an eventfd registered with ``loop.add_reader``:
  the same cost within noise, and call_soon_threadsafe needs no fd per waiter; see
  docs/performance.md, "Streams and asyncio: the first measurements");
* the helper never consumes anything: the message or bytes are taken on the loop thread after
  the future resolves.  A cancelled ``receive_async`` therefore loses nothing: what arrived stays
  in the ring for the next call.  On cancellation the loop thread posts the semaphore once so the
  helper returns at once instead of after its ``HELPER_SLEEP`` bound (a spare post only causes
  one extra re-check later).

Fairness: a consumer whose messages are always ready would never yield to the loop, so
``receive_async`` yields (``await asyncio.sleep(0)``) after every ``FAIR_BATCH`` messages taken
without waiting.
"""

from __future__ import annotations

import _thread
import asyncio
import collections
import threading
import time

import posix_ipc

from shimmy import ring, stream_ring
from shimmy.errors import BackpressureTimeout, ChannelClosed, InvalidArgument, ReceiveTimeout
from shimmy.ring import fence

from . import client as _client_mod

FAIR_BATCH = 32         # messages handed out without yielding to the loop
HELPER_IDLE = 30.0      # seconds an idle helper thread lingers before exiting
HELPER_SLEEP = 0.25     # a helper asleep on a semaphore re-checks at least this often


class _Helper:
    """One thread that runs blocking waits, one after another, for one subscription/stream end."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._jobs: collections.deque = collections.deque()
        self._thread: int | None = None  # ident of the running helper thread

    def submit(self, job) -> None:
        with self._cv:
            self._jobs.append(job)
            if self._thread is None:
                # _thread.start_new_thread returns at once; threading.Thread.start waits on
                # the loop thread until the new thread has been scheduled and has started,
                # which on a busy machine can take a scheduler round.
                self._thread = _thread.start_new_thread(self._run, ())
            else:
                self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                if not self._jobs:
                    self._cv.wait(HELPER_IDLE)
                    if not self._jobs:
                        self._thread = None
                        return
                job = self._jobs.popleft()
            job()


def _helper(obj) -> _Helper:
    helper = obj.__dict__.get("_aio_helper")
    if helper is None:
        helper = obj.__dict__["_aio_helper"] = _Helper()
    return helper


def _resolve(fut: asyncio.Future, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)


def _block(sem, waiting_set, waiting_clear, ready, deadline, stop, gone) -> None:
    """Runs on the helper thread: sleep (Dekker + bounded semaphore waits) until ready()."""
    try:
        while not stop[0] and not gone():
            waiting_set()
            # SYNC POINT (Dekker, sleeper side) - same pairing as the blocking API.
            fence()
            if ready():
                return
            if deadline is None:
                wait = HELPER_SLEEP
            else:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    return
                wait = min(wait, HELPER_SLEEP)
            try:
                sem.acquire(wait)
            except posix_ipc.BusyError:
                pass
    finally:
        waiting_clear()


async def _wait(obj, sem, waiting_set, waiting_clear, ready, deadline, gone) -> None:
    """Await ``ready()`` (or the deadline) without blocking the loop; cancellation-safe."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    stop = [False]

    def job():
        err = None
        try:
            _block(sem, waiting_set, waiting_clear, ready, deadline, stop, gone)
        except BaseException as exc:  # report, never kill the helper
            err = exc
        try:
            loop.call_soon_threadsafe(_resolve, fut, err)
        except RuntimeError:
            pass  # the loop is closed; nobody is waiting any more

    _helper(obj).submit(job)
    try:
        await fut
    except asyncio.CancelledError:
        stop[0] = True
        try:
            sem.release()  # wake the helper now rather than after HELPER_SLEEP
        except posix_ipc.Error:
            pass
        raise


def _unless_closed(fn, closed=None, errors: tuple = (ValueError,)):
    """``fn`` for ``_wait``'s callbacks, returning ``closed`` where it raises one of ``errors``
    (what a view or cursor released by ``close()`` under the wait raises)."""
    def call():
        try:
            return fn()
        except errors:
            return closed
    return call


# -- pub/sub ---------------------------------------------------------------------------------
async def receive_async(sub, timeout: float | None = None):
    """``await sub.receive_async(timeout)``: the next message; ReceiveTimeout after ``timeout``."""
    if sub.closed:
        raise ChannelClosed(f"subscription to {sub.channel.name!r} is closed")
    d = sub.__dict__
    if d.get("_aio_streak", 0) >= FAIR_BATCH:
        d["_aio_streak"] = 0
        await asyncio.sleep(0)  # before taking a message, so cancellation here loses nothing
    msg = sub.receive_nowait()
    if msg is not None:
        d["_aio_streak"] = d.get("_aio_streak", 0) + 1
        return msg
    d["_aio_streak"] = 0
    deadline = None if timeout is None else time.monotonic() + timeout
    sem = d.get("_aio_sem")
    if sem is None:
        # A handle of our own: Subscription.close() closes its handle, possibly while the helper
        # sleeps on it; this one is closed only when the subscription object goes away.
        sem = d["_aio_sem"] = _client_mod.open_semaphore(sub.channel._sem_prefix + str(sub.slot))
    has_data = sub._has_data   # a group's also says True when its membership changed

    def arm():
        sub._epoch = epoch = ring.next_epoch(sub._epoch)   # see ring.Wakeups
        sub._arm(epoch)   # the waiting byte (every member ring's, in a group)

    # A subscription closed under us (its view released) raises ValueError here: gone() ends
    # the wait, and ready() returns to the loop, which raises ChannelClosed.
    waiting_set = _unless_closed(arm)
    waiting_clear = _unless_closed(lambda: sub._arm(0))
    ready = _unless_closed(has_data, True)

    def gone():
        return sub.closed or sub.channel.closed

    while True:
        sub.channel._check()
        sub._check_slot()
        await _wait(sub, sem, waiting_set, waiting_clear, ready, deadline, gone)
        if sub.closed:
            raise ChannelClosed(f"subscription to {sub.channel.name!r} is closed")
        msg = sub.receive_nowait()
        if msg is not None:
            return msg
        if deadline is not None and time.monotonic() >= deadline:
            raise ReceiveTimeout(f"no message on {sub.channel.name!r} within {timeout} s")


# -- streams ---------------------------------------------------------------------------------
def _stream_waiter(end, waiting_off: int, sem_index: int, ready):
    """Everything ``_wait`` needs for one stream end.  The helper sleeps on a semaphore handle
    of its own (opened by name): ``close()`` on the end closes the end's handles, possibly while
    the helper is asleep, and a handle must not be closed under a waiter."""
    d = end.__dict__
    sem = d.get("_aio_sem")
    if sem is None:
        sem = d["_aio_sem"] = _client_mod.open_semaphore(end._sem_names[sem_index])
    q = end._view.q
    word = waiting_off // 8

    def arm():
        q[word] = end._cursor.next_epoch()   # a new epoch per sleep, as the blocking path

    def clear():
        q[word] = 0

    # An end closed under us (its views released, its cursor gone) raises here: gone() ends the
    # wait, and ready() returns to the loop, which raises StreamClosed.
    waiting_set = _unless_closed(arm, errors=(ValueError, AttributeError))
    waiting_clear = _unless_closed(clear)
    closed_aware_ready = _unless_closed(ready, True)

    def gone():
        return end.closed

    return (sem, waiting_set, waiting_clear, closed_aware_ready, gone)


def _reader_state(reader) -> int:
    """Bytes buffered now (> 0), 0 at a clean end of stream, -1 when more may come.  Never
    waits or spins (it runs on the loop thread); raises StreamBroken / StreamClosed."""
    if (reader._cursor is None or reader._lent is not None
            or reader._fork_gen != _client_mod._generation):
        reader._ready(0)  # raises the matching error
    cur = reader._cursor
    avail = cur.available()
    if avail:
        return avail
    return 0 if cur.at_end() else -1


async def _reader_wait(reader, deadline, timeout) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise ReceiveTimeout(f"stream {reader.name!r}: no data within {timeout} s")
    cur = reader._cursor
    sem, ws, wc, ready, gone = _stream_waiter(reader, stream_ring.OFF_R_WAITING, 0,
                                              cur._data_ready)
    await _wait(reader, sem, ws, wc, ready, deadline, gone)


async def stream_readinto_async(reader, b, timeout: float | None = None) -> int:
    """Copy up to len(b) bytes into ``b``; 0 at end of stream.  Cancellation-safe: bytes are
    consumed only on the loop thread, after the wait."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with memoryview(b) as mv:
        if mv.ndim != 1 or mv.format != "B":
            mv = mv.cast("B")
        if not len(mv):
            return 0
        while True:
            avail = _reader_state(reader)
            if avail >= 0:
                return reader._cursor.readinto(mv, avail) if avail else 0
            await _reader_wait(reader, deadline, timeout)


async def stream_read_async(reader, size: int = -1, timeout: float | None = None) -> bytes:
    """Up to ``size`` bytes (-1: to end of stream); b"" at end of stream."""
    deadline = None if timeout is None else time.monotonic() + timeout
    if size is None or size < 0:
        parts: list[bytes] = []
        while True:
            left = None if deadline is None else max(deadline - time.monotonic(), 0)
            chunk = await stream_read_async(reader, reader.capacity, left)
            if not chunk:
                return b"".join(parts)
            parts.append(chunk)
    if isinstance(size, bool) or not isinstance(size, int):
        raise InvalidArgument(f"read size must be an int, got {size!r}")
    if size == 0:
        reader._check()
        return b""
    while True:
        avail = _reader_state(reader)
        if avail >= 0:
            return reader._cursor.read_bytes(size, avail) if avail else b""
        await _reader_wait(reader, deadline, timeout)


async def stream_write_async(writer, b, timeout: float | None = None) -> int:
    """Write all of ``b``; waits for room without blocking the loop.  If cancelled, the bytes
    already copied stay written (``writer.position`` says how far the stream got)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with memoryview(b) as mv:
        if mv.ndim != 1 or mv.format != "B":
            mv = mv.cast("B")
        n = len(mv)
        done = writer.write_nowait(mv)
        while done < n:
            if deadline is not None and time.monotonic() >= deadline:
                exc = BackpressureTimeout(f"stream {writer.name!r}: ring full for {timeout} s; "
                                          f"wrote {done} of {n} bytes")
                exc.written = done
                raise exc
            sem, ws, wc, ready, gone = _stream_waiter(writer, stream_ring.OFF_W_WAITING, 1,
                                                      writer._cursor._space_ready)
            await _wait(writer, sem, ws, wc, ready, deadline, gone)
            done += writer.write_nowait(mv[done:])
        return n
