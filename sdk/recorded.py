"""A subscription that starts in a channel's recording and continues on the live ring.

``Channel.subscribe(start=<seq> | <datetime> | "recorded")`` returns a
:class:`RecordedSubscription`.  The hand-off from the recording to the ring, and why it has no
gap and no duplicate, is argued in spec/ring.md ("Joining from a recording"); the
numbered steps below point there.  It only reads the recording: it must never write it (the
recorder holding the track's ``flock`` is its one writer).
"""

from __future__ import annotations

import datetime as dt
import os
import time
from typing import TYPE_CHECKING, cast

from shimmy import recording, ring
from shimmy.errors import InvalidArgument, MessageOverwritten, ReceiveTimeout
from shimmy.recording import TrackReader
from shimmy.recording_registry import lookup

from .subscription import Message, Subscription

if TYPE_CHECKING:
    from .channel import Channel

HANDOFF_WAIT = 0.5   # seconds the join waits for a recorder that stopped advancing (lossy gaps)
POLL = 0.001         # how often a join waiting for its recorder looks at the catalog


class _FromRecording:
    """The ``Message._src`` of a message read from disk: its bytes are never overwritten."""

    publisher = 0
    node: str | None = None
    pid: int | None = None
    position = -1

    @staticmethod
    def head_at_most(pos: int) -> bool:
        return True

    def release_to(self, pos: int) -> None:
        pass


_FROM_RECORDING = _FromRecording()


def _start_seq(rd: TrackReader, start) -> int | None:
    """Position the reader per ``start``; the first seq wanted (None: whatever the time gives)."""
    if start == "recorded":
        first = rd.q[recording.W_FIRST_SEQ]
        rd.seek_seq(first)
        return first
    if isinstance(start, dt.datetime):
        rd.seek_time(int(start.timestamp() * 1e9))
        return None
    rd.seek_seq(start)
    return start


def check_start(start) -> None:
    if start in ("recorded", "next", "oldest") or isinstance(start, dt.datetime):
        return
    if isinstance(start, int) and not isinstance(start, bool) and start >= 0:
        return
    raise InvalidArgument(f"start must be 'next', 'oldest', 'recorded', a sequence number "
                          f"(int >= 0) or a datetime, got {start!r}")


class RecordedSubscription:
    """Reads ``channel``'s recording from ``start``, then its live ring, with no gap and no
    duplicate.  The receive API of :class:`Subscription` (``receive``, ``receive_nowait``,
    ``receive_bytes``, ``receive_many``, iteration, ``last_seq``, ``lost``, ``close``); the
    asyncio methods are not offered yet."""

    def __init__(self, channel: Channel, start, recording_dir: str | None,
                 spin_us: int | None):
        if channel.max_publishers > 1:
            raise InvalidArgument(f"channel {channel.name!r} is a publisher group: joining it "
                                  f"from a recording is not supported yet")
        cdir = recording_dir and recording.channel_dir(recording_dir, channel.name)
        if cdir is None:
            cdir = lookup(channel._client.path, channel.name)
        track = cdir and os.path.join(cdir, recording.MAIN_TRACK)
        if track is None or not os.path.isfile(os.path.join(track, "catalog")):
            where = recording_dir or "the recordings registered with the daemon"
            raise InvalidArgument(f"start={start!r} needs a recording of channel "
                                  f"{channel.name!r}, and {where} has none (record it with "
                                  f"`shimmy record`)")
        self.channel = channel
        # Step 1: the live slot first, at the oldest message the ring holds.
        live = channel.subscribe("oldest", spin_us=spin_us)
        self._live = live
        try:
            # Step 2: the recording's extent only after the slot exists.
            self._rd = TrackReader(track)
            want = _start_seq(self._rd, start)
        except BaseException:
            live.close()
            raise
        self._expect = self._rd.expect if want is None else want   # next seq to deliver
        self._bound = live._reader._expect    # step 3: recorded messages below this seq
        self._from_disk = self._expect < self._bound
        self._stash: Message | None = None    # a live message held while the gap before it
        self._stalled_at = 0.0                # is filled from the recording (step 5)
        self._lost = 0
        self._synced = False                  # a live message was delivered (receive_many)
        # Step 7: live messages in the first ring's length after our slot's start are copied
        # and checked before they are delivered (a publisher that chose its head before our
        # slot existed may still overwrite them).
        self._check_below = live._reader.position + channel.capacity
        self.closed = False

    # -- the hand-off ---------------------------------------------------------------------
    def _disk(self) -> Message | None:
        """The next recorded message below the bound; None when done (or waiting)."""
        while True:
            got = self._rd.next()
            if got is None:
                if self._rd.expect >= self._bound:
                    self._from_disk = False   # step 3: all of it read
                    return None
                # Step 4: the recording lacks [expect, bound): a lossy recorder behind us, or
                # none running.  Wait while it advances; give up after HANDOFF_WAIT without
                # progress.
                now = time.monotonic()
                if not self._stalled_at:
                    self._stalled_at = now
                elif now - self._stalled_at > HANDOFF_WAIT:
                    self._from_disk = False
                return None
            self._stalled_at = 0.0
            seq, view, _ = got
            if seq >= self._bound:
                self._from_disk = False
                return None
            if seq >= self._expect:
                break
        lost = seq - self._expect
        self._lost += lost
        self._expect = seq + 1
        return self._message(view, seq, lost)

    def _message(self, view: memoryview, seq: int, lost: int) -> Message:
        """A message whose bytes are ours (read from disk, or copied): never overwritten."""
        return Message(cast(Subscription, self), view, seq, lost, -1, -1,
                       cast(ring.RingReader, _FROM_RECORDING))

    def receive_nowait(self) -> Message | None:
        if self.closed:
            self._live._closed()
        while True:
            if self._from_disk:
                msg = self._disk()
                if msg is not None:
                    return msg
                if self._from_disk:
                    return None          # waiting for the recorder (step 4)
            if self._stash is not None:
                msg, self._stash = self._stash, None
                return self._deliver(msg)
            msg = self._live.receive_nowait()
            if msg is None:
                return None
            if msg.seq < self._expect:
                continue                 # step 3: recorded already, or before the start
            gap = msg.seq > self._expect and self._rd.next_seq() > self._expect
            if gap or msg._pos < self._check_below:
                try:
                    data = bytes(msg)    # checked against the head after the copy
                except MessageOverwritten:
                    continue             # overwritten while copied: the next one decides
                copied = self._message(memoryview(data), msg.seq, 0)
                if not gap:
                    self._synced = True
                    return self._deliver(copied)
                # Step 5: lapped; the recording may hold the gap.
                self._stash = copied
                self._bound = msg.seq
                self._rd.seek_seq(self._expect)
                self._from_disk = True
                self._stalled_at = 0.0
                continue
            return self._deliver(msg)

    def _deliver(self, msg: Message) -> Message:
        if msg._src is not _FROM_RECORDING:
            self._synced = True   # a live message delivered in order: the hand-off is done
        msg.lost = msg.seq - self._expect
        self._lost += msg.lost
        self._expect = msg.seq + 1
        return msg

    def receive(self, timeout: float | None = None) -> Message:
        msg = self.receive_nowait()
        if msg is not None:
            return msg
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._from_disk or self._stash is not None:
            msg = self.receive_nowait()
            if msg is not None:
                return msg
            if deadline is not None and time.monotonic() >= deadline:
                raise ReceiveTimeout(f"no message on {self.channel.name!r} within {timeout} s")
            time.sleep(POLL)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return self._live._wait(left, self.receive_nowait)

    def receive_many(self, max_n: int, timeout: float | None = None) -> list[bytes]:
        """Copy path for batches (as :meth:`Subscription.receive_many`): up to ``max_n``
        messages, waiting for the first at most ``timeout``.  From the recording they are read
        in one loop over its buffer; on the ring, a reliable channel's batches come straight
        from the live subscription once the hand-off is done (its numbering then follows
        ours: a reliable slot is never lapped after its first message), anything else one
        message at a time (the hand-off itself included), so its steps hold for every
        message."""
        if not isinstance(max_n, int) or isinstance(max_n, bool) or max_n < 1:
            raise InvalidArgument(f"max_n must be a positive int, got {max_n!r}")
        if self.closed:
            self._live._closed()
        if self._from_disk:
            out, lost = self._rd.read_many(max_n, self._bound)
            if out:
                self._lost += lost
                self._expect = self._rd.expect
                return out
        live = self._live
        if (self._synced and self._stash is None and not self._from_disk
                and self.channel.mode == "reliable" and live._reader._expect == self._expect
                and live._reader.position >= self._check_below):
            before = live.lost
            out = live.receive_many(max_n, timeout)
            self._lost += live.lost - before
            self._expect = live.last_seq + 1
            return out
        return [self.receive_bytes(timeout)]

    def receive_bytes(self, timeout: float | None = None) -> bytes:
        msg = self.receive(timeout)
        try:
            return bytes(msg)
        finally:
            msg.release()

    def _release(self, msg: Message) -> None:
        if msg._src is not _FROM_RECORDING:
            self._live._release(msg)

    @property
    def last_seq(self) -> int:
        return self._expect - 1

    @property
    def lost(self) -> int:
        """Messages missed so far: gaps of a lossy recording, and of a lossy ring after it."""
        return self._lost

    @property
    def replaying(self) -> bool:
        """True while messages come from the recording (before the hand-off to the ring)."""
        return self._from_disk

    def __iter__(self):
        return self

    def __next__(self) -> Message:
        return self.receive()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._live.close()
        self._rd.close()

    def __enter__(self) -> "RecordedSubscription":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
