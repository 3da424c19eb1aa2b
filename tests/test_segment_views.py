"""A mapping is validated against its segment kind's header before anything trusts it."""

from __future__ import annotations

import mmap

import pytest

from shimmy import ring, stream_ring
from shimmy.errors import RingCorrupted


def test_wrong_magic_version_and_size_are_refused():
    mm = mmap.mmap(-1, ring.segment_size(4096, 4))
    with pytest.raises(RingCorrupted, match="not a Shimmy ring"):
        ring.RingView(mm)
    with pytest.raises(RingCorrupted, match="not a Shimmy stream"):
        stream_ring.StreamView(mm)
    ring.format_ring(mm, "ok", ring.MODE_LOSSY, 4096, 4)
    view = ring.RingView(mm)
    assert (view.name, view.capacity, view.mode, view.max_subscribers) == ("ok", 4096,
                                                                          ring.MODE_LOSSY, 4)
    view.release()
    mm[ring.OFF_VERSION:ring.OFF_VERSION + 4] = (99).to_bytes(4, "little")
    with pytest.raises(RingCorrupted, match="version 99"):
        ring.RingView(mm)
    mm.close()  # refused views released what they exported, so the mapping closes
    small = mmap.mmap(-1, ring.segment_size(4096, 4) + 4096)
    ring.format_ring(small, "x", ring.MODE_RELIABLE, 4096, 4)
    with pytest.raises(RingCorrupted, match="header says"):
        ring.RingView(small)
    small.close()
