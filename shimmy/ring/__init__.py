"""The pub/sub ring (spec/ring.md): one POSIX shared-memory object per channel, one writer, many
readers.  ``from shimmy import ring`` and ``ring.X`` reach everything callers use; the rooms:

* ``layout``  -- offsets, word indexes, the frame header, sizes (the byte layout, in its docstring);
* ``checks``  -- validation (``corrupted``, ``check_positions``, ``frame_end``), ``stream_point``,
  the architecture check;
* ``views``   -- SegmentView and RingView (typed views of a mapping), ``format_ring``;
* ``wakeups`` -- ``fence``, ``next_epoch``, ``Wakeups``;
* ``room``    -- the wait for room: ``open_room``, ``RoomPoster``, ``post_room``;
* ``writer``  -- RingWriter and the daemon's slot stores;
* ``reader``  -- RingReader and GroupReader;
* ``native``  -- the C fast paths (shimmy/_ringcore.c), refused at import where they disagree
  with the Python layout or names.

This file only re-exports and runs the import-time checks; it must never hold ring logic.
"""

from __future__ import annotations

from shimmy.errors import RingCorrupted, UnsupportedPlatform
from shimmy.ring import layout as _layout
from shimmy.ring.checks import (TSO_MACHINES, check_architecture, check_positions, corrupted,
                                frame_end, stream_point)
from shimmy.ring.layout import (CONTROL_SIZE, DEFAULT_CAPACITY, FLAG_PAD, FRAME, HEADER,
                                I_GROUP_EPOCH, I_LINK, I_LINK_EPOCH, I_SLOT_HIGH,
                                LAYOUT_VERSION, LINK_CONFLICT, LINK_DOWN, LINK_LOCAL, LINK_NAMES,
                                LINK_UP, MAGIC, MAX_CAPACITY,
                                MAX_PUBLISHERS_LIMIT, MAX_SEQ_GAP, MAX_SUBSCRIBERS_LIMIT,
                                MIN_CAPACITY, MODE_LOSSY, MODE_NAMES, MODE_RELIABLE, MODES,
                                OFF_CAPACITY, OFF_CREATED, OFF_DATA_OFFSET, OFF_GROUP_EPOCH,
                                OFF_HEAD, OFF_LAST, OFF_LINK, OFF_LINK_EPOCH, OFF_MAGIC,
                                OFF_MAX_SUBS, OFF_MODE, OFF_NAME, OFF_RETIRED, OFF_SLOT_HIGH,
                                OFF_ROOM_WAIT, OFF_STREAM, OFF_TAIL, OFF_VERSION, OFF_WAITING,
                                OFF_WAITS,
                                OFF_WIDE, PAGE, REWIND_MIN_FRAME, ROOM_POLL_FAST,
                                ROOM_POLL_FAST_FOR, SLOT_ACTIVE, SLOT_EVICTED, SLOT_FREE,
                                SLOT_OFF_LOST, SLOT_OFF_STATE, SLOT_SIZE,
                                U64, W_CREATED, W_HEAD, W_LAST, W_RETIRED, W_STREAM, W_TAIL,
                                W_ROOM_WAIT, W_WAITING0, W_WAITS, WIDE_BIT,
                                check_capacity, data_offset, frame_size, max_message_size,
                                segment_size, waiting_offset)
from shimmy.ring.native import (ACCELERATED, CoreMismatch, _core, check_layout, check_lookups,
                                core_layout)
from shimmy.ring.reader import GroupReader, RingReader
from shimmy.ring.room import RoomPoster, open_room, post_room
from shimmy.ring.views import RingView, SegmentView, format_ring
from shimmy.ring.wakeups import Wakeups, fence, next_epoch
from shimmy.ring.writer import (RingWriter, daemon_activate_slot, daemon_set_slot_state)

if _core is not None:   # refuse a C module built for another layout or other names, now
    check_layout(core_layout(), {name: getattr(_layout, name, None) for name in core_layout()
                                 if not name.startswith("S_")})
    check_lookups(_core.LOOKUPS, {"WriterCore": RingWriter, "ReaderCore": RingReader,
                                  "Wakeups": Wakeups})

__all__ = [
    "ACCELERATED", "CONTROL_SIZE", "CoreMismatch", "DEFAULT_CAPACITY", "FLAG_PAD", "FRAME",
    "GroupReader", "HEADER", "I_GROUP_EPOCH", "I_LINK", "I_LINK_EPOCH",
    "I_SLOT_HIGH", "LAYOUT_VERSION", "LINK_CONFLICT",
    "LINK_DOWN", "LINK_LOCAL", "LINK_NAMES", "LINK_UP", "MAGIC", "MAX_CAPACITY",
    "MAX_PUBLISHERS_LIMIT", "MAX_SEQ_GAP", "MAX_SUBSCRIBERS_LIMIT", "MIN_CAPACITY", "MODES",
    "MODE_LOSSY", "MODE_NAMES", "MODE_RELIABLE", "OFF_CAPACITY", "OFF_CREATED",
    "OFF_DATA_OFFSET", "OFF_GROUP_EPOCH", "OFF_HEAD", "OFF_LAST", "OFF_LINK", "OFF_LINK_EPOCH",
    "OFF_MAGIC", "OFF_MAX_SUBS", "OFF_MODE", "OFF_NAME", "OFF_RETIRED", "OFF_ROOM_WAIT",
    "OFF_SLOT_HIGH",
    "OFF_STREAM", "OFF_TAIL", "OFF_VERSION", "OFF_WAITING", "OFF_WAITS", "OFF_WIDE", "PAGE",
    "REWIND_MIN_FRAME", "ROOM_POLL_FAST", "ROOM_POLL_FAST_FOR", "RingCorrupted", "RingReader",
    "RoomPoster",
    "RingView",
    "RingWriter", "SLOT_ACTIVE", "SLOT_EVICTED", "SLOT_FREE", "SLOT_OFF_LOST", "SLOT_OFF_STATE",
    "SLOT_SIZE", "SegmentView", "TSO_MACHINES", "U64", "UnsupportedPlatform", "W_CREATED",
    "W_HEAD", "W_LAST",
    "W_RETIRED", "W_ROOM_WAIT", "W_STREAM", "W_TAIL", "W_WAITING0", "W_WAITS", "WIDE_BIT",
    "Wakeups", "_core",
    "check_architecture", "check_capacity", "check_layout", "check_lookups", "check_positions",
    "core_layout", "corrupted", "daemon_activate_slot", "daemon_set_slot_state", "data_offset",
    "fence", "format_ring", "frame_end", "frame_size", "max_message_size", "next_epoch",
    "open_room", "post_room", "segment_size", "stream_point", "waiting_offset",
]
