"""The two halves of one mirror, independent of the transport under them.

Source (``MirrorSource``, a thread on the publishing node) is a subscriber of the local ring
like any other: it holds a slot (so a reliable publisher never overwrites what the remote side
has not consumed: the slot's position is the replica's credit) and sleeps on the slot's semaphore
between commits.  Each wake-up it takes *everything* committed since the last batch
(``[pos, tail)``, split only at the wrap) and puts it in one transport call, then commits the
tail.  Positions are identical on both sides, so the replica's ring offsets equal the source's.

Replica (``MirrorReplica``, on the subscribing node, called by the transport's receiving side)
is the one publisher of the replica ring: it stores the guard head before bytes land, lets the
transport fill the ring in place, then stores last and tail (the commit) and wakes sleeping
subscribers exactly as ``RingWriter._commit`` does (tail store, fence, waiting bytes, semaphores).

Loss accounting is by the frames' own sequence numbers: when the source no longer holds bytes
the replica lacks (lossy lapping, or reliable after ``peer_hold`` expired while disconnected),
the source sends ``jump``: replica head and tail move past the hole, readers resync to the head
and see ``Message.lost`` = the exact number of sequence numbers skipped.  Bytes the source finds
overwritten *while* it was sending them (lossy only; detected by re-reading head after the send,
the seqlock check) are turned into PAD frames by the replica before the commit, so no torn frame
is ever visible and the loss is still exact; a batch torn to its end, or cut by walking frames
that were being overwritten, is not committed at all: the source jumps past it
(spec/ring.md, "Replica rings").
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

import posix_ipc

from shimmy import ring
from shimmy.errors import RingCorrupted
from shimmy.ring import FLAG_PAD, FRAME, HEADER

from . import relay
from .transport import ReplicaSink, Transport, TransportClosed

log = logging.getLogger("shimmy.peer")

fence = ring.fence  # full barrier of the wake-up handshake (spec/ring.md)


def seed_stream(view: ring.RingView, position: int, seq: int) -> None:
    """Position a fresh, empty ring's stream at ``position`` (a frame boundary of the stream it
    continues), with ``seq`` the sequence number of its next message: one zero-payload PAD
    frame at ``position - 16`` carries ``seq - 1`` and is ``last``, so ``ring.stream_point``
    (and so a publisher's first frame and every reader's expected number) continue from there.
    Head, last and tail are stored before any client can map the ring."""
    q, mv, base, mask = view.q, view.mv, view.data_offset, view.capacity - 1
    lp = position - HEADER
    FRAME.pack_into(mv, base + (lp & mask), 0, FLAG_PAD, seq - 1)
    q[ring.W_HEAD] = lp
    q[ring.W_LAST] = lp
    q[ring.W_TAIL] = position


def seq_point(view: ring.RingView, seq: int) -> tuple[int, int]:
    """``(position, seq)`` of the first message numbered ``seq`` or later that the ring still
    holds (its tail and the next number when there is none)."""
    mv, base, mask = view.mv, view.data_offset, view.capacity - 1
    p, first = ring.stream_point(view, oldest=True)
    tail, at_tail = ring.stream_point(view)
    while p < tail:
        length, flags, s = FRAME.unpack_from(mv, base + (p & mask))
        if not flags and s >= seq:
            return p, s
        p = ring.frame_end(view, p, length, flags, tail)
    return tail, at_tail


def cut_batch(view: ring.RingView, pos: int, limit: int) -> tuple[int, int] | None:
    """``(end, last)`` of the longest run of whole frames from ``pos`` that ends at or before
    ``limit`` (``last``: the start of its last frame), or None when the frames read are not
    well formed (overwritten meanwhile: the caller's head check finds out).  A batch so cut
    never makes the replica's head pass its ``last`` frame (spec/ring.md, "Replica
    rings")."""
    mv, base, mask = view.mv, view.data_offset, view.capacity - 1
    p, prev = pos, -1
    try:
        while True:
            length, flags, _ = FRAME.unpack_from(mv, base + (p & mask))
            nxt = ring.frame_end(view, p, length, flags, p + view.capacity)
            if nxt > limit:
                break
            prev, p = p, nxt
    except RingCorrupted:
        return None
    return (p, prev) if prev >= 0 else None


def hole_last(position: int) -> int:
    """A lower bound of the replica's ``last`` after a hole that ends at ``position``: the hole's
    last PAD starts at ``position - 16``, or ``position - 32`` when that would share a ring
    offset with the hole's first header (``MirrorReplica._hole``).  What the source's batch
    cutting assumes until its next commit sets the replica's ``last`` exactly."""
    return position - 2 * HEADER


class ReplicaViolation(Exception):
    """The source sent something inconsistent with the replica's state."""


class MirrorSource(relay.SourceBase):
    """Streams one local ring to one replica, in its own thread (:meth:`start`).  Over a plain
    TCP link the C base's ``pump`` runs the sleeps and the plain batches of :meth:`_loop`
    (shimmy/_relaycore.c); this class keeps every other case, and all of them without it."""

    def __init__(self, name: str, view: ring.RingView, slot: int, sem_name: str,
                 transport: Transport, start: int, start_seq: int | None, resume: int | None,
                 origin: tuple[int, int] | None = None, wait_seq: int | None = None,
                 room_sem: str | None = None):
        self.name = name
        self.v = view
        # Posts the ring's room semaphore when a credit reaches the position a waiting
        # publisher needs (fenced: once per credit, so a post is never late).
        self.room = ring.RoomPoster(view, room_sem, fenced=True)
        # Resume by sequence number: start at the first message numbered ``wait_seq`` or later,
        # once the ring has it (a publisher carrying its stream over may still be at it).
        self.wait_seq = wait_seq
        # (position, seq) where our stream began, sent first to a replica that is ahead of it
        # (our daemon restarted): the replica continues our stream from there, so a jump on to
        # ``start`` counts the messages we no longer hold as lost, exactly.
        self.origin = origin
        self.slot = slot
        self.sem_name = sem_name
        self.t = transport
        self.pos = start                 # next stream position to send
        self.resume = resume             # replica's committed tail when it asked (None = fresh)
        self.start_seq = start_seq       # not None: first tell the replica to jump to start
        self.reliable = view.mode == ring.MODE_RELIABLE
        self.credit = start
        self.stopped = False
        self.error: str | None = None
        self.stats = {"gaps": 0, "gap_bytes": 0, "torn": 0}
        self._bytes = self._batches = self._messages = 0
        self._seq_end = -1               # the number after the last message sent (-1: unknown)
        self._epoch = 0                  # the last sleep epoch stored in our waiting byte
        # The replica's ``last`` (in our positions) as our commits and jumps left it; until the
        # first of them, a safe lower bound (a frame or PAD is at most half the ring).
        self.rlast = start - view.capacity // 2
        self.thread = threading.Thread(target=self._run, name=f"mirror-{name}", daemon=True)
        transport.on_credit = self.on_credit

    def start(self) -> None:
        self.thread.start()

    def on_credit(self, consumed: int) -> None:
        """Replica reports its slowest subscriber (transport receive thread)."""
        if consumed > self.credit and consumed <= self.pos:
            self.credit = consumed
            if self.reliable:
                # SYNC POINT (consumption, as RingReader.release_to): the publisher may now
                # overwrite bytes before ``consumed``; the replica no longer needs them.
                self.v.q[self.v.slot_word(self.slot)] = consumed
                self.room.reached(consumed)   # SYNC POINT (room wait): fence, load, post

    def lag(self) -> int:
        return max(self.v.q[ring.W_TAIL] - self.credit, 0)

    def stop(self) -> None:
        self.stopped = True
        try:
            sem = posix_ipc.Semaphore(self.sem_name)
            sem.release()
            sem.close()
        except posix_ipc.Error:
            pass

    def _run(self) -> None:
        try:
            self._loop()
        except TransportClosed as exc:
            self.error = str(exc)
        except Exception as exc:  # keep the daemon alive; SourceSide.expire sees it stopped
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("mirror source %s failed", self.name)
        finally:
            self.stopped = True

    def _loop(self) -> None:
        v, t = self.v, self.t
        q, mv = v.q, v.mv
        cap, base, mask = v.capacity, v.data_offset, v.capacity - 1
        tail_w, head_w, last_w = ring.W_TAIL, ring.W_HEAD, ring.W_LAST
        at = ring.waiting_offset(self.slot)
        waiting = mv[at:at + 1]
        sem = posix_ipc.Semaphore(self.sem_name)
        stats = self.stats
        pos = self.pos
        put_commit = t.put_commit if self.reliable else None
        relayed = t.relay_link() if relay.ACCELERATED else None
        link = relayed[0] if relayed else None
        try:
            if self.wait_seq is not None:
                while ring.stream_point(v)[1] < self.wait_seq:
                    if self.stopped:
                        return
                    if v.retired():
                        self.error = "source channel retired"
                        return
                    time.sleep(0.002)
                pos, self.start_seq = seq_point(v, self.wait_seq)
                self.pos = pos
            if self.start_seq is not None:
                # Fresh replica, or a hole between what it holds and what we still hold.
                if self.origin is not None and self.origin[0] < pos:
                    t.jump(*self.origin)
                    stats["gaps"] += 1
                    stats["gap_bytes"] += pos - self.origin[0]
                elif self.resume is not None and pos > self.resume:
                    stats["gaps"] += 1
                    stats["gap_bytes"] += pos - self.resume
                t.jump(pos, self.start_seq)
                if self.resume is None or pos > self.resume:
                    self.rlast = hole_last(pos)   # the replica's hole ends in a PAD there
                else:   # it rebased: its last frame (or hole PAD) is at most half a ring back
                    self.rlast = pos - cap // 2
            if relayed is not None:
                # The C pump's export keeps the ring mapped until this thread ends (as the
                # waiting byte's view does): a channel deleted under it is noticed here, by
                # its retired word, never as memory gone from under a send.
                self._attach(v.mm, v.data_offset, cap, at, self.sem_name, relayed[1],
                             self.reliable)
            while not self.stopped:
                if link is not None:
                    # The C pump: sleeps and plain batches, the same steps as below.
                    got = self.pump(link, t)
                    if got == relay.PUMP_RETIRED:
                        self.error = "source channel retired"
                        return
                    if got == relay.PUMP_STOPPED:
                        return
                    if got == relay.PUMP_FAILED:
                        link.close()
                        raise TransportClosed(f"link to {link.remote}: "
                                              f"{os.strerror(self._errno)}")
                    if got == relay.PUMP_CLOSED:
                        raise TransportClosed(f"link to {link.remote} is closed")
                    pos = self.pos   # PUMP_PYTHON: this batch is a case for the loop below
                # SYNC POINT (acquire): pairs with the publisher's tail store (RingWriter._commit).
                tail = q[tail_w]
                if tail == pos:
                    # Sleep like a subscriber: waiting byte, fence, re-check, bounded wait.
                    self._epoch = ring.next_epoch(self._epoch)   # new per sleep: Wakeups.wake
                    waiting[0] = self._epoch
                    fence()
                    if q[tail_w] == pos and not self.stopped:
                        try:
                            sem.acquire(0.05)
                        except posix_ipc.BusyError:
                            if v.retired():
                                self.error = "source channel retired"
                                return
                    waiting[0] = 0
                    continue
                # ``last`` (start of the last frame before tail) is stored before tail by the
                # publisher: last < tail proves it belongs to this tail (as ring.stream_point).
                last = q[last_w]
                spins = 0
                while last >= tail and spins < 10_000:
                    tail = q[tail_w]
                    last = q[last_w]
                    spins += 1
                if last >= tail:
                    last = 0   # publisher died between its two stores: replica keeps its own
                # SYNC POINT (validate): head loaded after tail (pairs with RingWriter._make_room).
                head = q[head_w]
                if head > pos:
                    # The publisher overwrote bytes we had not sent (lossy lapping, or reliable
                    # after the slot was released): a counted hole, then carry on from the
                    # oldest intact frame with its exact sequence number.
                    jpos, jseq = ring.stream_point(v, oldest=True)
                    stats["gaps"] += 1
                    stats["gap_bytes"] += jpos - pos
                    t.jump(jpos, jseq)
                    if jpos > pos:
                        self.rlast = hole_last(jpos)
                    pos = self.pos = jpos
                    if self.credit < pos:
                        self.credit = pos
                    continue
                walked = tail > self.rlast + cap
                if walked:
                    # A batch this long would overwrite the replica's last frame before the
                    # commit (its head would pass its last): cut it at a frame boundary.  Rare:
                    # only when nearly a ring was committed since the last batch.
                    cut = cut_batch(v, pos, self.rlast + cap)
                    if cut is None:
                        continue   # overwritten while we read it: the head check jumps
                    tail, last = cut
                off = pos & mask
                n = tail - pos
                views: tuple[memoryview, ...]
                if off + n <= cap:
                    views = (mv[base + off:base + off + n],)
                else:
                    first = cap - off
                    views = (mv[base + off:base + cap], mv[base:base + n - first])
                if put_commit is not None:
                    # Reliable: our slot keeps the publisher off these bytes, so no seqlock
                    # check is needed between put and commit: one send for both.  pos moves
                    # first (a credit for this batch may arrive before the call returns).
                    pos = self.pos = tail
                    put_commit(pos - n, views, head, tail, last)
                    for view in views:
                        view.release()
                    if last:
                        self.rlast = last
                    self._count(n, last)
                    continue
                t.put(pos, views, head)
                for view in views:
                    view.release()
                pad = 0
                if not self.reliable:
                    # SYNC POINT (seqlock check after the copy): head stored by the publisher
                    # before it overwrote anything; head <= pos now proves every byte sent was
                    # intact when the socket copied it.
                    h2 = q[head_w]
                    if h2 > pos:
                        stats["torn"] += 1
                        if walked or h2 >= tail:
                            # Not committed (spec/ring.md, "Replica rings": torn batches): the
                            # head check at the top jumps past it, exactly counted.
                            continue
                        pad = h2
                # Before the commit goes out: the replica may consume and credit it back before
                # this thread runs again, and on_credit refuses credits beyond self.pos.
                pos = self.pos = tail
                t.commit(tail, last, pad)
                if last and last >= pad:   # (as the replica: a torn last frame is not its last)
                    self.rlast = last
                self._count(n, last)
        finally:
            if link is not None:
                self._detach()
            waiting[0] = 0
            waiting.release()
            sem.close()

    def _count(self, n: int, last: int) -> None:
        self._bytes += n
        self._batches += 1
        if last:
            v = self.v
            seq_end = FRAME.unpack_from(v.mv, v.data_offset + (last & (v.capacity - 1)))[2] + 1
            if v.q[ring.W_HEAD] > last:   # overwritten meanwhile (lossy): skip the stat
                return
            if 0 <= self._seq_end < seq_end:
                self._messages += seq_end - self._seq_end
            self._seq_end = seq_end

    def counters(self) -> dict:
        return {"bytes": self._bytes, "messages": self._messages, "batches": self._batches,
                **self.stats}

    def describe(self) -> dict:
        return {"position": self.pos, "credit": self.credit, "lag_bytes": self.lag(),
                "transport": self.t.kind, "running": not self.stopped, "error": self.error,
                **self.counters(), **self.t.describe()}


class MirrorReplica(relay.ReplicaBase, ReplicaSink):
    """Replica ring writer, driven by a transport's receiving side (one thread at a time).  The
    C base's ``land`` takes a whole batch from a TCP link's read-ahead buffer
    (shimmy/_relaycore.c); ``put_target`` and ``commit`` are its Python twins and take every
    other batch, and all of them without it."""

    def __init__(self, view: ring.RingView, sem_prefix: str):
        self.v = view
        self.q = view.q
        self.mv = view.mv
        self.cap = view.capacity
        self.mask = view.capacity - 1
        self.base = view.data_offset
        self.tail = self.q[ring.W_TAIL]
        self.head = self.q[ring.W_HEAD]
        self.next = self.tail            # where the next put must start
        self.fed = False                 # has a source ever positioned this ring
        self.same_from = 0               # from here on our frame boundaries equal the source's
        self.on_commit: Callable[[], None] | None = None   # after every commit (credit loop)
        self.wakeups = ring.Wakeups(view, sem_prefix)
        self.stats = {"gaps": 0, "gap_bytes": 0, "torn_padded": 0}
        self._bytes = self._batches = self._messages = 0
        self._seq_end = -1               # the number after the last message landed (-1: none)
        self.reset_needed = False
        # After the source's stream restarted below us (its daemon restarted and the publisher
        # reopened before the replicas' position reached it), the replica continues: source
        # positions + ``off`` (a multiple of the capacity, so ring offsets stay equal) are ours,
        # source sequence numbers + ``seq_off`` are ours (frames are renumbered on commit).
        self.off = 0
        self.seq_off = 0
        self.rebases = 0
        self.transport: dict = {"kind": "tcp"}   # what feeds this replica (rdma_mirrors.py)
        if relay.ACCELERATED:
            self._attach(view.mm, view.data_offset, view.capacity)
            view.cores.append(self)   # detached when the view is released

    @property
    def source_tail(self) -> int:
        """Our committed tail in the source's positions (what a mirror request resumes at)."""
        return self.tail - self.off

    @property
    def source_seq(self) -> int:
        """The number of the next message we lack, in the source's numbering (-1: unknown)."""
        return -1 if self._seq_end < 0 else max(self._seq_end - self.seq_off, 0)

    # -- ReplicaSink ---------------------------------------------------------------------------
    def put_target(self, start: int, end: int, guard: int) -> list[memoryview]:
        if self.reset_needed:   # being retired: drain the bytes, touch nothing
            return [memoryview(bytearray(min(end - start, self.cap)))] if end > start else []
        off = self.off
        start += off
        end += off
        guard += off
        if start != self.next:
            if start != self.tail:
                raise ReplicaViolation(f"put at {start}, replica expects {self.next}")
            # Bytes [tail, next) of a put never committed (its mirror was stopped and a new one
            # resumes at our tail): nobody saw them; the new stream replaces them.
            self.next = self.tail
        if end - start > self.cap:
            raise ReplicaViolation(f"put of {end - start} bytes into a {self.cap}-byte ring")
        if guard > self.tail or guard + self.cap < end:
            raise ReplicaViolation(f"guard head {guard} outside [{end - self.cap}, {self.tail}]")
        need = end - self.cap
        if self.head < need:
            last = self.q[ring.W_LAST]
            if guard >= self.same_from:
                # Frame boundaries from same_from on are the source's own.  Never past our
                # last frame (invariant (A)): the source cuts batches so that need <= last.
                h = guard if guard <= last or need > last else last
            else:
                # guard may fall inside a hole this replica PAD-ed (its boundaries differ from
                # the source's there): walk our own frames instead.
                h = self.head
                mv, base, mask = self.mv, self.base, self.mask
                while h < need and h < self.tail:
                    length, flags, _ = FRAME.unpack_from(mv, base + (h & mask))
                    h += length + HEADER if flags & FLAG_PAD else (length + HEADER + 15) & ~15
            self.head = h
            # SYNC POINT (overwrite guard, as RingWriter._make_room): head is stored before any
            # byte of the frames it passes is overwritten by the incoming put.
            self.q[ring.W_HEAD] = h
        self.next = end
        off = start & self.mask
        n = end - start
        base, mv = self.base, self.mv
        if off + n <= self.cap:
            return [mv[base + off:base + off + n]]
        first = self.cap - off
        return [mv[base + off:base + self.cap], mv[base:base + n - first]]

    def commit(self, tail: int, last: int, pad_until: int) -> None:
        if self.reset_needed:
            return
        off = self.off
        if off:
            tail += off
            last = last + off if last else 0
            pad_until = pad_until + off if pad_until else 0
        if tail != self.next:
            raise ReplicaViolation(f"commit of tail {tail}, replica has bytes up to {self.next}")
        if pad_until > self.tail:
            self._pad(self.tail, min(pad_until, tail))
            self.same_from = min(pad_until, tail)
            self.stats["torn_padded"] += 1
        if self.seq_off:
            self._renumber(self.tail, tail)
        self._bytes += tail - self.tail
        self._batches += 1
        if last and last >= pad_until:   # (a last frame inside the padded range was torn)
            if not self.tail <= last < tail:
                raise ReplicaViolation(f"last frame {last} outside the batch [{self.tail}, {tail})")
            seq_end = FRAME.unpack_from(self.mv, self.base + (last & self.mask))[2] + 1
            if 0 <= self._seq_end < seq_end:
                self._messages += seq_end - self._seq_end
            self._seq_end = seq_end
            self.q[ring.W_LAST] = last
        self._commit(tail)

    def _renumber(self, start: int, end: int) -> None:
        """Add ``seq_off`` to the sequence number of every message frame in [start, end) (not
        yet visible to readers): the source's restarted numbering continues ours."""
        mv, base, mask, d = self.mv, self.base, self.mask, self.seq_off
        unpack, pack = FRAME.unpack_from, FRAME.pack_into
        p = start
        while p < end:
            at = base + (p & mask)
            length, flags, seq = unpack(mv, at)
            if flags & FLAG_PAD:
                p += length + HEADER
            else:
                pack(mv, at, length, flags, seq + d)
                p += (length + HEADER + 15) & ~15

    def jump(self, position: int, seq: int) -> None:
        """Move head and tail to ``position``, whose next message has sequence ``seq``."""
        if self.reset_needed:
            return
        if self.tail <= position + self.off < self.next:
            # A put never committed (its mirror was stopped; this is the new mirror's first
            # word): nobody saw those bytes, drop them.  Not a restart of the stream.
            self.next = self.tail
        if position + self.off < self.next:
            # The source's stream restarted below us (its daemon restarted and its publisher
            # reopened before our position reached the new daemon): positions cannot go back
            # under live readers, so we continue: a new position offset (a multiple of the
            # capacity above our tail) and, if its numbering began again, a sequence offset
            # (its next message gets our next number; what the old source held but never sent
            # is then not counted: unknowable).  A replica never fed a message continues the
            # same way: its next number is the one its ring was positioned at.
            ours = ring.stream_point(self.v)[1] if self._seq_end < 0 else self._seq_end
            self.rebases += 1
            self.off = -(-(self.tail - position) // self.cap) * self.cap
            if seq + self.seq_off < ours:
                # Its numbering began again too: its next message gets our next number.
                self.seq_off = ours - seq
            # else it numbers on from ours (a publisher that carried its stream over): the
            # numbers are kept, and any gap is counted from them.
            log.warning("replica %s: source stream restarted at %d (seq %d) below our tail %d: "
                        "continuing at %d", self.v.name, position, seq, self.tail,
                        position + self.off)
            position += self.off
            seq += self.seq_off
            self.next = self.tail
            if position > self.tail:
                self._hole(position, seq)
            else:
                self.same_from = position
            return
        position += self.off
        seq += self.seq_off
        if self.fed and position > self.tail:
            self.stats["gaps"] += 1
            self.stats["gap_bytes"] += position - self.tail
        self.fed = True
        if position == self.tail:
            return
        self._hole(position, seq)

    def _hole(self, position: int, seq: int) -> None:
        old = self.tail
        if position - old > 0xFFFF_FFF0:
            self.reset_needed = True   # a hole beyond one PAD frame's reach: start afresh
            log.warning("replica %s: gap of %d bytes is too large to pad: resetting",
                        self.v.name, position - old)
            return
        # The hole [old, position) becomes PAD frames that readers skip: one spanning
        # [old, lp) (a PAD's length is a stream distance; readers do not care about the wrap)
        # and a PAD [lp, position) that carries seq - 1 and becomes ``last``, so
        # ring.stream_point finds the exact sequence number at the new tail and readers
        # crossing the hole see Message.lost = the exact count.  Never head > tail.
        # lp = position - 16 (a zero-payload PAD), or position - 32 when that would put both
        # headers on one ring offset (a hole of whole rings plus 16 bytes): the second header
        # would overwrite the first, which readers at ``old`` read next (spec/ring.md,
        # "Replica rings").
        lp = position - HEADER
        if lp > old and not (lp - old) & self.mask:
            lp -= HEADER
        mv, base, mask = self.mv, self.base, self.mask
        # Overwrite guard first: the two headers land on ring offsets of older positions; move
        # head past every frame that could share those offsets (>= position - capacity).
        need = position - self.cap
        h = self.head
        while h < need and h < old:
            length, flags, _ = FRAME.unpack_from(mv, base + (h & mask))
            h += length + HEADER if flags & FLAG_PAD else (length + HEADER + 15) & ~15
        h = min(h, old)
        if h > self.head:
            self.head = h
            self.q[ring.W_HEAD] = h
        if lp > old:
            FRAME.pack_into(mv, base + (old & mask), lp - old - HEADER, FLAG_PAD, 0)
        FRAME.pack_into(mv, base + (lp & mask), position - lp - HEADER, FLAG_PAD, seq - 1)
        self.q[ring.W_LAST] = lp
        self.next = position
        self.same_from = position
        self._seq_end = seq
        self._commit(position)

    def consumed(self) -> int:
        """Min position of the ACTIVE subscribers (or our tail), in the source's positions."""
        v, q = self.v, self.q
        low = self.tail
        for slot in range(v.u32[ring.I_SLOT_HIGH]):
            if v.slot_state(slot) == ring.SLOT_ACTIVE:
                p = q[v.slot_word(slot)]
                if p < low:
                    low = p
        return max(low - self.off, 0)

    # -- internals -----------------------------------------------------------------------------
    def _pad(self, start: int, end: int) -> None:
        """Turn ``[start, end)`` (received, not yet committed) into PAD frames."""
        p = start
        while p < end:
            off = p & self.mask
            size = min(self.cap - off, end - p)
            FRAME.pack_into(self.mv, self.base + off, size - HEADER, FLAG_PAD, 0)
            p += size

    def _commit(self, tail: int) -> None:
        q = self.q
        self.tail = tail
        # SYNC POINT (commit): every byte of the batch landed (recv_into returned) before this
        # aligned store; readers acquire it in RingReader.take.
        q[ring.W_TAIL] = tail
        # SYNC POINT (wake-up, Dekker pair with Subscription._wait), as RingWriter._commit.
        fence()
        w = q[ring.W_WAITING0]
        if w and (w != self.wakeups.posted_w0 or w >= ring.WIDE_BIT):
            self.wakeups.wake()
        if self.on_commit is not None:
            self.on_commit()

    def set_link(self, state: int, bump: bool = False) -> None:
        u32 = self.v.u32
        if bump:
            u32[ring.I_LINK_EPOCH] = (u32[ring.I_LINK_EPOCH] + 1) & 0xFFFFFFFF
        u32[ring.I_LINK] = state

    def close(self) -> None:
        self.wakeups.close()
        if relay.ACCELERATED:
            self._detach()
            if self in self.v.cores:
                self.v.cores.remove(self)

    def counters(self) -> dict:
        return {"bytes": self._bytes, "batches": self._batches, "messages": self._messages,
                **self.stats}

    def describe(self) -> dict:
        consumed = self.consumed()
        return {"tail": self.tail, "head": self.head, "consumed": consumed,
                "lag_bytes": self.source_tail - consumed, "rebases": self.rebases,
                "transport": self.transport, **self.counters()}

    def drop_uncommitted(self) -> None:
        self.next = self.tail

    # -- transports that place bytes without this CPU (RDMA, daemon/peer/rdma/) ----------------
    def advance_head(self, need: int, ahead: int) -> int:
        """Store a head >= ``need`` (walking our own frames, up to ``ahead``, never past tail)
        before the source lets bytes land directly in the ring; return the head stored.  Both
        arguments and the result are in the source's positions (``off`` apart from ours)."""
        if self.reset_needed:
            return self.head - self.off
        need += self.off
        ahead += self.off
        if need > self.tail:
            raise ReplicaViolation(f"guard {need} beyond the replica tail {self.tail}")
        # Never past our last frame (invariant (A)) when the batch allows it (the source cuts
        # batches so that it does: need <= last).
        last = self.q[ring.W_LAST]
        target = min(max(need, ahead), last if need <= last else self.tail)
        h = self.head
        mv, base, mask = self.mv, self.base, self.mask
        while h < target:
            length, flags, _ = FRAME.unpack_from(mv, base + (h & mask))
            h += length + HEADER if flags & FLAG_PAD else (length + HEADER + 15) & ~15
        if h > self.head:
            self.head = h
            # SYNC POINT (overwrite guard, as put_target): stored before the source is told.
            self.q[ring.W_HEAD] = h
        return self.head - self.off

    def landed(self, end: int) -> None:
        """Bytes ``[next, end)`` were placed in the ring directly; accept them for the commit
        (``end`` in the source's positions)."""
        if self.reset_needed:
            return
        end += self.off
        if not self.next <= end <= self.tail + self.cap:
            raise ReplicaViolation(f"bytes up to {end} placed; replica expects {self.next}.."
                                   f"{self.tail + self.cap}")
        if self.head < end - self.cap:
            raise ReplicaViolation(f"bytes up to {end} placed over head {self.head}")
        self.next = end
