"""A process's typed views of a mapped segment, and the daemon's format of a fresh ring.

SegmentView validates a mapping against its kind's header (magic, version, sizes) and gives
``q``/``u32`` word views; RingView adds the pub/sub ring's daemon words.  Views only load,
except ``format_ring``, which the daemon alone calls before anyone else can open the segment;
nothing here may store a word another writer owns (spec/ring.md, "Ownership").
"""

from __future__ import annotations

import mmap
import struct
import time

from shimmy.errors import RingCorrupted
from shimmy.ring.checks import _MACHINE, check_architecture
from shimmy.ring.layout import (CONTROL_SIZE, LAYOUT_VERSION, LINK_NAMES, MAGIC, OFF_CAPACITY,
                                OFF_CREATED, OFF_DATA_OFFSET, OFF_LINK, OFF_MAGIC, OFF_MAX_SUBS,
                                OFF_MODE, OFF_NAME, OFF_RETIRED, OFF_STREAM, OFF_VERSION,
                                SLOT_OFF_LOST, SLOT_OFF_STATE, SLOT_SIZE, data_offset)


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
        return self.u32[(CONTROL_SIZE + slot * SLOT_SIZE + SLOT_OFF_STATE) // 4]

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

