"""Validation of a ring's words and frames, and where a new reader starts.

What a ring holds may be garbage (a crashed or hostile writer): these functions decide whether
positions and frame headers keep the invariants of spec/ring.md ("Validation", "Crash points")
and raise RingCorrupted naming the channel, what was wrong and the segment offset.  They also
refuse machines the Python ring code is not correct on.  They must never store to a ring: they
only load, so any process (daemon, publisher, subscriber, tool) may call them.
"""

from __future__ import annotations

import platform
from typing import TYPE_CHECKING

from shimmy.errors import RingCorrupted, UnsupportedPlatform
from shimmy.ring.layout import (FLAG_PAD, HEADER, OFF_TAIL, U64, W_HEAD, W_LAST, W_TAIL,
                                _unpack_frame, max_message_size)

if TYPE_CHECKING:
    from shimmy.ring.views import RingView, SegmentView

# The machines whose store order the Python code that stores shared words relies on (the
# Python twins, the slow paths of either build, the daemon's stores): x86-64's total store
# order.  spec/README.md, "What runs where".
TSO_MACHINES = frozenset({"x86_64", "AMD64", "amd64"})
_MACHINE = platform.machine()


def check_architecture(machine: str) -> None:
    """Refuse to map a segment on a machine the Python ring code is not correct on."""
    if machine not in TSO_MACHINES:
        raise UnsupportedPlatform(
            f"this machine is {machine or 'of an unknown architecture'}: Shimmy's Python ring "
            f"code (the pure-Python paths, and the slow paths and daemon stores of every build) "
            f"orders its stores to shared memory only by x86-64's total store order, so it runs "
            f"on x86-64 only (spec/README.md, \"What runs where\")")



def corrupted(view: SegmentView, what: str, offset: int) -> RingCorrupted:
    """The error for a word or frame that breaks the ring's invariants (spec/ring.md,
    "Validation"): names the channel, what was wrong and the byte offset in the segment."""
    kind = "stream" if view.KIND == "stream" else "channel"
    return RingCorrupted(f"{kind} {view.name!r} is corrupted: {what} (segment offset {offset}); "
                         f"delete it (shimmy rm) and open it again")


def check_positions(view: RingView, head: int, last: int, tail: int) -> None:
    """Raise RingCorrupted unless ``head <= last <= tail``, all 16-aligned.

    Holds in every state of the ring, whatever instruction a writer died at (the crash-point
    table in spec/ring.md); the caller loads the three words so that a live publisher
    cannot have moved between them (or retries).  (``tail - head`` may exceed the capacity in
    a replica ring: a hole the mirror filled with one long PAD, daemon/peer/mirror.py.)"""
    if (head | last | tail) & 15:
        raise corrupted(view, f"unaligned position (head {head}, last {last}, tail {tail})",
                        OFF_TAIL)
    if not head <= last <= tail:
        raise corrupted(view, f"positions out of order (head {head}, last {last}, tail {tail}: "
                              f"head <= last <= tail always holds)", OFF_TAIL)


def frame_end(view: RingView, position: int, length: int, flags: int, limit: int) -> int:
    """End position of the frame at ``position`` with header (``length``, ``flags``); raises
    RingCorrupted unless it is a well-formed frame or PAD ending at or before ``limit``."""
    if flags == 0:
        if length > max_message_size(view.capacity):
            raise corrupted(view, f"frame length {length} exceeds the largest message "
                                  f"{max_message_size(view.capacity)}",
                            view.data_offset + (position & (view.capacity - 1)))
        end = position + ((length + HEADER + 15) & ~15)
    elif flags == FLAG_PAD and not length & 15:
        end = position + length + HEADER
    else:
        raise corrupted(view, f"bad frame header (length {length}, flags {flags:#x})",
                        view.data_offset + (position & (view.capacity - 1)))
    if end > limit:
        raise corrupted(view, f"frame at position {position} ends at {end}, past {limit}",
                        view.data_offset + (position & (view.capacity - 1)))
    return end


def stream_point(view: RingView, oldest: bool = False) -> tuple[int, int]:
    """``(position, seq)`` where a new reader starts: the tail (next message) or the head.

    Exact in every state of the ring, a live publisher's or a dead one's (spec/ring.md,
    "Crash points"): the frame header at ``last`` is always complete and is never rewritten while
    ``last`` points at it.  ``last < tail``: it is the last committed frame (or PAD, which
    carries the seq of the message before it), so the tail's seq is its seq + 1.  ``last ==
    tail``: it is a complete frame the publisher wrote but had not committed yet (it stores
    ``last`` before ``tail``): the tail's seq is its own seq (+ 1 for a PAD).  A publisher that
    moves between our loads changes ``tail`` or ``last`` (positions only grow): try again.
    Raises RingCorrupted (naming the channel and offset) for words that break the invariants.
    """
    q, mv, base, mask = view.q, view.mv, view.data_offset, view.capacity - 1
    for _ in range(100_000):
        tail = q[W_TAIL]
        last = q[W_LAST]
        length, flags, seq = _unpack_frame(mv, base + (last & mask))
        head = q[W_HEAD]
        if q[W_TAIL] != tail or q[W_LAST] != last:
            continue
        check_positions(view, head, last, tail)
        if tail == 0:
            return 0, 0
        if last < tail:
            # Normally the frame at ``last`` ends at the tail.  Between the last two stores of a
            # batch commit (RingWriter._commit_batch) it is the batch's first frame: walk the
            # committed frames to the tail.  A PAD's seq field holds the message before it, so
            # + 1 fits both.  A live publisher may move on and overwrite what we walk: any
            # doubt is settled by loading the words again.
            try:
                end = frame_end(view, last, length, flags, tail)
                while end < tail:
                    length, flags, seq = _unpack_frame(mv, base + (end & mask))
                    end = frame_end(view, end, length, flags, tail)
            except RingCorrupted:
                if q[W_TAIL] != tail or q[W_LAST] != last:
                    continue
                raise
            if q[W_TAIL] != tail or q[W_LAST] != last:
                continue
            at_tail = (seq + 1) & U64
        else:
            frame_end(view, last, length, flags, last + view.capacity)
            at_tail = (seq + 1) & U64 if flags else seq
        if not oldest:
            return tail, at_tail
        p = head
        while p < tail:
            length, flags, first = _unpack_frame(mv, base + (p & mask))
            if q[W_HEAD] > p:
                break  # overwritten under us: start again
            if not flags:
                frame_end(view, p, length, flags, tail)
                return p, first
            p = frame_end(view, p, length, flags, tail)
        else:
            return tail, at_tail
    raise RingCorrupted(f"channel {view.name!r}: the publisher moved on 100000 times while its "
                        f"tail was being read")
