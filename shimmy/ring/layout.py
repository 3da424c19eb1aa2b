"""The pub/sub ring's byte layout: offsets, word indexes, the frame header and the sizes.

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
           +352  room_wait u64  publisher: 0, or the position every subscriber must reach for
                 the frame it waits to write to fit (spec/ring.md, "Waiting for room")
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

import struct

MAGIC = 0x474E4952594D4853  # b"SHMYRING" read as a little-endian u64
LAYOUT_VERSION = 2   # 2: PADs committed on their own, carrying the previous seq (head <= last)

MODE_RELIABLE = 0
MODE_LOSSY = 1
MODES = {"reliable": MODE_RELIABLE, "lossy": MODE_LOSSY}
MODE_NAMES = {v: k for k, v in MODES.items()}

PAGE = 4096
CONTROL_SIZE = PAGE
SLOT_SIZE = 64
SLOT_OFF_STATE = 8  # u32 inside a slot's line: SLOT_* (daemon-written)
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
OFF_ROOM_WAIT = 352    # u64, publisher-written: 0, or the position it waits for subscribers
                       # to reach (spec/ring.md, "Waiting for room"); consumers post its room
                       # semaphore when their position reaches it
OFF_SLOT_HIGH = 384
OFF_WAITING = 448
OFF_WIDE = OFF_WAITING + 7    # daemon-written byte: 1 once a slot >= 7 was handed out
MAX_SUBSCRIBERS_LIMIT = CONTROL_SIZE - OFF_WAITING - 1  # a waiting byte each (+ the wide byte)
# Publishers of one channel at once (one member ring each): a subscriber scans every member when
# it arms its wake-up, so this bounds that scan (spec/ring.md, "Publisher groups").
MAX_PUBLISHERS_LIMIT = 1024
# A reliable publisher waiting for room sleeps on the ring's room semaphore (spec/ring.md,
# "Waiting for room").  Without one (a daemon that made none, a ring mapped without a daemon)
# it polls at most every ROOM_POLL_FAST s for its first ROOM_POLL_FAST_FOR s of waiting, then
# backs off to backoff_max (RingWriter._wait_for_space).
ROOM_POLL_FAST = 50e-6
ROOM_POLL_FAST_FOR = 0.01

# A frame of at least REWIND_MIN_FRAME bytes may go back to the start of the ring (after a PAD
# to the wrap point, committed alone) when every subscriber has taken everything but the last
# frame, so a round trip of large messages reuses cache-warm memory instead of walking the
# whole ring: spec/ring.md, "Rewind" (RingWriter._may_rewind, _ringcore.c writer_may_rewind).
REWIND_MIN_FRAME = 1 << 16

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
W_WAITS = OFF_WAITS // 8
W_ROOM_WAIT = OFF_ROOM_WAIT // 8
W_CREATED = OFF_CREATED // 8
W_WAITING0 = OFF_WAITING // 8     # waiting bytes of slots 0-6 + the wide byte, as one u64
WIDE_BIT = 1 << 56                # the wide byte's lowest bit inside that u64
I_SLOT_HIGH = OFF_SLOT_HIGH // 4
W_STREAM = OFF_STREAM // 8
I_LINK = OFF_LINK // 4
I_LINK_EPOCH = OFF_LINK_EPOCH // 4


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



def waiting_offset(slot: int) -> int:
    """Byte offset of ``slot``'s waiting byte: slots 0-6 fill the first u64 word with the
    daemon's wide byte (so a publisher checks up to 7 sleepers, or learns that it must scan
    further, with one load); slots 7 and up follow it."""
    return OFF_WAITING + slot + (slot >= 7)
