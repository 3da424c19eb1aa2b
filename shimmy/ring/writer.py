"""The single writer of a pub/sub ring (RingWriter), and the daemon's slot stores.

RingWriter is the one publisher of a ring: it alone stores tail, head, last, waits and the frame
bytes, in the order spec/ring.md argues.  ``daemon_activate_slot`` / ``daemon_set_slot_state``
are the daemon's stores to a slot's daemon-owned words.  Nothing here may store a word another
writer owns (a subscriber's position, waiting byte or lost count) outside those daemon calls,
and the per-message path must not allocate beyond the frame itself.
"""

from __future__ import annotations

import time
from typing import NoReturn

import posix_ipc

from shimmy.errors import BackpressureTimeout, ChannelClosed, ChannelRetired, MessageTooLarge
from shimmy.ring.checks import check_positions, corrupted, frame_end, stream_point
from shimmy.ring import wakeups as _fence
from shimmy.ring.layout import (CONTROL_SIZE, FLAG_PAD, HEADER, I_SLOT_HIGH, MODE_RELIABLE,
                                OFF_SLOT_HIGH, OFF_WIDE, REWIND_MIN_FRAME, ROOM_POLL_FAST,
                                ROOM_POLL_FAST_FOR, SLOT_ACTIVE, SLOT_OFF_LOST, SLOT_OFF_STATE,
                                SLOT_SIZE, U64, W_HEAD, W_LAST, W_RETIRED, W_ROOM_WAIT, W_STREAM,
                                W_TAIL, W_WAITING0, W_WAITS, WIDE_BIT,
                                _pack_frame, _unpack_frame, frame_size, max_message_size,
                                waiting_offset)
from shimmy.ring.native import _WriterBase, _core
from shimmy.ring.room import open_room
from shimmy.ring.views import RingView
from shimmy.ring.wakeups import Wakeups, fence


def daemon_activate_slot(view: RingView, slot: int, position: int, pid: int,
                         generation: int) -> None:
    """Hand ``slot`` to a new subscriber starting at ``position`` (daemon only).

    Order matters: position and owner first, state last, so the publisher never counts an
    ACTIVE slot whose position is stale.  slot_high grows before the state flips for the same
    reason.
    """
    base = CONTROL_SIZE + slot * SLOT_SIZE
    view.q[base // 8] = position
    view.q[(base + SLOT_OFF_LOST) // 8] = 0
    view.u32[(base + 12) // 4] = generation
    view.u32[(base + 16) // 4] = pid
    view.mv[waiting_offset(slot)] = 0
    if slot >= 7:
        view.mv[OFF_WIDE] = 1   # before the slot can sleep: publishers scan past word 0
    if view.u32[OFF_SLOT_HIGH // 4] < slot + 1:
        view.u32[OFF_SLOT_HIGH // 4] = slot + 1
    view.u32[(base + SLOT_OFF_STATE) // 4] = SLOT_ACTIVE


def daemon_set_slot_state(view: RingView, slot: int, state: int) -> None:
    view.u32[(CONTROL_SIZE + slot * SLOT_SIZE + SLOT_OFF_STATE) // 4] = state


def _as_bytes(data) -> memoryview:
    view = memoryview(data)
    if not view.c_contiguous:
        raise ValueError("publish needs a contiguous buffer")
    return view.cast("B")



class RingWriter(_WriterBase):
    """The one publisher of a ring.  Single-writer: only the process the daemon granted the
    publisher role may construct one; it alone stores tail, head, last and frame bytes.

    ``wakeups`` posts the subscribers found asleep after a commit.  ``room`` names the ring's
    room semaphore (the daemon's reply), which a wait for room sleeps on (None: it polls).
    ``publish`` and ``publish_many`` are shimmy/_ringcore.c's where it is built: the common
    case in C, the rest through ``_publish_py`` / ``_publish_one_of_batch`` /
    ``_publish_many_py`` below.
    """

    # Instance attributes _ringcore.c reads by name (native.check_lookups checks them at import).
    _mv: memoryview
    _wakeups: Wakeups

    def __init__(self, view: RingView, wakeups: Wakeups, backoff_max: float = 0.001,
                 rewind: bool = False, room: str | None = None):
        self.v = view
        # The publisher's choice (Channel(rewind=True)): large frames may go back to the start
        # of the ring when the subscribers keep up (spec/ring.md, "Rewind", and its cost).
        self.rewind = rewind
        self._mm = view.mm
        self._wakeups = wakeups
        self._mv = view.mv
        self._q = view.q
        self._cap = view.capacity
        self._mask = view.capacity - 1
        self._base = view.data_offset
        self._reliable = view.mode == MODE_RELIABLE
        self.max_message = max_message_size(view.capacity)
        # The longest sleep of a wait for room between two checks: with the room semaphore,
        # what a post that never comes costs at most (spec/ring.md, "Waiting for room").
        self._backoff_max = backoff_max
        self._room_name = room
        self._room: posix_ipc.Semaphore | None = None   # opened at the first wait
        # Sleeps on the room semaphore that ran their whole bound (no post came: a subscriber
        # slower than backoff_max, or a post missed as spec/ring.md allows); this process's.
        self.room_timeouts = 0
        # The publisher role may move between processes over time (one at a time); it resumes
        # from the words its predecessor stored, whatever instruction that one died at.
        self._resume()
        if _core is not None:
            self._attach(view.mm, view.data_offset, view.capacity, self.max_message)
            view.cores.append(self)

    def _resume(self) -> None:
        q = self._q
        # A predecessor that died waiting for room left its room_wait set: consumers would post
        # for a wait nobody sleeps in (harmless, but not for ever).  The word is ours now.
        q[W_ROOM_WAIT] = 0
        tail, head, last = q[W_TAIL], q[W_HEAD], q[W_LAST]
        check_positions(self.v, head, last, tail)
        if last == tail and tail:
            # The previous holder died between its two commit stores (``last``, then ``tail``):
            # the frame at ``last`` is complete (every byte of it was stored before ``last``).
            # Finish that commit (roll forward) instead of ever writing over a header that
            # ``last`` points at: that keeps stream_point exact for the daemon meanwhile.
            length, flags, _ = _unpack_frame(self._mv, self._base + (tail & self._mask))
            end = frame_end(self.v, tail, length, flags, head + self._cap)
            q[W_TAIL] = end            # SYNC POINT (commit), as in _commit
            tail = end
        self._tail = tail
        self._head = head
        self._seq = stream_point(self.v)[1]
        self._limit = head + self._cap  # furthest end writable without overwriting

    @property
    def next_seq(self) -> int:
        """Sequence number the next message gets."""
        return self._seq

    def skip_to(self, seq: int) -> None:
        """Number the next message ``seq`` (never backwards): readers count the numbers skipped
        as ``Message.lost``.  A publisher that carries its stream into a new ring
        (``Channel.reopen``) keeps its messages' own numbers this way."""
        if seq < self._seq:
            raise ValueError(f"sequence number {seq} is behind the next one {self._seq}")
        self._seq = seq

    # -- hot path (the reference versions of _ringcore.c's) -----------------------------------
    def _publish_py(self, data, timeout: float | None) -> int:
        """Copy ``data`` into the ring as one frame; return its sequence number."""
        if self._q[W_RETIRED]:   # deleted, or its daemon restarted: nobody will read it
            self._closed()
        n = len(data)
        size = (n + 31) & ~15          # frame_size(n), inlined
        tail = self._tail
        off = tail & self._mask
        # Fast path: fits before the wrap point and within the limit.  Everything unusual
        # (too large, wrap padding, room to make, a large frame that may rewind) goes through
        # _reserve.
        if off + size > self._cap or tail + size > self._limit or n > self.max_message or \
                (REWIND_MIN_FRAME <= size <= off and self.rewind):
            off = self._reserve(n, timeout)
            tail = self._tail
        pos = self._base + off
        seq = self._seq
        _pack_frame(self._mv, pos, n, 0, seq)
        try:
            self._mm[pos + HEADER:pos + HEADER + n] = data   # mmap slice store: the cheapest copy
        except (IndexError, ValueError, TypeError, BufferError):
            # len() was not the byte count (an array of wider items): publish its bytes instead.
            # Nothing is visible yet: last and tail are stored only below.
            return self.publish(_as_bytes(data), timeout)
        # Commit, as in _commit (inlined: this is the hottest path in the project).
        q = self._q
        q[W_LAST] = tail               # SYNC POINT (complete frame), see _commit
        self._tail = end = tail + size
        self._seq = seq + 1
        q[W_TAIL] = end                # SYNC POINT (commit), see _commit
        try:
            _fence.fence_post()              # SYNC POINT (wake-up fence), see _commit
        except OSError:
            _fence.fence_overflowed()
        w = q[W_WAITING0]
        if w and (w != self._wakeups.posted_w0 or w >= WIDE_BIT):
            self._wakeups.wake()
        return seq

    def _publish_many_py(self, items, timeout: float | None) -> int:
        """Copy every message of the iterable ``items`` into the ring, in order; return how many.

        One commit (``last`` and ``tail`` stores), one fence and at most one wake-up scan for the
        whole batch, instead of one per message.  Where the batch reaches the wrap point or the
        ring's room (reliable: the slowest subscriber; lossy: head must move), the frames
        written so far are committed first (with their fence and wake-up, so subscribers can
        free room while this waits), then the batch goes on.  When a message is too large or
        the wait for room times out, everything before it is already committed: the error's
        ``published`` says how many of the batch went out, and its text names the index.
        """
        if self._q[W_RETIRED]:   # as in _publish_py, once per batch
            raise _batch_error(self._closed_error(), 0)
        mv, mm, mask, cap, base = self._mv, self._mm, self._mask, self._cap, self._base
        largest = self.max_message
        tail, seq, limit = self._tail, self._seq, self._limit
        last = -1            # start of the last frame written and not yet committed
        i = 0
        for data in items:
            n = len(data)
            size = (n + 31) & ~15          # frame_size(n), inlined
            off = tail & mask
            if off + size > cap or tail + size > limit or n > largest:
                # Slow path (rare): commit what is written, then reserve like publish().
                if last >= 0:
                    self._commit_batch(last, tail, seq)
                    last = -1
                try:
                    off = self._reserve(n, timeout)
                except (MessageTooLarge, BackpressureTimeout, ChannelClosed) as exc:
                    raise _batch_error(exc, i) from None
                tail, limit = self._tail, self._limit
            pos = base + off
            _pack_frame(mv, pos, n, 0, seq)
            try:
                mm[pos + HEADER:pos + HEADER + n] = data
            except (IndexError, ValueError, TypeError, BufferError):
                # len() was not the byte count: commit the batch so far, publish this one's
                # bytes alone (nothing of the header just written is visible), go on.
                if last >= 0:
                    self._commit_batch(last, tail, seq)
                    last = -1
                try:
                    self.publish(_as_bytes(data), timeout)
                except (MessageTooLarge, BackpressureTimeout, ChannelClosed) as exc:
                    raise _batch_error(exc, i) from None
                tail, seq, limit = self._tail, self._seq, self._limit
                i += 1
                continue
            last = tail
            tail += size
            seq += 1
            i += 1
        if last >= 0:
            self._commit_batch(last, tail, seq)
        return i

    def _publish_one_of_batch(self, data, timeout: float | None, index: int) -> None:
        """Message ``index`` of a batch that the C path cannot write in place (wrap, room to
        make, too large, not one run of bytes): published alone, errors naming the index."""
        try:
            self._publish_py(data, timeout)
        except (MessageTooLarge, BackpressureTimeout, ChannelClosed) as exc:
            raise _batch_error(exc, index) from None

    def _commit_batch(self, last: int, end: int, seq: int) -> None:
        """Commit every frame written from the committed tail up to ``end``; ``last`` starts
        the final one, ``seq`` is the next message's number.  Every frame is complete before the
        first store.  ``head <= last <= tail`` must hold at every instant (a reader may load the
        words between two stores; a crash may leave any of the states), so ``last`` cannot go
        past the old tail before the commit: first ``last = old tail`` (the batch's first
        frame: the state of a single publish between its two stores), then ``tail``, then
        ``last`` = the final frame (stream_point walks from an earlier ``last`` to the tail, so
        the state between the last two stores is exact too).  spec/ring.md, "Batches"."""
        q = self._q
        first = self._tail
        q[W_LAST] = first              # SYNC POINT (complete frame), as in _commit
        q[W_TAIL] = end                # SYNC POINT (commit), as in _commit
        if last != first:
            q[W_LAST] = last           # the final frame (<= tail now): one-step walks
        self._tail, self._seq = end, seq
        try:
            _fence.fence_post()              # SYNC POINT (wake-up fence), as in _commit
        except OSError:
            _fence.fence_overflowed()
        w = q[W_WAITING0]
        if w and (w != self._wakeups.posted_w0 or w >= WIDE_BIT):
            self._wakeups.wake()

    def _claim_py(self, n: int, timeout: float | None) -> memoryview:
        """Reserve room for an ``n``-byte frame and return a writable view of its payload.

        Nothing is visible to readers until :meth:`commit_claim`; dropping the claim publishes
        nothing because neither last nor tail moves.
        """
        if self._q[W_RETIRED]:   # as in _publish_py
            self._closed()
        off = self._reserve(n, timeout)
        pos = self._base + off
        _pack_frame(self._mv, pos, n, 0, self._seq)
        return self._mv[pos + HEADER:pos + HEADER + n]

    def _commit_claim_py(self, n: int) -> int:
        return self._commit(frame_size(n))

    if _core is None:   # pure Python: the reference versions are the fast paths
        publish = _publish_py
        publish_many = _publish_many_py
        claim = _claim_py
        commit_claim = _commit_claim_py

    def _reserve(self, n: int, timeout: float | None) -> int:
        """Make room for a frame of payload ``n`` at the tail; return its ring offset.

        When the frame would straddle the wrap point, first fills the end of the ring with a PAD
        frame and commits it on its own (so ``last`` always points at a frame that no later
        frame overlaps: spec/ring.md, "Crash points").  A large frame does the same before the
        wrap point when the publisher chose rewinds and ``_may_rewind`` allows it (spec/ring.md,
        "Rewind").  Otherwise only
        head may be stored here, so an abandoned reservation leaves the ring unchanged to
        readers.
        """
        if n > self.max_message:
            self._too_large(n)
        size = frame_size(n)
        tail = self._tail
        off = tail & self._mask
        room = self._cap - off
        if size > room or (self.rewind and REWIND_MIN_FRAME <= size <= off and
                           self._may_rewind(size)):
            if tail + room > self._limit:
                self._make_room(tail + room, timeout)
            # The PAD carries the seq of the message before it, so stream_point reads the tail's
            # seq from it like from any frame at ``last``.
            _pack_frame(self._mv, self._base + off, room - HEADER, FLAG_PAD, (self._seq - 1) & U64)
            q = self._q
            q[W_LAST] = tail           # SYNC POINT (complete frame), as in _commit
            self._tail = tail = tail + room
            q[W_TAIL] = tail           # SYNC POINT (commit of the PAD alone)
            off = 0
        if tail + size > self._limit:
            self._make_room(tail + size, timeout)
        return off

    def _may_rewind(self, size: int) -> bool:
        """Whether a frame of ``size`` bytes may start the next lap now, after a PAD to the wrap
        point (spec/ring.md, "Rewind"): no peer mirrors the ring (its ``stream`` word is 0: a
        mirror sends PAD bodies too) and every ACTIVE subscriber's position is at least
        ``last`` and past the first ``size`` bytes of this lap (everything but the last frame
        taken, and nothing the frame overwrites still held).  Loads only."""
        q, v = self._q, self.v
        if q[W_STREAM]:
            return False
        need = max((self._tail & ~self._mask) + size, q[W_LAST])
        high = v.u32[I_SLOT_HIGH]
        if high > v.max_subscribers:
            return False   # min_position raises for it
        for slot in range(high):
            if v.slot_state(slot) == SLOT_ACTIVE and q[v.slot_word(slot)] < need:
                return False
        return True

    def _commit(self, size: int) -> int:
        seq = self._seq
        q = self._q
        # SYNC POINT (complete frame): ``last`` = this frame's start, stored after every byte of
        # the frame and before tail.  From here on the frame is complete and its header is never
        # rewritten while ``last`` points at it, so whichever of the two stores a crash stops
        # before, stream_point finds the exact seq at the tail (and a successor publisher rolls
        # the commit forward, RingWriter._resume).
        q[W_LAST] = self._tail
        self._tail += size
        self._seq = seq + 1
        # SYNC POINT (commit): this aligned 8-byte store makes the frame visible.  It comes after
        # every byte of the frame; x86-64 TSO keeps store order, so a reader whose load of tail
        # (RingReader.take) sees this value also sees the bytes.
        q[W_TAIL] = self._tail
        # SYNC POINT (wake-up, Dekker pair with Subscription._wait): store tail, FENCE, load the
        # waiting bytes.  The subscriber stores its waiting byte, FENCES, then loads tail.  With a
        # fence on both sides at least one of us sees the other's store, so a subscriber never
        # sleeps through a commit it did not see.  Without the fence x86's store buffer could let
        # both loads see the old values.
        fence()
        w = q[W_WAITING0]
        if w and (w != self._wakeups.posted_w0 or w >= WIDE_BIT):
            self._wakeups.wake()
        return seq

    # -- slow paths ---------------------------------------------------------------------------
    def _closed_error(self) -> ChannelClosed:
        return ChannelRetired.of(self.v.name)

    def _closed(self) -> NoReturn:
        raise self._closed_error()

    def _too_large(self, n: int) -> None:
        raise MessageTooLarge(
            f"message of {n} bytes exceeds the largest message {self.max_message} bytes of channel "
            f"{self.v.name!r} (capacity {self._cap} bytes: largest = capacity/2 - {HEADER})"
        )

    def min_position(self) -> int:
        """Slowest ACTIVE subscriber position, or tail when there is none."""
        v = self.v
        low = self._tail
        high = v.u32[I_SLOT_HIGH]
        if high > v.max_subscribers:
            raise corrupted(v, f"slot_high {high} exceeds max_subscribers {v.max_subscribers}",
                            OFF_SLOT_HIGH)
        for slot in range(high):
            if v.slot_state(slot) == SLOT_ACTIVE:
                p = self._q[v.slot_word(slot)]
                if p < low:
                    low = p
                elif p > self._tail:
                    raise corrupted(v, f"subscriber slot {slot} position {p} is past the tail "
                                       f"{self._tail}", CONTROL_SIZE + slot * SLOT_SIZE)
        return low

    def _make_room(self, end: int, timeout: float | None) -> None:
        """Move head so that a frame ending at ``end`` overwrites nothing still needed.

        Lossy: head simply advances (readers detect it).  Reliable: first wait, bounded by
        ``timeout``, until every ACTIVE subscriber has consumed past ``end - capacity``.
        """
        cap = self._cap
        if self.v.retired():
            self._closed()
        if self._reliable:
            floor = self.min_position()
            if end - floor > cap:
                floor = self._wait_for_space(end, timeout)
        else:
            floor = end
        # Advance head frame by frame; go up to a sixteenth of the ring past the minimum so that
        # this slow path (and the head store) runs once per many frames, never past ``floor``
        # and never past ``last`` (the frame at last must stay intact: stream_point reads it).
        # ``end - capacity <= last`` always holds: a frame is at most capacity/2 and PADs are
        # committed on their own, so no frame overlaps the one before it.
        last = self._q[W_LAST]
        target = min(end - cap + (cap >> 4), floor, last)
        must = end - cap
        head = self._head
        if _core is not None:   # the loop below in C, up to where it breaks or must raise
            head = self._walk_head(head, must, target, last)
        mv, base, mask, largest = self._mv, self._base, self._mask, self.max_message
        while head < must or head < target:
            length, flags, _ = _unpack_frame(mv, base + (head & mask))
            nxt = head + ((length + HEADER + 15) & ~15)   # a PAD's length is 16-aligned
            if flags > FLAG_PAD or length > largest or nxt > last:
                frame_end(self.v, head, length, flags, last)  # validate: raises, naming why
            if head >= must and nxt > target:
                break
            head = nxt
        self._head = head
        # SYNC POINT (overwrite guard): head is stored before any byte of the frames it passes
        # is overwritten (TSO store order).  Readers load head after loading a frame; seeing
        # head <= their position proves the bytes they loaded were intact (seqlock pattern).
        self._q[W_HEAD] = head
        self._limit = head + cap

    def _wait_for_space(self, end: int, timeout: float | None) -> int:
        """Wait, bounded by ``timeout``, until every ACTIVE subscriber has consumed past
        ``end - capacity``; return the slowest position then.  Sleeps on the ring's room
        semaphore, which consumers post when their position reaches the one this stores in
        ``room_wait`` (spec/ring.md, "Waiting for room"); polls without one."""
        q = self._q
        q[W_WAITS] += 1   # slow path only; this process alone writes the word
        if self._room is None:
            self._room = open_room(self._room_name)
            if self._room is None:
                self._room_name = None   # none to open: poll from now on
                return self._poll_for_space(end, timeout)
        room, cap, bound = self._room, self._cap, self._backoff_max
        deadline = None if timeout is None else time.monotonic() + timeout
        # SYNC POINT (room wait, publisher side): store room_wait, FENCE, re-check every
        # position; a consumer stores its position, then loads room_wait and posts.  Dekker
        # arm of spec/ring.md, "Waiting for room" (why the local readers' arm has no fence).
        q[W_ROOM_WAIT] = end - cap   # > 0: end - floor > cap with floor >= 0
        try:
            while True:
                fence()
                floor = self._room_look(end)
                if floor is not None:
                    return floor
                wait = bound
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise self._no_room(end, timeout)
                    wait = min(wait, left)
                try:
                    room.acquire(wait)   # a post, or the bound: re-check either way
                except posix_ipc.BusyError:
                    self.room_timeouts += 1
        finally:
            q[W_ROOM_WAIT] = 0

    def _poll_for_space(self, end: int, timeout: float | None) -> int:
        """_wait_for_space without a room semaphore: poll."""
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        # Poll every few tens of µs for the first ROOM_POLL_FAST_FOR s: room usually comes
        # soon (a local subscriber's next take, a remote replica's next credit).  A wait longer
        # than that is a slow subscriber: back off up to backoff_max between checks.
        fast_until = now + ROOM_POLL_FAST_FOR
        delay = 0.000_02
        while True:
            floor = self._room_look(end)
            if floor is not None:
                return floor
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise self._no_room(end, timeout)
            time.sleep(delay if deadline is None else min(delay, max(deadline - now, 0)))
            delay = min(delay * 2, ROOM_POLL_FAST if now < fast_until else self._backoff_max)

    def _room_look(self, end: int) -> int | None:
        """One look of the room wait: the slowest position when a frame ending at ``end`` fits
        above it, else None; raises when the ring was retired."""
        floor = self.min_position()
        if end - floor <= self._cap:
            return floor
        if self.v.retired():
            self._closed()
        return None

    def _no_room(self, end: int, timeout: float | None) -> BackpressureTimeout:
        return BackpressureTimeout(
            f"channel {self.v.name!r}: no room for {end - self._tail} bytes after waiting "
            f"{timeout} s for the slowest subscriber (publish_timeout)"
        )


def _batch_error(exc: MessageTooLarge | BackpressureTimeout | ChannelClosed,
                 index: int) -> Exception:
    """``exc`` raised for message ``index`` of a ``publish_many`` batch: the same class, its text
    prefixed with the index, ``published`` = the messages of the batch committed before it."""
    out = type(exc)(f"message {index} of the batch (the {index} before it were published): "
                    f"{exc}")
    out.published = index
    return out

