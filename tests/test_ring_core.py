"""The ring's per-message paths in C (shimmy/_ringcore.c) against their Python twins.

Every case here goes through the public API with a real daemon and real shared memory.  The
suite runs once with the C paths (where they are built) and once more, for this file and the
other ring tests, with ``SHIMMY_PURE_PYTHON=1`` (Makefile, ``unit``), so both versions must give
the same results: the C paths hand every unusual case (a bytes-like object that is not one run
of bytes, wrap padding, room to make, too large, lapped, lost) to the Python twin.
"""

from __future__ import annotations

import array
import os
import shutil
import sysconfig
import time

import pytest

import shimmy
from shimmy import ring
from shimmy.errors import InvalidArgument, MessageTooLarge, ReceiveTimeout
from shimmy.sdk.subscription import SPIN_BYTES_PER_US
from tests.c_client import needs_c, needs_v2, payload, start, wait_file


def test_the_c_paths_are_built_where_a_compiler_and_headers_exist():
    if os.environ.get("SHIMMY_PURE_PYTHON"):
        assert not ring.ACCELERATED
        pytest.skip("SHIMMY_PURE_PYTHON is set: this run tests the Python versions")
    headers = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    if not (shutil.which("cc") and os.path.exists(headers)):
        pytest.skip("no C compiler or no Python.h here: the Python versions run")
    assert ring.ACCELERATED, "shimmy._ringcore was not built although a compiler is here"


def _pair(daemon, name: str, mode: str = "reliable", capacity: int = 1 << 16,
          rewind: bool = False):
    ch = shimmy.Channel(name, daemon=daemon.socket, mode=mode, capacity=capacity, rewind=rewind)
    return ch, ch.subscribe()


def test_any_bytes_like_object_is_published_as_its_bytes(daemon):
    ch, sub = _pair(daemon, "core/bytes-like")
    wide = array.array("i", [1, 2, 3])
    items = [b"plain", bytearray(b"mutable"), memoryview(b"a view"), wide, memoryview(wide),
             memoryview(b"0123456789")[2:8], b""]
    for item in items:
        ch.publish(item)
    for item in items:
        assert sub.receive_bytes(5) == bytes(memoryview(item).cast("B"))
    with pytest.raises(ValueError, match="contiguous"):
        ch.publish(memoryview(b"0123456789")[::2])
    with pytest.raises(TypeError):
        ch.publish("text is not bytes")   # type: ignore[arg-type]
    ch.publish(b"after the errors")
    assert sub.receive_bytes(5) == b"after the errors"   # nothing half-written in between
    assert sub.lost == 0 and sub.last_seq == len(items)
    ch.close()


@pytest.mark.parametrize("kind", ["list", "tuple", "generator"])
def test_batches_of_every_container_wrap_and_wait_like_single_messages(daemon, kind):
    # 4 KiB ring, 300-byte messages: a batch of 40 crosses the wrap point (a PAD) and, lossy,
    # makes room for itself several times over inside one call.
    ch, sub = _pair(daemon, f"core/batch/{kind}", mode="lossy", capacity=4096)
    messages = [bytes([i]) * (100 + i * 5) for i in range(40)]
    batch = {"list": list, "tuple": tuple, "generator": iter}[kind](messages)
    assert ch.publish_many(batch) == 40
    got = sub.receive_many(100, 5)
    # Lossy and a small ring: the oldest were overwritten before we read; what arrives is the
    # newest messages, intact, in order, and lost counts the rest exactly.
    assert got == messages[len(messages) - len(got):]
    assert sub.lost == 40 - len(got) and sub.last_seq == 39
    ch.close()


def test_a_batch_error_names_the_message_and_keeps_what_came_before(daemon):
    ch, sub = _pair(daemon, "core/batch/too-large", capacity=4096)
    ok = [b"a" * 10, b"b" * 20]
    with pytest.raises(MessageTooLarge, match="message 2 of the batch") as info:
        ch.publish_many([*ok, b"x" * 5000, b"never"])
    assert info.value.published == 2
    assert sub.receive_many(10, 5) == ok
    assert ch.publish_many((b"c", memoryview(b"dd"), array.array("h", [1]))) == 3
    assert sub.receive_many(10, 5) == [b"c", b"dd", bytes(array.array("h", [1]))]
    assert sub.last_seq == 4 and sub.lost == 0
    ch.close()


def test_a_lapped_lossy_reader_counts_every_lost_message(daemon):
    ch, sub = _pair(daemon, "core/lapped", mode="lossy", capacity=4096)
    for i in range(200):          # ~20 ring turns of 64-byte frames while nobody reads
        ch.publish(i.to_bytes(4, "little") * 8)
    got = [sub.receive_bytes(5)]
    while int.from_bytes(got[-1][:4], "little") != 199:
        got += sub.receive_many(1000, 5)
    seqs = [int.from_bytes(m[:4], "little") for m in got]
    assert seqs == list(range(seqs[0], 200))
    assert sub.lost == seqs[0] and sub.last_seq == 199
    ch.close()


def test_a_released_mapping_raises_instead_of_touching_unmapped_memory(daemon):
    ch, sub = _pair(daemon, "core/released")
    ch.publish(b"one")
    writer, reader = ch._writer, sub._reader
    assert writer is not None
    ch.close()   # releases the view (and the C paths' exports) and unmaps the ring
    # (the Python versions meet a released memoryview: ValueError or TypeError, by operation)
    with pytest.raises((ValueError, TypeError)):
        writer.publish(b"two", 1.0)
    with pytest.raises((ValueError, TypeError)):
        reader.take_bytes()
    with pytest.raises((ValueError, TypeError)):
        reader.take_many_bytes(4)


def test_a_numbering_gap_is_counted_where_nothing_was_overwritten(daemon):
    # A publisher that carried its stream into a new ring (Channel.reopen) numbers on from its
    # own count (RingWriter.skip_to): a gap with no lap, which only the seq check sees.
    ch, sub = _pair(daemon, "core/gap")
    ch.publish(b"0")
    assert ch._writer is not None
    ch._writer.skip_to(6)
    ch.publish(b"6")
    ch.publish_many([b"7", b"8"])
    ch._writer.skip_to(20)
    ch.publish(b"20")
    assert sub.receive_bytes(5) == b"0" and sub.lost == 0
    assert sub.receive_bytes(5) == b"6" and (sub.lost, sub.last_seq) == (5, 6)
    assert sub.receive_many(10, 5) == [b"7", b"8", b"20"]
    assert (sub.lost, sub.last_seq) == (16, 20)


def test_loans_and_zero_copy_receives_across_wraps_discards_and_gaps(daemon):
    # 4 KiB ring, reliable: 300-byte loans wrap (a PAD) every dozen; a loan whose block raises
    # publishes nothing; a numbering gap shows as Message.lost on the zero-copy path too.
    ch, sub = _pair(daemon, "core/loan", capacity=4096)
    expect = []
    for i in range(60):
        if i % 7 == 3:
            with pytest.raises(RuntimeError):
                with ch.loan(300) as buf:
                    buf[:] = b"!" * 300
                    raise RuntimeError("discard this one")
        with ch.loan(300) as buf:
            buf[:] = bytes([i]) * 300
        expect.append(bytes([i]) * 300)
        if i == 40:
            assert ch._writer is not None
            ch._writer.skip_to(ch._writer.next_seq + 3)
        msg = sub.receive(5)
        with msg:
            assert bytes(msg.data) == expect[-1]
            assert msg.lost == (3 if i == 41 else 0)
    assert sub.last_seq == 62 and sub.lost == 3
    ch.close()


@pytest.mark.parametrize("how", ["publish", "publish_many", "loan"])
def test_a_deleted_channel_refuses_the_next_publish_at_once(daemon, how):
    # The daemon marks a deleted channel's ring retired; the publisher checks that word on every
    # publish (it used to notice only when it wrapped or waited for room, so messages went into
    # a ring nobody would read while publish kept returning).
    from shimmy.errors import ChannelClosed, ChannelRetired
    from shimmy.sdk.client import get_client
    ch, sub = _pair(daemon, f"core/deleted/{how}", capacity=1 << 20)
    ch.publish(b"before")
    assert sub.receive_bytes(5) == b"before"
    get_client(daemon.socket).request("delete", name=f"core/deleted/{how}")
    with pytest.raises(ChannelRetired, match="retired") as raised:
        if how == "publish":
            ch.publish(b"after")
        elif how == "publish_many":
            ch.publish_many([b"after", b"more"])
        else:
            with ch.loan(5) as buf:
                buf[:] = b"after"
    assert isinstance(raised.value, ChannelClosed), "code catching ChannelClosed keeps working"
    ch.close()


# -- rewind: a large frame goes back to the start of the ring (spec/ring.md, "Rewind") -------

REWIND_CAP = 1 << 20
BIG = 100_000                      # frame 100,016 B: above REWIND_MIN_FRAME, ten fit a lap


def _tail_offset(ch) -> int:
    return ch._view.q[ring.W_TAIL] & (REWIND_CAP - 1)


def _big(i: int) -> bytes:
    return i.to_bytes(4, "little") * (BIG // 4)


@pytest.mark.parametrize("mode", ["reliable", "lossy"])
def test_a_drained_ring_puts_each_large_frame_at_its_start(daemon, mode):
    ch, sub = _pair(daemon, f"core/rewind-{mode}", mode, REWIND_CAP, rewind=True)
    frame = ring.frame_size(BIG)
    for i in range(60):            # six laps' worth: every message at offset 0
        ch.publish(_big(i))
        assert _tail_offset(ch) == frame, f"message {i} was not put at the ring's start"
        assert sub.receive_bytes(5) == _big(i)
    assert sub.lost == 0 and sub.last_seq == 59
    # The receiver's spin ceiling follows the messages' size, not the laps the PADs skipped.
    with pytest.raises(ReceiveTimeout):
        sub.receive_bytes(0.002)
    assert sub._spin_cap <= sub._spin_max + 2 * frame / (SPIN_BYTES_PER_US * 1e6)
    late = ch.subscribe(start="oldest")       # start points read through the PADs
    ch.publish(_big(60))
    assert late.receive_bytes(5) == _big(59) and late.receive_bytes(5) == _big(60)
    assert late.lost == 0
    ch.close()


@pytest.mark.parametrize("mode", ["reliable", "lossy"])
def test_without_rewind_a_drained_ring_keeps_its_whole_capacity_for_bursts(daemon, mode):
    # rewind is the publisher's choice, off by default: frames go on round the ring, so a
    # subscriber that stops after keeping up still has the whole ring between it and the
    # publisher (spec/ring.md, "Rewind": the cost).
    ch, sub = _pair(daemon, f"core/no-rewind-{mode}", mode, REWIND_CAP)
    frame = ring.frame_size(BIG)
    for i in range(5):
        ch.publish(_big(i))
        assert _tail_offset(ch) == (i + 1) * frame
        assert sub.receive_bytes(5) == _big(i)
    burst = REWIND_CAP // frame - 1          # what fits behind the stopped subscriber
    for i in range(5, 5 + burst):
        ch.publish(_big(i), timeout=0)       # reliable: no wait for room
    for i in range(5, 5 + burst):
        assert sub.receive_bytes(5) == _big(i)
    assert sub.lost == 0
    with pytest.raises(InvalidArgument, match="rewind"):
        shimmy.Channel("core/no-rewind-bad", daemon=daemon.socket, rewind="yes")
    ch.close()


def test_a_held_view_is_never_overwritten_by_a_rewind(daemon):
    # The subscriber holds each message's view until its next receive: the publisher alternates
    # between the ring's first two frames, never over the one held.
    ch, sub = _pair(daemon, "core/rewind-held", "reliable", REWIND_CAP, rewind=True)
    frame = ring.frame_size(BIG)
    ch.publish(_big(0))
    held = sub.receive(5)
    offsets = []
    for i in range(1, 40):
        ch.publish(_big(i))
        offsets.append(_tail_offset(ch))
        assert bytes(held.data) == _big(i - 1), "the held message changed under its view"
        held = sub.receive(5)
        assert bytes(held.data) == _big(i)
    assert set(offsets) == {frame, 2 * frame} and offsets[:4] == [2 * frame, frame] * 2
    assert sub.lost == 0
    ch.close()


def test_a_lagging_subscriber_or_small_frames_keep_the_ring_in_order(daemon):
    ch, sub = _pair(daemon, "core/rewind-lag", "reliable", REWIND_CAP, rewind=True)
    frame = ring.frame_size(BIG)
    for i in range(5):             # nothing taken: each frame after the one before
        ch.publish(_big(i))
        assert _tail_offset(ch) == (i + 1) * frame
    for i in range(3):             # two frames not taken: the frame goes after them
        assert sub.receive_bytes(5) == _big(i)
    ch.publish(_big(5))
    assert _tail_offset(ch) == 6 * frame
    for i in (3, 4):               # all but the last taken: back to the start
        assert sub.receive_bytes(5) == _big(i)
    ch.publish(_big(6))
    assert _tail_offset(ch) == frame
    for i in (5, 6):
        assert sub.receive_bytes(5) == _big(i)
    small = ring.frame_size(4096)  # below REWIND_MIN_FRAME: never
    for i in range(20):
        ch.publish(b"s" * 4096)
        assert sub.receive_bytes(5) == b"s" * 4096
        assert _tail_offset(ch) == frame + (i + 1) * small
    ch.close()


def test_a_ring_a_peer_may_mirror_is_never_rewound(daemon):
    # The daemon gives a ring its stream id when it first announces it to peers; a mirror
    # sends PAD bodies too, so such a ring keeps its frames in order (spec/ring.md, "Rewind").
    ch, sub = _pair(daemon, "core/rewind-mirrored", "reliable", REWIND_CAP, rewind=True)
    ch._view.q[ring.W_STREAM] = 12345   # as daemon/peer/sources.py stores it
    frame = ring.frame_size(BIG)
    for i in range(3):
        ch.publish(_big(i))
        assert _tail_offset(ch) == (i + 1) * frame
        assert sub.receive_bytes(5) == _big(i)
    ch.close()


def test_loans_rewind_like_publishes(daemon):
    ch, sub = _pair(daemon, "core/rewind-loan", "reliable", REWIND_CAP, rewind=True)
    frame = ring.frame_size(BIG)
    for i in range(25):
        with ch.loan(BIG) as buf:
            buf[:] = _big(i)
        assert _tail_offset(ch) == frame
        assert sub.receive_bytes(5) == _big(i)
    ch.close()


@needs_c
@needs_v2
@pytest.mark.parametrize("receive", ["view", "copy", "many"])
def test_the_c_library_reads_rewound_frames(daemon, tmp_path, receive):
    # libshimmy's reader (shimmy-c sub) skips the long PADs a Python publisher's rewinds leave.
    name, ready, count = f"core/rewind-c-{receive}", tmp_path / "ready", 120
    sub = start("sub", "--daemon", daemon.socket, "--count", str(count), "--size", str(BIG),
                "--mode", "reliable", "--capacity", str(REWIND_CAP), "--receive", receive,
                "--ready", str(ready), name)
    wait_file(ready, sub)
    ch = shimmy.Channel(name, daemon=daemon.socket, mode="reliable", capacity=REWIND_CAP,
                        rewind=True)
    v = ch._view
    rewound = 0
    for i in range(count):
        ch.publish(payload(i, BIG))
        rewound += _tail_offset(ch) == ring.frame_size(BIG)
        deadline = time.monotonic() + 10   # the C subscriber takes it before the next one
        while any(v.slot_state(s) == ring.SLOT_ACTIVE and v.q[v.slot_word(s)] < v.q[ring.W_TAIL]
                  for s in range(v.u32[ring.I_SLOT_HIGH])) and time.monotonic() < deadline:
            time.sleep(0.0005)
    out, err = sub.communicate(timeout=60)
    ch.close()
    assert sub.returncode == 0, out + err
    assert out.splitlines() == [f"received {count} in order from #0"], out
    assert rewound >= count - 12, f"only {rewound} of {count} frames were rewound"


def test_a_view_held_after_a_rewind_leaves_the_publisher_room(daemon):
    # take() releases the PAD it skips: a view held of a rewound frame must not pin the lap of
    # PAD before it, or the next frame would wait for that view (here: in the same thread).
    ch, sub = _pair(daemon, "core/rewind-pad-release", "reliable", REWIND_CAP, rewind=True)
    for i in range(3):
        ch.publish(_big(i))
        assert sub.receive_bytes(5) == _big(i)
    for i in range(3, 30):
        with ch.loan(BIG, timeout=2) as buf:
            buf[:] = _big(i)
        held = sub.receive(5)
        assert bytes(held.data) == _big(i)
    assert sub.lost == 0
    ch.close()
