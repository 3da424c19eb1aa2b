"""Pub/sub channels: ``Channel`` (open a ring, publish, loan, subscribe, reopen after a daemon
restart); the receiving side is :mod:`.subscription`.

The daemon is asked once for a ring (and, lazily, for the publisher role or a subscriber slot);
after that every publish and receive goes straight to the shared mapping.  A channel writes only
the words its publisher owns (spec/ring.md, one writer per shared word); it must never write
after ``fork()`` in the child (the parent's publisher would then have two writers).
"""

from __future__ import annotations

import datetime as _dt
import itertools
import mmap
import os
import weakref
from types import EllipsisType


from shimmy import ring
from shimmy.errors import (ChannelClosed, ChannelRetired, InvalidArgument, MessageTooLarge,
                           ShimmyError)
from shimmy.names import validate_name

from .client import fork_generation, get_client, open_shared_memory
from .group import GroupSubscription
from .recorded import RecordedSubscription, check_start
from .subscription import DEFAULT_SPIN_US, Message, Subscription

__all__ = ["Channel", "Loan", "Message", "Subscription"]

DEFAULT_PUBLISH_TIMEOUT = 10.0   # seconds a reliable publisher waits for room, then raises

_open_channels: "weakref.WeakSet[Channel]" = weakref.WeakSet()
_channel_keys = itertools.count(1)   # tells the daemon which of our Channel objects publishes


def _invalidate_after_fork() -> None:
    """In a forked child, every channel and subscription of the parent stops working (they
    would otherwise write the parent's tail or slot position: two writers of one word)."""
    for ch in list(_open_channels):
        ch._writer = None          # publish() then goes through _check(), which refuses
        for sub in ch._subs:
            sub.closed = True


os.register_at_fork(after_in_child=_invalidate_after_fork)


class Loan:
    """The context manager :meth:`Channel.loan` returns (a class, not a generator: cheaper)."""

    __slots__ = ("_writer", "_n", "_view")

    def __init__(self, writer: ring.RingWriter, n: int, view: memoryview):
        self._writer, self._n, self._view = writer, n, view

    def __enter__(self) -> memoryview:
        return self._view

    def __exit__(self, exc_type, exc, tb) -> None:
        self._view.release()
        if exc_type is None:
            self._writer.commit_claim(self._n)


class Channel:
    """A named pub/sub channel on this node (created by the daemon if absent).

    ``mode`` is ``"reliable"`` (a full ring makes the publisher wait, bounded by
    ``publish_timeout``, then raise BackpressureTimeout) or ``"lossy"`` (the publisher never
    waits; lapped subscribers see ``Message.lost``).  ``max_publishers`` is how many processes
    may publish at once (the daemon's ``default_max_publishers`` when not given, 1 unless
    configured: a second publisher then gets PublisherBusy); with more than one, each publisher
    writes a ring of its own and subscribers merge them (spec/ring.md, "Publisher
    groups").  ``mode``, ``capacity`` and ``max_publishers`` are fixed when the channel is
    created; ``None`` accepts whatever the existing channel has.

    ``rewind=True`` is this publisher's choice for large messages (64 KiB and up): when every
    subscriber has kept up, the next one goes back to the start of the ring, whose memory is
    still warm in the caches, instead of on to memory last touched a lap ago. Round trips of
    large messages get faster; the price is burst room: a subscriber that stops just after a
    rewind leaves the publisher only the room before it, not the whole ring, until it reads on
    (spec/ring.md, "Rewind"). Off by default, so the ring's capacity is the burst it absorbs.
    """

    def __init__(self, name: str, *, daemon: str | None = None, mode: str | None = None,
                 capacity: int | None = None, spin_us: int | None = None,
                 publish_timeout: float | None = DEFAULT_PUBLISH_TIMEOUT,
                 max_publishers: int | None = None, rewind: bool = False):
        self.name = validate_name(name)
        if mode is not None and mode not in ring.MODES:
            raise InvalidArgument(f"mode must be one of {sorted(ring.MODES)}, got {mode!r}")
        if capacity is not None:
            try:
                ring.check_capacity(capacity)
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from None
        if spin_us is not None and (not isinstance(spin_us, int) or spin_us < 0):
            raise InvalidArgument(f"spin_us must be a non-negative int, got {spin_us!r}")
        if max_publishers is not None and (not isinstance(max_publishers, int) or
                                           isinstance(max_publishers, bool) or
                                           max_publishers < 1):
            raise InvalidArgument(f"max_publishers must be a positive int, got "
                                  f"{max_publishers!r}")
        if not isinstance(rewind, bool):
            raise InvalidArgument(f"rewind must be True or False, got {rewind!r}")
        self.rewind = rewind
        self.spin_us = DEFAULT_SPIN_US if spin_us is None else spin_us
        self.publish_timeout = publish_timeout
        self._fork_gen = fork_generation()
        self._daemon = daemon
        self._client = get_client(daemon)
        reply = self._client.request("open", name=self.name, mode=mode, capacity=capacity,
                                     max_publishers=max_publishers)
        self.publisher_id = 0   # this object's publisher id once it publishes (groups)
        self._key = next(_channel_keys)
        self._member: tuple[mmap.mmap, ring.RingView] | None = None   # our member ring (group)
        self._writer: ring.RingWriter | None = None
        self._subs: list[Subscription] = []
        # subscriptions a reopen cut short let go of; the next reopen binds them again
        self._orphans: list[Subscription] = []
        self.closed = False
        self._map(reply)
        _open_channels.add(self)

    def _map(self, reply: dict) -> None:
        """Map the ring an ``open`` reply names (and its wake-up semaphores); when that fails,
        nothing of this channel changed."""
        mm, view = _map_ring(reply["shm"])
        try:
            wakeups = ring.Wakeups(view, reply["sem_prefix"])
        except BaseException:
            view.release()
            mm.close()
            raise
        self._mm, self._view, self._wakeups = mm, view, wakeups
        self.mode = reply["mode"]
        self.max_publishers = reply.get("max_publishers", 1)
        self.capacity = reply["capacity"]
        self.max_message = reply["max_message"]
        self._sem_prefix = reply["sem_prefix"]
        # The ring's room semaphore: its publisher sleeps on it while it waits for room, its
        # subscribers post it (spec/ring.md, "Waiting for room"); None from a daemon without.
        self._room_sem: str | None = reply.get("room_sem")

    def reopen(self) -> None:
        """Open the channel again after ``ChannelClosed`` because its daemon restarted (also
        after a SIGKILL of the daemon).  Raises ``DaemonUnavailable`` while no daemon answers
        (nothing changes then: call it again).

        A publisher carries its stream into the new ring: the messages its old ring still holds
        (from the oldest, or in reliable mode from the oldest one a subscriber or a peer's
        mirror had not consumed) are published again with their own sequence numbers, and the
        numbering continues.  Replicas on other nodes resume by sequence number, so they lose
        nothing the old ring held and count what it no longer held exactly in
        ``Message.lost`` (docs/peering.md, "Restarts and links").  Subscriptions of this
        channel continue on the new ring from its next message (the same objects); where the
        numbering went on (a replica of another node's channel, a carried stream), the first
        message's ``lost`` counts what was missed.

        A reopen that raises part way (the new daemon went in its turn) leaves the publisher on
        its old ring: the next reopen carries the same stream from it again.
        """
        if self._fork_gen != fork_generation():
            raise ChannelClosed(f"channel {self.name!r} was opened before fork(); open it again "
                                f"in this process")
        client = get_client(self._daemon)
        reply = client.request("open", name=self.name, mode=self.mode, capacity=self.capacity)
        old_view, old_mm, old_wakeups, writer = self._view, self._mm, self._wakeups, self._writer
        # A publisher group's member ring is not carried (its messages were the group's own
        # stream; a new member ring starts a new one) and its subscriptions end (subscribe again).
        member, self._member = self._member, None
        plan = _carry_plan(old_view, writer) if writer is not None and member is None else None
        for sub in self._subs:
            if not sub.closed:
                sub._drop()
                if not isinstance(sub, GroupSubscription):
                    self._orphans.append(sub)
        self._subs = []
        self._client = client
        self._writer = None
        self.publisher_id = 0
        try:
            self._map(reply)
            self.closed = False
            if plan is not None:
                self._client.request("publish", name=self.name, carry={
                    "stream": plan[0], "position": plan[1], "seq": plan[2]})
                new = ring.RingWriter(self._view, self._wakeups, rewind=self.rewind,
                                      room=self._room_sem)
                _carry(old_view, plan[1], new, plan[3], self.publish_timeout)
                self._writer = new
            while self._orphans:
                sub = self._orphans[0]
                reply = self._client.request("subscribe", name=self.name, start="next")
                sub._rebind(reply["slot"], reply["position"], reply["seq"])
                self._subs.append(sub)
                del self._orphans[0]
        except BaseException:
            # Cut short (the new daemon went too, before or during the carry): back to the
            # old ring and its writer, the only copy of what no replica received, so the next
            # reopen carries the stream from it again (docs/peering.md, "Restarts and links").
            self._orphans[:0] = self._subs
            for sub in self._subs:
                sub._drop()
            self._subs = []
            if self._view is not old_view:
                _unmap(self._wakeups, self._view, self._mm)
            self._view, self._mm, self._wakeups = old_view, old_mm, old_wakeups
            self._writer, self._member = writer, member
            raise
        if member is not None:
            member[1].release()
            try:
                member[0].close()
            except BufferError:
                pass  # a caller still holds a Message view of it
        _unmap(old_wakeups, old_view, old_mm)

    # -- publishing ---------------------------------------------------------------------------
    def _check(self) -> None:
        if self.closed:
            raise ChannelClosed(f"channel {self.name!r} is closed")
        if self._fork_gen != fork_generation():
            raise ChannelClosed(f"channel {self.name!r} was opened before fork(); open it again "
                                f"in this process")
        if self._view.retired():
            raise ChannelRetired.of(self.name)

    def _become_publisher(self) -> ring.RingWriter:
        self._check()
        reply = self._client.request("publish", name=self.name, key=self._key)
        member = reply.get("member")
        if member is None:
            self._writer = ring.RingWriter(self._view, self._wakeups, rewind=self.rewind,
                                           room=self._room_sem)
            return self._writer
        # A publisher group: our own member ring, whose subscribers sleep on the channel's
        # semaphores (the same slot index in every member).
        if self._member is None:
            self._member = _map_ring(member["shm"])
            self._wakeups.close()
            self._wakeups = ring.Wakeups(self._member[1], self._sem_prefix)
        self.publisher_id = member["id"]
        self._writer = ring.RingWriter(self._member[1], self._wakeups, rewind=self.rewind,
                                       room=member.get("room_sem"))
        return self._writer

    def publish(self, data, *, timeout: float | None | EllipsisType = ...) -> int:
        """Copy ``data`` (any bytes-like object) into the ring; return its sequence number."""
        writer = self._writer
        if writer is None or self.closed:
            writer = self._become_publisher()
        return writer.publish(data, self.publish_timeout if timeout is ... else timeout)

    def publish_many(self, messages, *, timeout: float | None | EllipsisType = ...) -> int:
        """Publish every message of the iterable ``messages`` (each bytes-like), in order, with
        one commit for the whole batch; return how many were published.

        Subscribers see the batch at once (one wake-up instead of one per message).  It is
        committed in parts only where it must be: at the ring's wrap point and where a reliable
        channel has to wait for room (``timeout`` bounds each such wait, as in :meth:`publish`).
        A message that is too large raises :class:`MessageTooLarge`, a wait that runs out
        :class:`BackpressureTimeout`: both name the message's index in the batch, and the
        messages before it are published (the error's ``published`` says how many).
        """
        writer = self._writer
        if writer is None or self.closed:
            writer = self._become_publisher()
        return writer.publish_many(messages, self.publish_timeout if timeout is ... else timeout)

    def loan(self, n: int, *, timeout: float | None | EllipsisType = ...) -> "Loan":
        """Zero-copy publish: ``with ch.loan(n) as buf:`` gives a writable memoryview of ``n``
        bytes inside the ring.

        The message is committed when the block exits normally and discarded (never visible to
        subscribers, no sequence number used) when it raises.  The view is released at the end
        of the block.  Room is reserved when ``loan()`` is called, so use it in a ``with``.
        """
        if not isinstance(n, int) or n < 0:
            raise InvalidArgument(f"loan size must be a non-negative int, got {n!r}")
        if n > self.max_message:
            raise MessageTooLarge(f"loan of {n} bytes exceeds the largest message "
                                  f"{self.max_message} bytes of channel {self.name!r}")
        writer = self._writer
        if writer is None or self.closed:
            writer = self._become_publisher()
        return Loan(writer, n, writer.claim(n, self.publish_timeout if timeout is ... else timeout))

    # -- subscribing --------------------------------------------------------------------------
    def subscribe(self, start: str | int | _dt.datetime = "next", *,
                  spin_us: int | None = None, recording: str | None = None):
        """A new subscription; ``start="oldest"`` begins at the oldest message still held.

        ``start`` may also be a sequence number (``int``), a ``datetime``, or ``"recorded"``
        (the oldest message of the channel's recording): the subscription then reads the
        recording from there and continues on the live ring with no gap and no duplicate
        (docs/recording.md).  The recording is the one registered with the daemon by its
        recorder, or the one under the recording directory ``recording``.
        """
        self._check()
        if start not in ("next", "oldest"):
            check_start(start)
            return RecordedSubscription(self, start, recording, spin_us)
        reply = self._client.request("subscribe", name=self.name, start=start)
        sub: Subscription
        if "members" in reply:
            sub = GroupSubscription(self, reply, self.spin_us if spin_us is None else spin_us)
        else:
            sub = Subscription(self, reply["slot"], reply["position"], reply["seq"],
                               self.spin_us if spin_us is None else spin_us)
        self._subs.append(sub)
        return sub

    # -- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for sub in list(self._subs):
            sub.close()
        self._wakeups.close()
        if self._fork_gen == fork_generation() and not self._client.closed:
            try:
                self._client.request("close", name=self.name, key=self._key)
            except ShimmyError:
                pass  # the daemon is gone; nothing of ours to give back
        self._writer = None
        maps = [(self._view, self._mm)]
        if self._member is not None:
            maps.append((self._member[1], self._member[0]))
            self._member = None
        for view, mm in maps:
            view.release()
            try:
                mm.close()
            except BufferError:
                pass  # a caller still holds a Message view; the mapping lives until dropped

    def __enter__(self) -> "Channel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self) -> "Channel":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()   # never blocks for long: one bounded daemon request

    def __repr__(self) -> str:
        return (f"<shimmy.Channel {self.name!r} mode={self.mode} capacity={self.capacity} "
                f"max_publishers={self.max_publishers}>")


def _map_ring(shm_name: str) -> tuple[mmap.mmap, ring.RingView]:
    """Map the ring in shared memory ``shm_name`` (its descriptor closed once mapped)."""
    shm = open_shared_memory(shm_name)
    try:
        mm = mmap.mmap(shm.fd, shm.size)
    finally:
        shm.close_fd()
    return mm, ring.RingView(mm)


def _unmap(wakeups: ring.Wakeups, view: ring.RingView, mm: mmap.mmap) -> None:
    """Let go of a ring ``Channel._map`` mapped, and of its wake-up semaphores."""
    wakeups.close()
    view.release()
    try:
        mm.close()
    except BufferError:
        pass  # a caller still holds a Message view of it


def _carry_plan(view: ring.RingView, writer: ring.RingWriter) -> tuple[int, int, int, int]:
    """What a publisher carries from its old ring: ``(stream id, start position, seq at the
    start, next seq)``.  It starts at the oldest intact frame; in reliable mode at the oldest
    position an ACTIVE slot (a subscriber, a peer's mirror) had not consumed, when later.  The
    old daemon is gone, so nothing but this process writes the ring any more."""
    q = view.q
    tail, head = q[ring.W_TAIL], q[ring.W_HEAD]
    start = head
    if view.mode == ring.MODE_RELIABLE:
        low = writer.min_position()
        if head < low <= tail:
            start = low
    return view.stream_id(), start, _first_seq(view, start, tail, writer.next_seq), \
        writer.next_seq


def _frames(view: ring.RingView, start: int, tail: int):
    """``(position, length, flags, seq)`` of every frame in ``[start, tail)``, validated."""
    mv, base, mask = view.mv, view.data_offset, view.capacity - 1
    p = start
    while p < tail:
        length, flags, seq = ring.FRAME.unpack_from(mv, base + (p & mask))
        end = ring.frame_end(view, p, length, flags, tail)
        yield p, length, flags, seq
        p = end


def _first_seq(view: ring.RingView, start: int, tail: int, next_seq: int) -> int:
    for _, _, flags, seq in _frames(view, start, tail):
        if not flags:
            return seq
    return next_seq


def _carry(old: ring.RingView, start: int, writer: ring.RingWriter, next_seq: int,
           timeout: float | None) -> None:
    """Publish every message of ``old`` from ``start`` whose number the new ring has not
    reached yet, with its own number; then continue the numbering at ``next_seq``.  When the
    new ring was positioned at ``start`` (the daemon seeds a fresh ring there), frames land at
    the very positions they had, so replicas that hold a prefix resume by position."""
    base, mv = old.data_offset, old.mv
    for p, length, flags, seq in _frames(old, start, old.q[ring.W_TAIL]):
        if flags or seq < writer.next_seq:
            continue
        writer.skip_to(seq)
        at = base + (p & (old.capacity - 1)) + ring.HEADER
        with mv[at:at + length] as payload:
            writer.publish(payload, timeout)
    if next_seq > writer.next_seq:
        writer.skip_to(next_seq)
