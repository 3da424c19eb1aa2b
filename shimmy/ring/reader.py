"""The readers of a pub/sub ring: one subscriber's cursor (RingReader) and its variant for
one member ring of a multi-publisher channel (GroupReader).

A reader stores only its own slot's position, lost count and waiting byte; it must never store
any other word of the ring, and its per-message path must not allocate beyond the copy a caller
asks for.  Every frame it follows is validated (spec/ring.md, "Validation").
"""

from __future__ import annotations

from typing import NoReturn

import posix_ipc

from shimmy.errors import RingCorrupted
from shimmy.ring.checks import corrupted, frame_end
from shimmy.ring.layout import (FLAG_PAD, HEADER, I_GROUP_EPOCH, MAX_SEQ_GAP, OFF_HEAD, OFF_TAIL,
                                SLOT_OFF_LOST, W_HEAD, W_ROOM_WAIT, W_TAIL, _unpack_frame,
                                max_message_size)
from shimmy.ring.native import _ReaderBase, _core
from shimmy.ring.room import open_room
from shimmy.ring.views import RingView


class RingReader(_ReaderBase):
    """One subscriber's cursor.  It stores only its own slot's position and waiting byte.

    ``take`` hands out frames in place (zero copy): the shared position moves past a frame only
    at the next ``take`` or an explicit ``release_to``, so the publisher cannot reuse bytes the
    caller may still be reading.  ``take_bytes`` copies and releases at once.

    Every frame followed is validated (spec/ring.md, "Validation"): a header that is not
    a frame or PAD within the channel's limits, a position out of bounds or a sequence number
    going backwards raises RingCorrupted naming the channel and offset; nothing else escapes.

    After each store of its position it loads the publisher's ``room_wait`` and posts the
    ring's room semaphore (``room``, the daemon's name for it; None: posts nothing) when the
    publisher waits for a position it reached (spec/ring.md, "Waiting for room").
    """

    def __init__(self, view: RingView, slot: int, position: int, seq: int, publisher: int = 0,
                 node: str | None = None, pid: int | None = None, room: str | None = None):
        self.v = view
        self.slot = slot
        # Who writes this ring, as the daemon told us: Message.publisher/node/pid (0, None, None
        # on a single-publisher channel, whose publisher role may move between processes).
        self.publisher, self.node, self.pid = publisher, node, pid
        self._mv = view.mv
        self._mm = view.mm
        self._q = view.q
        self._mask = view.capacity - 1
        self._base = view.data_offset
        self._max = max_message_size(view.capacity)
        self.position = position   # private cursor: start of the next frame to read
        self._tail = position      # the tail as last loaded (take reloads it when caught up)
        self._pos_word = view.slot_word(slot)
        self._expect = seq          # sequence number of the next frame at our position
        self.padded = 0             # bytes of PADs skipped: position - padded counts frames
        self.lost_total = 0
        self._lost_word = self._pos_word + SLOT_OFF_LOST // 8   # shared copy of lost_total
        self._room_name = room
        self._room: posix_ipc.Semaphore | None = None   # opened at the first post
        self._room_posted = 0      # the room_wait value this reader posted last
        if _core is not None:
            self._attach(view.mm, view.data_offset, view.capacity, self._max, self._pos_word * 8,
                         self._GROUP, room)
            view.cores.append(self)

    # GroupReader: tail reloads go through its ``_reload`` hook (its turn and epoch checks), in
    # Python in both builds.  take and take_bytes are the one take path of both readers.
    _GROUP = False

    def _reload(self, p: int) -> int:
        raise NotImplementedError   # only a GroupReader's take paths call it (_GROUP)

    def head_at_most(self, pos: int) -> bool:
        """True while the frame at ``pos`` has not been overwritten (pairs with _make_room)."""
        return self._q[W_HEAD] <= pos

    def release_to(self, pos: int) -> None:
        # SYNC POINT (consumption): tells the publisher (min_position) that bytes before ``pos``
        # may be overwritten.  Stored only after the caller is done with them.
        q = self._q
        q[self._pos_word] = pos
        if q[W_ROOM_WAIT]:   # SYNC POINT (room wait, consumer side): no fence, spec/ring.md
            self._room_reached(pos)

    def _room_reached(self, pos: int) -> None:
        """After a store of ``pos`` found ``room_wait`` set: post the room semaphore once per
        value at most ``pos`` (spec/ring.md, "Waiting for room")."""
        need = self._q[W_ROOM_WAIT]
        if need and need <= pos and need != self._room_posted:
            self._room_posted = need
            self._post_room()

    def _post_room(self) -> None:
        """Post the room semaphore, opened at the first post.  None to post (no name, or gone
        with its channel): nothing, the publisher's bounded sleep covers it.  (_ringcore.c's
        take paths post the same semaphore through a handle of their own, sharing
        ``_room_posted`` with these.)"""
        if self._room is None:
            self._room = open_room(self._room_name)
            if self._room is None:
                self._room_name = None
                return
        try:
            self._room.release()
        except (posix_ipc.Error, OSError, ValueError):
            pass   # at SEM_VALUE_MAX: the publisher has posts enough to wake

    def has_data(self) -> bool:
        """Cheap check for the spin loop: has the publisher committed past our cursor?"""
        return self._q[W_TAIL] != self.position

    def _take_py(self):
        """Release everything before the cursor, then return the next frame in place as
        ``(pos, payload_offset, length, seq, lost)``, or None when caught up."""
        q = self._q
        p = self.position
        q[self._pos_word] = p  # SYNC POINT (consumption), see release_to
        if q[W_ROOM_WAIT]:     # SYNC POINT (room wait, consumer side), see release_to
            self._room_reached(p)
        while True:
            if p == self._tail:
                # SYNC POINT (acquire): pairs with the publisher's tail store in _commit.  A
                # group member's reload goes through its hook (GroupReader._reload).
                t = self._reload(p) if self._GROUP else q[W_TAIL]
                if t == p:
                    return None
                if t < p or t & 15:
                    self._bad_tail(t)
                self._tail = t
            off = self._base + (p & self._mask)
            length, flags, seq = _unpack_frame(self._mv, off)
            # SYNC POINT (validate): load head after the header; head <= p means the header
            # was intact when read (pairs with the head store in RingWriter._make_room).
            head = q[W_HEAD]
            if head > p:
                p = self._resync(head)
                continue
            if flags:
                p = self.position = self._pad_end(p, length, flags)
                # Released at once: a view held of the frame after it pins that frame only,
                # not the PAD too (after a rewind, a lap of it: spec/ring.md, "Rewind").
                q[self._pos_word] = p   # SYNC POINT (consumption), as at the top
                if q[W_ROOM_WAIT]:
                    self._room_reached(p)
                continue
            end = p + ((length + HEADER + 15) & ~15)
            if length > self._max or end > self._tail:
                self._bad_frame(p, length, flags)   # validate: within limits and committed
            self.position = end
            lost = seq - self._expect
            if lost:
                self._count_lost(p, seq, lost)
            self._expect = seq + 1
            return p, off + HEADER, length, seq, lost

    def _take_bytes_py(self):
        """Copy the next message out and release it: its bytes, or None when caught up.

        Its sequence number is then ``expected_seq - 1``; messages missed before it were added
        to ``lost_total``.  A frame overwritten while being copied (lossy mode) is skipped
        without advancing the expected sequence number, so the next message's loss counts it:
        this never returns torn bytes and never raises for it.

        Its loop repeats _take_py's frame steps (reload, header, head check, PAD, bounds) line
        for line, on purpose: a shared helper would cost a Python call per message on the pure
        Python build's hot path, and C holds the same steps once more (_ringcore.c).
        """
        q = self._q
        while True:
            p = self.position
            if p == self._tail:
                # SYNC POINT (acquire), as in take (and its group hook)
                t = self._reload(p) if self._GROUP else q[W_TAIL]
                if t == p:
                    return None
                if t < p or t & 15:
                    self._bad_tail(t)
                self._tail = t
            off = self._base + (p & self._mask)
            length, flags, seq = _unpack_frame(self._mv, off)
            head = q[W_HEAD]                  # SYNC POINT (validate header), as in take
            if head > p:
                self._resync(head)
                continue
            if flags:
                self.position = end = self._pad_end(p, length, flags)
                # released too: a dead group publisher's ring may end at a PAD committed alone
                q[self._pos_word] = end       # SYNC POINT (consumption), as below
                if q[W_ROOM_WAIT]:
                    self._room_reached(end)
                continue
            end = p + ((length + HEADER + 15) & ~15)
            if length > self._max or end > self._tail:
                self._bad_frame(p, length, flags)
            start = off + HEADER
            data = self._mm[start:start + length]   # one copy, straight into a bytes object
            self.position = end
            if q[W_HEAD] > p:                 # SYNC POINT (validate payload): overwritten
                continue                      # while copied: counted by the next message
            q[self._pos_word] = end           # SYNC POINT (consumption): copied, release it
            if q[W_ROOM_WAIT]:                # SYNC POINT (room wait), see release_to
                self._room_reached(end)
            lost = seq - self._expect
            if lost:
                self._count_lost(p, seq, lost)
            self._expect = seq + 1
            return data

    def _take_many_bytes_py(self, max_n: int,
                            out: list[bytes] | None = None) -> list[bytes] | None:
        """Copy up to ``max_n`` committed messages out, oldest first, and release them with one
        position store; None when caught up.  Same validation and lossy handling as
        :meth:`take_bytes` (a frame overwritten while copied is skipped and counted as lost).
        ``out``: the messages the C path copied before it handed over, appended to."""
        q = self._q
        mv, mm, mask, base, largest = self._mv, self._mm, self._mask, self._base, self._max
        if out is None:
            out = []
        append = out.append
        p = self.position
        try:
            while len(out) < max_n:
                if p == self._tail:
                    t = q[W_TAIL]             # SYNC POINT (acquire), as in take
                    if t == p:
                        break
                    if t < p or t & 15:
                        self._bad_tail(t)
                    self._tail = t
                off = base + (p & mask)
                length, flags, seq = _unpack_frame(mv, off)
                head = q[W_HEAD]              # SYNC POINT (validate header), as in take
                if head > p:
                    p = self._resync(head)
                    continue
                if flags:
                    p = self.position = self._pad_end(p, length, flags)
                    continue
                end = p + ((length + HEADER + 15) & ~15)
                if length > largest or end > self._tail:
                    self._bad_frame(p, length, flags)
                start = off + HEADER
                data = mm[start:start + length]
                if q[W_HEAD] > p:             # SYNC POINT (validate payload), as in take_bytes
                    p = self.position = end   # overwritten while copied: counted by the next
                    continue
                lost = seq - self._expect
                if lost:
                    self._count_lost(p, seq, lost)
                p = self.position = end
                self._expect = seq + 1
                append(data)
        except RingCorrupted:
            # The messages copied before the bad frame are delivered (their consumption is
            # stored below); the next call starts at the bad frame and raises, as take_bytes.
            if not out:
                raise
        finally:
            # SYNC POINT (consumption): every message before ``p`` was copied (or skipped).
            q[self._pos_word] = self.position
            if q[W_ROOM_WAIT]:                # SYNC POINT (room wait), see release_to
                self._room_reached(self.position)
        return out or None

    if _core is None:   # pure Python: the reference versions are the fast paths
        take = _take_py
        take_bytes = _take_bytes_py
        take_many_bytes = _take_many_bytes_py

    # -- validation and lapping (off the per-message path) ----------------------------------
    def _pad_end(self, p: int, length: int, flags: int) -> int:
        if flags != FLAG_PAD or length & 15 or p + length + HEADER > self._tail:
            self._bad_frame(p, length, flags)
        self.padded += length + HEADER
        return p + length + HEADER

    def _bad_frame(self, p: int, length: int, flags: int) -> NoReturn:
        frame_end(self.v, p, length, flags, self._tail)   # raises, naming what was wrong
        raise corrupted(self.v, f"frame at position {p} (length {length}, flags {flags:#x}) "
                                f"is not a valid frame", self._base + (p & self._mask))

    def _bad_tail(self, t: int) -> NoReturn:
        raise corrupted(self.v, f"tail {t} is behind this subscriber's position {self.position} "
                                f"or unaligned", OFF_TAIL)

    def _count_lost(self, p: int, seq: int, lost: int) -> None:
        if lost < 0 or lost > MAX_SEQ_GAP:
            raise corrupted(self.v, f"frame at position {p} has seq {seq}, expected "
                                    f"{self._expect} or a later one within {MAX_SEQ_GAP}",
                            self._base + (p & self._mask))
        self.lost_total += lost
        self._q[self._lost_word] = self.lost_total   # shared copy for the daemon's metrics

    def _resync(self, head: int) -> int:
        """We were lapped (lossy mode, or evicted): jump to the oldest intact frame."""
        if head & 15 or head > self._q[W_TAIL]:
            raise corrupted(self.v, f"head {head} is unaligned or past the tail", OFF_HEAD)
        self.position = head
        if self._tail < head:
            self._tail = head
        return head


class GroupReader(RingReader):
    """A subscriber's cursor in one member ring of a multi-publisher channel.

    ``take`` and ``take_bytes`` are RingReader's; their tail reload calls :meth:`_reload`, which
    adds two checks, i.e. once per batch (the frames committed at the last reload), never per
    message:

    * ``merged`` (the subscription reads several members): after a batch the reader returns
      None once (``turn``), so the subscription moves on to the next member; each member
      delivers at most one batch per round, so no publisher starves another;
    * when the channel ring's group epoch (``group``, a u32 view of the channel's ring) differs
      from ``group_epoch`` it returns None, so the subscription asks the daemon for the member
      list before it reads on: a busy subscriber misses a new publisher for one batch at most.

    spec/ring.md, "Publisher groups".
    """

    def __init__(self, view: RingView, slot: int, position: int, seq: int, group: memoryview,
                 group_epoch: int, publisher: int = 0, node: str | None = None,
                 pid: int | None = None, room: str | None = None):
        super().__init__(view, slot, position, seq, publisher, node, pid, room)
        self._gq = group
        self.group_epoch = group_epoch
        self.merged = False   # set by the subscription while it reads more than one member
        self.turn = False     # a batch was loaded while merged: yield once when it is done

    _GROUP = True

    def _reload(self, p: int) -> int:
        """RingReader's tail reload (the take paths' hook, once per batch): the tail, or ``p``
        (caught up, so the take returns None) when this member must yield first: its batch is
        done while merging (``turn``), or the group epoch moved.  _ringcore.c's take and
        take_bytes hand every tail reload of a member to the Python take for it."""
        if self.turn:     # merging: this batch is done, the other members go first
            self.turn = False
            return p
        if self._gq[I_GROUP_EPOCH] != self.group_epoch:
            return p      # a publisher joined or left: the subscription refreshes first
        t = self._q[W_TAIL]   # SYNC POINT (acquire), as in RingReader._take_py
        if t > p and not t & 15:   # a batch the take path accepts: yield after it when merging
            self.turn = self.merged
        return t
