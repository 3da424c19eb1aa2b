"""The pub/sub ring: byte layout, the single writer, and the readers.

One ring is one POSIX shared-memory object created and sized by the node daemon.  The full byte
layout, the ownership of every word and the memory-ordering argument are in
``spec/ring.md``; the constants below are the source of truth for the offsets::

    0      control page (4 KiB)
           +0    magic "SHMYRING" | +8 layout version u32 | +12 mode u32
           +16   capacity u64     | +24 max_subscribers u32 | +28 data_offset u32
           +32   created_ns u64   | +40 retired u64 (daemon: 1 = do not use, reopen)
           +48   link u32 (daemon: replica link state, LINK_*) | +52 link_epoch u32 (daemon:
                 reconnects of the replica's link) -- written only by the daemon of a replica
           +56   group epoch u32 (daemon: bumped whenever a publisher's member ring is added to
                 or removed from a multi-publisher channel; spec/ring.md, "Publisher groups")
           +64   name length u32 + name bytes (up to 200)            -- all daemon, write-once
           +320  tail u64       publisher: end of the last committed frame (commit word)
           +328  head u64       publisher: start of the oldest intact frame
           +336  last u64       publisher: start of the last complete frame (stored before tail)
           +344  waits u64      publisher: times it waited for room (reliable back-pressure)
           +384  slot_high u32  daemon: 1 + highest subscriber slot ever handed out
           +448  waiting bytes: slot s at 448 + s + (s >= 7), written only by subscriber s
                 (0 = awake, else its sleep epoch); +455 wide u8 (daemon: a slot >= 7 exists)
    4096   slot table: max_subscribers x 64 B, one cache line per subscriber
           +0 position u64 (subscriber i) | +8 state u32 (daemon) | +12 generation u32 (daemon)
           +16 pid u32 (daemon) | +24 lost u64 (daemon zeroes it, then subscriber i counts
           the messages it lost; read by the daemon's metrics at scrape time)
    data_offset (page aligned): capacity bytes of frames

Positions (tail, head, subscriber positions) are byte offsets in an endless stream; the ring
offset is ``position & (capacity - 1)``.  A frame is a 16-byte header (length u32, flags u32,
seq u64) followed by the payload, padded to 16 bytes; frames never straddle the wrap point (the
writer fills the end with a PAD frame, committed on its own, instead).  The crash-consistency
argument (what survivors see whatever instruction a writer dies at) is in spec/ring.md.
"""

from __future__ import annotations

import importlib
import mmap
import os
import platform
import secrets
import struct
import time
from typing import Any, NoReturn

import posix_ipc

from shimmy.errors import (BackpressureTimeout, ChannelClosed, ChannelRetired, LimitExceeded,
                           MessageTooLarge, PermissionDenied, RingCorrupted, UnsupportedPlatform)

# The per-message paths in C (shimmy/_ringcore.c): RingWriter and RingReader subclass its types
# and keep every other path, and the reference version of each fast path (``_publish_py``,
# ``_take_bytes_py``, ...), here.  Built at install time where a C compiler is found; without it,
# or with SHIMMY_PURE_PYTHON=1 in the environment, the Python versions are the fast paths.
_core: Any
try:
    if os.environ.get("SHIMMY_PURE_PYTHON"):
        raise ImportError("SHIMMY_PURE_PYTHON is set")
    _core = importlib.import_module("shimmy._ringcore")
except ImportError:
    _core = None
ACCELERATED = _core is not None
_WriterBase: Any = _core.WriterCore if _core else object
_ReaderBase: Any = _core.ReaderCore if _core else object

MAGIC = 0x474E4952594D4853  # b"SHMYRING" read as a little-endian u64
LAYOUT_VERSION = 2   # 2: PADs committed on their own, carrying the previous seq (head <= last)

MODE_RELIABLE = 0
MODE_LOSSY = 1
MODES = {"reliable": MODE_RELIABLE, "lossy": MODE_LOSSY}
MODE_NAMES = {v: k for k, v in MODES.items()}

PAGE = 4096
CONTROL_SIZE = PAGE
SLOT_SIZE = 64
SLOT_OFF_LOST = 24  # u64 inside a slot's line: messages its subscriber lost (subscriber-written)

# Byte offsets inside the control page.  Words written by different processes sit on different
# 64-byte cache lines so that a subscriber's stores never invalidate the publisher's line.
OFF_MAGIC = 0
OFF_VERSION = 8
OFF_MODE = 12
OFF_CAPACITY = 16
OFF_MAX_SUBS = 24
OFF_DATA_OFFSET = 28
OFF_CREATED = 32
OFF_RETIRED = 40
OFF_LINK = 48          # u32, daemon-written: state of the peer link feeding a replica ring
OFF_LINK_EPOCH = 52    # u32, daemon-written: bumped on every reconnect of that link
OFF_GROUP_EPOCH = 56   # u32, daemon-written: membership epoch of a multi-publisher channel
I_GROUP_EPOCH = OFF_GROUP_EPOCH // 4
OFF_STREAM = 272       # u64, daemon-written: id of the stream this ring holds (0 = none yet);
                       # after the longest name (64 + 4 + 200 bytes), before the publisher's line
OFF_NAME = 64
OFF_TAIL = 320
OFF_HEAD = 328
OFF_LAST = 336
OFF_WAITS = 344        # u64, publisher-written: back-pressure waits (slow path only)
OFF_SLOT_HIGH = 384
OFF_WAITING = 448
OFF_WIDE = OFF_WAITING + 7    # daemon-written byte: 1 once a slot >= 7 was handed out
MAX_SUBSCRIBERS_LIMIT = CONTROL_SIZE - OFF_WAITING - 1  # a waiting byte each (+ the wide byte)
# Publishers of one channel at once (one member ring each): a subscriber scans every member when
# it arms its wake-up, so this bounds that scan (spec/ring.md, "Publisher groups").
MAX_PUBLISHERS_LIMIT = 1024
# A reliable publisher waiting for room polls at most every ROOM_POLL_FAST s for its first
# ROOM_POLL_FAST_FOR s of waiting, then backs off to backoff_max (RingWriter._wait_for_space).
ROOM_POLL_FAST = 50e-6
ROOM_POLL_FAST_FOR = 0.01

# Link states (OFF_LINK).  A channel published on this node stays LINK_LOCAL; a replica of a
# channel published on another node is LINK_UP while its mirror streams and LINK_DOWN while the
# daemon reconnects (messages resume, or a counted gap is reported, when it comes back).
LINK_LOCAL = 0
LINK_UP = 1
LINK_DOWN = 2
LINK_CONFLICT = 3  # published elsewhere with another mode/capacity: nothing arrives (peering.md)
LINK_NAMES = {LINK_LOCAL: "local", LINK_UP: "up", LINK_DOWN: "down", LINK_CONFLICT: "conflict"}

# Slot states (daemon-written).
SLOT_FREE = 0
SLOT_ACTIVE = 1
SLOT_EVICTED = 2  # the owner lost its lease; the publisher ignores it, the slot is not reused yet

HEADER = 16
FLAG_PAD = 1
U64 = (1 << 64) - 1
# A reader treats a jump in sequence numbers of more than this many messages as corruption (a
# garbage seq), not loss: more than 10**12 messages lost in one gap.
MAX_SEQ_GAP = 1 << 40
FRAME = struct.Struct("<IIQ")  # length, flags, seq
_pack_frame = FRAME.pack_into
_unpack_frame = FRAME.unpack_from

# u64 / u32 word indexes of the hot words (byte offset // width), precomputed for the hot paths.
W_TAIL = OFF_TAIL // 8
W_RETIRED = OFF_RETIRED // 8
W_HEAD = OFF_HEAD // 8
W_LAST = OFF_LAST // 8
W_WAITING0 = OFF_WAITING // 8     # waiting bytes of slots 0-6 + the wide byte, as one u64
WIDE_BIT = 1 << 56                # the wide byte's lowest bit inside that u64
I_SLOT_HIGH = OFF_SLOT_HIGH // 4
W_STREAM = OFF_STREAM // 8
I_LINK = OFF_LINK // 4
I_LINK_EPOCH = OFF_LINK_EPOCH // 4

# The full memory barrier of the wake-up handshake (spec/ring.md, "Wake-up protocol").  Posting a
# process-private semaphore is one LOCK-prefixed read-modify-write in glibc's sem_post, a full
# fence on x86-64, and costs about 25 ns from Python (an uncontended lock acquire+release, the
# other candidate, about 75 ns).  The semaphore is unlinked at once, so it never shows in
# /dev/shm; it only counts up, and is replaced when it reaches SEM_VALUE_MAX (once per 2**31
# fences).  It is created on the first fence, never at import: ``import shimmy`` must work on a
# full or read-only /dev/shm.
def _new_fence_semaphore() -> posix_ipc.Semaphore:
    while True:
        name = f"/shimmy-fence-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX)
        except posix_ipc.ExistentialError:
            continue
        except posix_ipc.PermissionsError as exc:
            raise PermissionDenied(
                f"cannot create the process's fence semaphore {name!r} in /dev/shm: {exc}; "
                f"Shimmy needs a writable /dev/shm (mount it read-write, or give this uid access)"
            ) from None
        except OSError as exc:   # ENOSPC, ENOMEM, EMFILE, ENFILE: a resource ran out
            raise LimitExceeded(
                f"cannot create the process's fence semaphore {name!r} in /dev/shm: "
                f"{os.strerror(exc.errno) if exc.errno else exc} (it needs one small "
                f"semaphore: free space in /dev/shm or raise the open-file limit)"
            ) from None
        except posix_ipc.Error as exc:
            raise LimitExceeded(f"cannot create the process's fence semaphore {name!r} in "
                                f"/dev/shm: {exc}") from None
        sem.unlink()
        return sem


def _install_fence_semaphore() -> None:
    global _fence_post
    _fence_post = _new_fence_semaphore().release


def _first_fence() -> None:
    """``_fence_post`` until the first fence: create the semaphore, then fence with it."""
    _install_fence_semaphore()
    _fence_post()


_fence_post = _first_fence


def _fence_overflowed() -> None:
    _install_fence_semaphore()
    _fence_post()


def fence() -> None:
    try:
        _fence_post()
    except OSError:   # EOVERFLOW after 2**31 posts: start a fresh counter (and still fence)
        _fence_overflowed()


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


MIN_CAPACITY = 4096
MAX_CAPACITY = 1 << 30
DEFAULT_CAPACITY = 1 << 22  # 4 MiB


def max_message_size(capacity: int) -> int:
    """Largest payload a ring of ``capacity`` bytes accepts.

    Half the ring less one header: a frame of that size plus the worst padding at the wrap point
    still fits, so a reliable publisher can always make progress once subscribers catch up.
    """
    return capacity // 2 - HEADER


def frame_size(length: int) -> int:
    """Bytes a frame with ``length`` payload bytes occupies (header + payload, 16-aligned)."""
    return (length + HEADER + 15) & ~15


def check_capacity(capacity: int) -> int:
    if not isinstance(capacity, int) or isinstance(capacity, bool):
        raise ValueError(f"capacity must be an int, got {type(capacity).__name__}")
    if capacity < MIN_CAPACITY or capacity > MAX_CAPACITY or capacity & (capacity - 1):
        raise ValueError(
            f"capacity {capacity} must be a power of two between {MIN_CAPACITY} and {MAX_CAPACITY}"
        )
    return capacity


def data_offset(max_subscribers: int) -> int:
    table = CONTROL_SIZE + max_subscribers * SLOT_SIZE
    return (table + PAGE - 1) // PAGE * PAGE


def segment_size(capacity: int, max_subscribers: int) -> int:
    return data_offset(max_subscribers) + capacity


class SegmentView:
    """A process's mapping of one of the daemon's segments (a pub/sub ring or a byte stream)
    plus typed views of its words, validated against the segment kind's header.

    ``q`` views the mapping as u64 words, ``u32`` as u32 words; index = byte offset // width.
    Aligned 8-byte loads and stores through a ``memoryview.cast("Q")`` compile to one ``mov`` on
    x86-64 and are single-copy atomic there (see spec/ring.md for the full argument).
    Both kinds keep magic (+0), version (+8), capacity (+16), retired (+40) and name (+64) at the
    same offsets; where the data area starts is a u32 at ``DATA_OFFSET_AT``.
    """

    KIND = "ring"
    MAGIC = MAGIC
    LAYOUT_VERSION = LAYOUT_VERSION
    DATA_OFFSET_AT = OFF_DATA_OFFSET

    def __init__(self, mm: mmap.mmap):
        check_architecture(_MACHINE)
        self.mm = mm
        self.cores: list = []   # RingWriter/RingReader objects whose C paths export the mapping
        self.mv = memoryview(mm)
        self.q = self.mv.cast("Q")
        self.u32 = self.mv.cast("I")
        try:
            self._validate()
        except RingCorrupted:
            self.release()
            raise

    def _validate(self) -> None:
        kind = self.KIND
        if len(self.mm) < CONTROL_SIZE or self.q[OFF_MAGIC // 8] != self.MAGIC:
            raise RingCorrupted(f"shared-memory segment is not a Shimmy {kind} (bad magic)")
        version = self.u32[OFF_VERSION // 4]
        if version != self.LAYOUT_VERSION:
            raise RingCorrupted(f"{kind} layout version {version}, this library speaks "
                                f"{self.LAYOUT_VERSION}: refused (a client uses only the layout "
                                f"versions it implements; spec/README.md, \"Versioning\")")
        self.capacity = self.q[OFF_CAPACITY // 8]
        self.data_offset = self.u32[self.DATA_OFFSET_AT // 4]
        if len(self.mm) != self.data_offset + self.capacity:
            raise RingCorrupted(f"{kind} segment is {len(self.mm)} bytes, header says "
                                f"{self.data_offset + self.capacity}")
        n = self.u32[OFF_NAME // 4]
        self.name = bytes(self.mv[OFF_NAME + 4:OFF_NAME + 4 + n]).decode()

    def retired(self) -> bool:
        return self.q[OFF_RETIRED // 8] != 0

    def release(self) -> None:
        """Drop the typed views (and the C paths' exports); the mapping can then be closed."""
        for core in self.cores:
            core._detach()
        self.cores.clear()
        for view in (self.u32, self.q, self.mv):
            view.release()


class RingView(SegmentView):
    """A mapped pub/sub ring (layout in the module docstring)."""

    def _validate(self) -> None:
        super()._validate()
        self.mode = self.u32[OFF_MODE // 4]
        self.max_subscribers = self.u32[OFF_MAX_SUBS // 4]

    def stream_id(self) -> int:
        """Id of the stream this ring holds (daemon word; 0 until the daemon names one)."""
        return self.q[OFF_STREAM // 8]

    def link_state(self) -> str:
        """'local', 'up', 'down' or 'conflict': the peer link feeding this ring (daemon word)."""
        return LINK_NAMES.get(self.u32[OFF_LINK // 4], "down")

    def slot_word(self, slot: int) -> int:
        """u64 index of a slot's position word."""
        return (CONTROL_SIZE + slot * SLOT_SIZE) // 8

    def slot_state(self, slot: int) -> int:
        return self.u32[(CONTROL_SIZE + slot * SLOT_SIZE + 8) // 4]

    def slot_pid(self, slot: int) -> int:
        return self.u32[(CONTROL_SIZE + slot * SLOT_SIZE + 16) // 4]

    def slot_lost(self, slot: int) -> int:
        """Messages the subscriber in ``slot`` lost since it was handed the slot."""
        return self.q[(CONTROL_SIZE + slot * SLOT_SIZE + SLOT_OFF_LOST) // 8]


def format_ring(mm: mmap.mmap, name: str, mode: int, capacity: int, max_subscribers: int) -> None:
    """Write a fresh control page (daemon only, before anyone else can open the segment)."""
    mv = memoryview(mm)
    struct.pack_into("<QIIQII", mv, 0, MAGIC, LAYOUT_VERSION, mode, capacity, max_subscribers,
                     data_offset(max_subscribers))
    struct.pack_into("<QQ", mv, OFF_CREATED, time.time_ns(), 0)
    # The header name is what errors and tools show; at most 200 bytes fit before OFF_STREAM
    # (a channel name is at most 200 characters; a longer peer alias of a group member is cut).
    raw = name.encode()[:OFF_STREAM - OFF_NAME - 4 - 4]
    struct.pack_into("<I", mv, OFF_NAME, len(raw))
    mv[OFF_NAME + 4:OFF_NAME + 4 + len(raw)] = raw
    mv.release()


def waiting_offset(slot: int) -> int:
    """Byte offset of ``slot``'s waiting byte: slots 0-6 fill the first u64 word with the
    daemon's wide byte (so a publisher checks up to 7 sleepers, or learns that it must scan
    further, with one load); slots 7 and up follow it."""
    return OFF_WAITING + slot + (slot >= 7)


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
    view.u32[(base + 8) // 4] = SLOT_ACTIVE


def daemon_set_slot_state(view: RingView, slot: int, state: int) -> None:
    view.u32[(CONTROL_SIZE + slot * SLOT_SIZE + 8) // 4] = state


def _as_bytes(data) -> memoryview:
    view = memoryview(data)
    if not view.c_contiguous:
        raise ValueError("publish needs a contiguous buffer")
    return view.cast("B")


def next_epoch(epoch: int) -> int:
    """The sleep epoch a waiter stores in its waiting byte next (cycles 1..255, never 0)."""
    return epoch % 255 + 1


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


class Wakeups:
    """Posts the semaphores of a ring's sleeping subscribers, for whichever process writes the
    ring (the publisher's RingWriter, or a replica's MirrorReplica in the daemon).

    A waiting byte holds its sleeper's epoch (1..255, new on every arming), and each epoch is
    posted once: a subscriber that wakes and sleeps again is always seen as new, while one that
    has not run yet is not posted again by every commit (each post to a sleeping futex is a
    syscall).  ``posted_w0`` is the first waiting word as of the last scan; the writer's commit
    path compares the live word with it and calls :meth:`wake` only when they differ (or the
    daemon's wide byte says slots past the first word exist).
    """

    def __init__(self, view: RingView, sem_prefix: str):
        self.v = view
        self._sem_prefix = sem_prefix
        self._posted = bytearray(view.max_subscribers)
        self.posted_w0 = 0
        self._sems: dict[int, posix_ipc.Semaphore] = {}

    def slot_high(self) -> int:
        """The daemon's slot_high word, validated (a garbage value must not index past the
        slot table)."""
        high = self.v.u32[I_SLOT_HIGH]
        if high > self.v.max_subscribers:
            raise corrupted(self.v, f"slot_high {high} exceeds max_subscribers "
                                    f"{self.v.max_subscribers}", OFF_SLOT_HIGH)
        return high

    def wake(self) -> None:
        """Post every subscriber asleep on an epoch not posted yet."""
        high = self.slot_high()
        flags = bytes(self.v.mv[OFF_WAITING:OFF_WAITING + high + 1])  # + the wide byte
        posted = self._posted
        for slot in range(high):
            epoch = flags[slot + (slot >= 7)]
            if epoch and epoch != posted[slot]:
                posted[slot] = epoch
                self.post(slot)
        self.posted_w0 = int.from_bytes(flags[:8].ljust(8, b"\0"), "little")

    def post_all(self) -> None:
        """Post every slot, asleep or not (something every subscriber must re-check changed)."""
        for slot in range(self.slot_high()):
            self.post(slot)

    def post(self, slot: int) -> None:
        sem = self._sems.get(slot)
        if sem is None:
            try:
                sem = posix_ipc.Semaphore(self._sem_prefix + str(slot))
            except posix_ipc.ExistentialError:
                return  # never handed out, or gone with its channel
            self._sems[slot] = sem
        sem.release()

    def close(self) -> None:
        for sem in self._sems.values():
            try:
                sem.close()
            except posix_ipc.Error:
                pass
        self._sems.clear()


class RingWriter(_WriterBase):
    """The one publisher of a ring.  Single-writer: only the process the daemon granted the
    publisher role may construct one; it alone stores tail, head, last and frame bytes.

    ``wakeups`` posts the subscribers found asleep after a commit.  ``publish`` and
    ``publish_many`` are shimmy/_ringcore.c's where it is built: the common case in C, the rest
    through ``_publish_py`` / ``_publish_one_of_batch`` / ``_publish_many_py`` below.
    """

    def __init__(self, view: RingView, wakeups: Wakeups, backoff_max: float = 0.001):
        self.v = view
        self._mm = view.mm
        self._wakeups = wakeups
        self._mv = view.mv
        self._q = view.q
        self._cap = view.capacity
        self._mask = view.capacity - 1
        self._base = view.data_offset
        self._reliable = view.mode == MODE_RELIABLE
        self.max_message = max_message_size(view.capacity)
        self._backoff_max = backoff_max
        # The publisher role may move between processes over time (one at a time); it resumes
        # from the words its predecessor stored, whatever instruction that one died at.
        self._resume()
        if _core is not None:
            self._attach(view.mm, view.data_offset, view.capacity, self.max_message)
            view.cores.append(self)

    def _resume(self) -> None:
        q = self._q
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
        # (too large, wrap padding, room to make) goes through _reserve.
        if off + size > self._cap or tail + size > self._limit or n > self.max_message:
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
            _fence_post()              # SYNC POINT (wake-up fence), see _commit
        except OSError:
            _fence_overflowed()
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
            _fence_post()              # SYNC POINT (wake-up fence), as in _commit
        except OSError:
            _fence_overflowed()
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
        FRAME.pack_into(self._mv, pos, n, 0, self._seq)
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
        frame overlaps: spec/ring.md, "Crash points").  Otherwise only head may be stored
        here, so an abandoned reservation leaves the ring unchanged to readers.
        """
        if n > self.max_message:
            self._too_large(n)
        size = frame_size(n)
        tail = self._tail
        off = tail & self._mask
        room = self._cap - off
        if size > room:
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
        self._q[OFF_WAITS // 8] += 1   # slow path only; this process alone writes the word
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        # Poll every few tens of µs for the first ROOM_POLL_FAST_FOR s: room usually comes
        # soon (a local subscriber's next take, a remote replica's next credit, a few hundred
        # µs away when a peer streams large messages).  A wait longer than that is a slow
        # subscriber: back off up to backoff_max between checks.
        fast_until = now + ROOM_POLL_FAST_FOR
        delay = 0.000_02
        while True:
            floor = self.min_position()
            if end - floor <= self._cap:
                return floor
            if self.v.retired():
                self._closed()
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise BackpressureTimeout(
                    f"channel {self.v.name!r}: no room for {end - self._tail} bytes after waiting "
                    f"{timeout} s for the slowest subscriber (publish_timeout)"
                )
            time.sleep(delay if deadline is None else min(delay, max(deadline - now, 0)))
            delay = min(delay * 2, ROOM_POLL_FAST if now < fast_until else self._backoff_max)


def _batch_error(exc: MessageTooLarge | BackpressureTimeout | ChannelClosed,
                 index: int) -> Exception:
    """``exc`` raised for message ``index`` of a ``publish_many`` batch: the same class, its text
    prefixed with the index, ``published`` = the messages of the batch committed before it."""
    out = type(exc)(f"message {index} of the batch (the {index} before it were published): "
                    f"{exc}")
    out.published = index
    return out


class RingReader(_ReaderBase):
    """One subscriber's cursor.  It stores only its own slot's position and waiting byte.

    ``take`` hands out frames in place (zero copy): the shared position moves past a frame only
    at the next ``take`` or an explicit ``release_to``, so the publisher cannot reuse bytes the
    caller may still be reading.  ``take_bytes`` copies and releases at once.

    Every frame followed is validated (spec/ring.md, "Validation"): a header that is not
    a frame or PAD within the channel's limits, a position out of bounds or a sequence number
    going backwards raises RingCorrupted naming the channel and offset; nothing else escapes.
    """

    def __init__(self, view: RingView, slot: int, position: int, seq: int, publisher: int = 0,
                 node: str | None = None, pid: int | None = None):
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
        self.lost_total = 0
        self._lost_word = self._pos_word + SLOT_OFF_LOST // 8   # shared copy of lost_total
        if _core is not None:
            self._attach(view.mm, view.data_offset, view.capacity, self._max, self._pos_word * 8,
                         self._GROUP)
            view.cores.append(self)

    _GROUP = False   # GroupReader: tail reloads (its turn and epoch checks) stay in Python

    def head_at_most(self, pos: int) -> bool:
        """True while the frame at ``pos`` has not been overwritten (pairs with _make_room)."""
        return self._q[W_HEAD] <= pos

    def release_to(self, pos: int) -> None:
        # SYNC POINT (consumption): tells the publisher (min_position) that bytes before ``pos``
        # may be overwritten.  Stored only after the caller is done with them.
        self._q[self._pos_word] = pos

    def has_data(self) -> bool:
        """Cheap check for the spin loop: has the publisher committed past our cursor?"""
        return self._q[W_TAIL] != self.position

    def _take_py(self):
        """Release everything before the cursor, then return the next frame in place as
        ``(pos, payload_offset, length, seq, lost)``, or None when caught up."""
        q = self._q
        p = self.position
        q[self._pos_word] = p  # SYNC POINT (consumption), see release_to
        while True:
            if p == self._tail:
                # SYNC POINT (acquire): pairs with the publisher's tail store in _commit.
                t = q[W_TAIL]
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
        """
        q = self._q
        while True:
            p = self.position
            if p == self._tail:
                t = q[W_TAIL]                 # SYNC POINT (acquire), as in take
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
        return out or None

    if _core is None:   # pure Python: the reference versions are the fast paths
        take = _take_py
        take_bytes = _take_bytes_py
        take_many_bytes = _take_many_bytes_py

    # -- validation and lapping (off the per-message path) ----------------------------------
    def _pad_end(self, p: int, length: int, flags: int) -> int:
        if flags != FLAG_PAD or length & 15 or p + length + HEADER > self._tail:
            self._bad_frame(p, length, flags)
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

    ``take`` and ``take_bytes`` are RingReader's, line for line (keep them in step), with two
    checks more where the tail is reloaded, i.e. once per batch (the frames committed at the
    last reload), never per message:

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
                 pid: int | None = None):
        super().__init__(view, slot, position, seq, publisher, node, pid)
        self._gq = group
        self.group_epoch = group_epoch
        self.merged = False   # set by the subscription while it reads more than one member
        self.turn = False     # a batch was loaded while merged: yield once when it is done

    def _take_py(self):
        """RingReader._take_py, plus None when the group epoch moved (checked at tail
        reloads); _ringcore.c's take calls it at every tail reload of a member."""
        q = self._q
        p = self.position
        q[self._pos_word] = p  # SYNC POINT (consumption), see release_to
        while True:
            if p == self._tail:
                if self.turn:     # merging: this batch is done, the other members go first
                    self.turn = False
                    return None
                if self._gq[I_GROUP_EPOCH] != self.group_epoch:
                    return None   # a publisher joined or left: the subscription refreshes first
                # SYNC POINT (acquire): pairs with the publisher's tail store in _commit.
                t = q[W_TAIL]
                if t == p:
                    return None
                if t < p or t & 15:
                    self._bad_tail(t)
                self._tail = t
                self.turn = self.merged
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

    _GROUP = True

    def _take_bytes_py(self):
        """RingReader._take_bytes_py, plus None when the group epoch moved (at tail reloads);
        _ringcore.c's take_bytes calls it at every tail reload of a member."""
        q = self._q
        while True:
            p = self.position
            if p == self._tail:
                if self.turn:     # merging: this batch is done, the other members go first
                    self.turn = False
                    return None
                if self._gq[I_GROUP_EPOCH] != self.group_epoch:
                    return None   # a publisher joined or left: the subscription refreshes first
                t = q[W_TAIL]                 # SYNC POINT (acquire), as in take
                if t == p:
                    return None
                if t < p or t & 15:
                    self._bad_tail(t)
                self._tail = t
                self.turn = self.merged
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
            lost = seq - self._expect
            if lost:
                self._count_lost(p, seq, lost)
            self._expect = seq + 1
            return data

    if _core is None:
        take = _take_py
        take_bytes = _take_bytes_py
