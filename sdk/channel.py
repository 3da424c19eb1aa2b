"""Pub/sub channels: ``Channel``, ``Subscription``, ``Message``.

The daemon is asked once for a ring (and, lazily, for the publisher role or a subscriber slot);
after that every publish and receive goes straight to the shared mapping.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import mmap
import os
import time
import weakref
from types import EllipsisType

import posix_ipc

from shimmy import ring
from shimmy.errors import (ChannelClosed, ChannelRetired, InvalidArgument, MessageOverwritten,
                           MessageTooLarge, ReceiveTimeout, ShimmyError)
from shimmy.names import validate_name

from .client import fork_generation, get_client, open_semaphore, open_shared_memory

DEFAULT_PUBLISH_TIMEOUT = 10.0   # seconds a reliable publisher waits for room, then raises
DEFAULT_SPIN_US = 100            # adaptive spin ceiling before a receiver sleeps
MIN_SPIN_US = 2
YIELD_AFTER_US = 5             # a spinning receiver yields its CPU between polls after this
SPIN_KEEP = 4                  # a wait up to this many spin ceilings keeps the spin
SPIN_BYTES_PER_US = 2048       # ... and may spin 1 us longer per this many bytes of message
MAX_SLEEP = 0.25                 # a sleeping receiver re-checks at least this often



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


class Message:
    """One received message.

    ``data`` is a read-only memoryview straight into the ring, valid until :meth:`release` or the
    next ``receive`` on the same subscription.  In ``lossy`` mode the publisher may overwrite it
    even then: :meth:`valid` says whether it still holds the bytes that were received, and
    ``bytes(msg)`` raises :class:`MessageOverwritten` instead of returning corrupted data.

    ``seq`` numbers the messages of the publisher that sent it, and ``lost`` counts that
    publisher's messages missed just before this one.  ``publisher`` is that publisher's id
    (stable while it publishes; 0 on a channel created with ``max_publishers=1``), ``node`` and
    ``pid`` where it runs (None where unknown).
    """

    __slots__ = ("data", "seq", "lost", "_sub", "_pos", "_end", "_src")

    def __init__(self, sub: "Subscription", data: memoryview, seq: int, lost: int, pos: int,
                 end: int, src: ring.RingReader):
        self.data = data
        self.seq = seq
        self.lost = lost
        self._sub = sub
        self._pos = pos
        self._end = end
        self._src = src   # the reader of the ring it came from (a member ring in a group)

    @property
    def publisher(self) -> int:
        return self._src.publisher

    @property
    def node(self) -> str | None:
        return self._src.node

    @property
    def pid(self) -> int | None:
        return self._src.pid

    def __len__(self) -> int:
        return len(self.data)

    def valid(self) -> bool:
        """True while the publisher has not overwritten this message's bytes."""
        return self._src.head_at_most(self._pos)

    def __bytes__(self) -> bytes:
        out = bytes(self.data)
        if not self._src.head_at_most(self._pos):
            raise MessageOverwritten(
                f"message seq={self.seq} on {self._sub.channel.name!r} was overwritten while "
                f"held (lossy mode); copy it promptly or use a larger capacity")
        return out

    def release(self) -> None:
        """Hand the message's bytes back to the publisher now instead of at the next receive."""
        self._sub._release(self)

    def __enter__(self) -> "Message":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return (f"<shimmy.Message publisher={self.publisher} seq={self.seq} len={len(self.data)} "
                f"lost={self.lost}>")


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
    """

    def __init__(self, name: str, *, daemon: str | None = None, mode: str | None = None,
                 capacity: int | None = None, spin_us: int | None = None,
                 publish_timeout: float | None = DEFAULT_PUBLISH_TIMEOUT,
                 max_publishers: int | None = None):
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
        self.closed = False
        self._map(reply)
        _open_channels.add(self)

    def _map(self, reply: dict) -> None:
        """Map the ring an ``open`` reply names (and its wake-up semaphores)."""
        self.mode = reply["mode"]
        self.max_publishers = reply.get("max_publishers", 1)
        self.capacity = reply["capacity"]
        self.max_message = reply["max_message"]
        self._sem_prefix = reply["sem_prefix"]
        shm = open_shared_memory(reply["shm"])
        try:
            self._mm = mmap.mmap(shm.fd, shm.size)
        finally:
            shm.close_fd()
        self._view = ring.RingView(self._mm)
        self._wakeups = ring.Wakeups(self._view, reply["sem_prefix"])

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
        subs = [sub for sub in self._subs if not sub.closed]
        for sub in subs:
            sub._drop()
        from .group import GroupSubscription
        subs = [sub for sub in subs if not isinstance(sub, GroupSubscription)]
        self._subs = []
        self._client = client
        self._writer = None
        self.publisher_id = 0
        if member is not None:
            member[1].release()
            try:
                member[0].close()
            except BufferError:
                pass  # a caller still holds a Message view of it
        self._map(reply)
        self.closed = False
        try:
            if plan is not None:
                self._client.request("publish", name=self.name, carry={
                    "stream": plan[0], "position": plan[1], "seq": plan[2]})
                new = ring.RingWriter(self._view, self._wakeups)
                _carry(old_view, plan[1], new, plan[3], self.publish_timeout)
                self._writer = new
            for sub in subs:
                reply = self._client.request("subscribe", name=self.name, start="next")
                sub._rebind(reply["slot"], reply["position"], reply["seq"])
                self._subs.append(sub)
        finally:
            old_wakeups.close()
            old_view.release()
            try:
                old_mm.close()
            except BufferError:
                pass  # a caller still holds a Message view of the old ring

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
            self._writer = ring.RingWriter(self._view, self._wakeups)
            return self._writer
        # A publisher group: our own member ring, whose subscribers sleep on the channel's
        # semaphores (the same slot index in every member).
        if self._member is None:
            shm = open_shared_memory(member["shm"])
            try:
                mm = mmap.mmap(shm.fd, shm.size)
            finally:
                shm.close_fd()
            view = ring.RingView(mm)
            self._member = (mm, view)
            self._wakeups.close()
            self._wakeups = ring.Wakeups(view, self._sem_prefix)
        self.publisher_id = member["id"]
        self._writer = ring.RingWriter(self._member[1], self._wakeups)
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
            from .recorded import RecordedSubscription, check_start
            check_start(start)
            return RecordedSubscription(self, start, recording, spin_us)
        reply = self._client.request("subscribe", name=self.name, start=start)
        sub: Subscription
        if "members" in reply:
            from .group import GroupSubscription
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


class Subscription:
    """One subscriber's position in a channel; iterate it or call :meth:`receive`."""

    def __init__(self, channel: Channel, slot: int, position: int, seq: int, spin_us: int):
        self.channel = channel
        self._bind(slot, position, seq)
        self._sleeps = 0          # times this subscription slept on its semaphore ...
        self._sleep_timeouts = 0  # ... and how many of those ended by the bound, not a post
        self._spin_max = spin_us / 1e6
        self._spin_cap = self._spin_max   # the spin's ceiling in the last wait (_wait)
        self._spin = self._spin_max
        self.closed = False

    def _bind(self, slot: int, position: int, seq: int) -> None:
        """Attach to ``slot`` of the channel's (current) ring, starting at ``position``."""
        channel = self.channel
        self.slot = slot
        self._view = channel._view
        self._reader = ring.RingReader(channel._view, slot, position, seq)
        self._take_bytes = self._reader.take_bytes
        self._has_data = self._reader.has_data
        self._sem = open_semaphore(channel._sem_prefix + str(slot))
        at = ring.waiting_offset(slot)
        self._waiting = channel._view.mv[at:at + 1]
        self._epoch = 0  # sleep epoch last stored in the waiting byte (ring.next_epoch)
        # The reader's position and next seq where a wait last outlasted YIELD_AFTER_US: the
        # messages taken since size the next such wait's spin (_wait).
        self._wait_pos, self._wait_seq = position, seq
        self._ro = channel._view.mv.toreadonly()

    def _rebind(self, slot: int, position: int, seq: int) -> None:
        """After ``Channel.reopen``: continue on the new ring.  Numbers are the channel's across
        restarts (a replica's are its source's; a publisher that carried its stream keeps
        them), so when the new ring starts at or after the next number we expected, the first
        message's ``lost`` counts the gap exactly; when it starts below (the numbering began
        again), we follow the new numbering."""
        expect, lost = self._reader._expect, self._reader.lost_total
        self._bind(slot, position, seq)
        if seq >= expect:
            self._reader._expect = expect
        self._reader.lost_total = lost
        self.closed = False

    @property
    def lost(self) -> int:
        """Messages this subscription has missed so far (lossy mode)."""
        return self._reader.lost_total

    def stats(self) -> dict:
        """This subscription's counters: messages missed, sleeps on the semaphore and how many
        of them ended by their bound instead of a publisher's post, the spin budget now and its
        ceiling in the last long wait (both in µs)."""
        return {"last_seq": self.last_seq, "lost": self.lost, "sleeps": self._sleeps,
                "sleep_timeouts": self._sleep_timeouts, "spin_us": round(self._spin * 1e6, 1),
                "spin_cap_us": round(self._spin_cap * 1e6, 1)}

    @property
    def last_seq(self) -> int:
        """Sequence number of the message received last (-1 before the first)."""
        return self._reader._expect - 1

    @property
    def status(self) -> str:
        """Where the messages come from: ``"local"`` (published on this node), or for a channel
        mirrored from another node ``"up"`` (link streaming) / ``"down"`` (reconnecting)."""
        return self._view.link_state()

    def _release(self, msg: Message) -> None:
        # Only the message handed out last still holds its frame (the next take() released the
        # earlier ones); releasing it early lets the publisher reuse the frame now.
        src = msg._src
        if msg._end == src.position:
            src.release_to(msg._end)

    def receive_nowait(self) -> Message | None:
        """The next message, or None if none is committed yet."""
        if self.closed:
            self._closed()
        # take() first releases the frame handed out last: the caller is done with it.
        got = self._reader.take()
        if got is None:
            return None
        pos, off, length, seq, lost = got
        return Message(self, self._ro[off:off + length], seq, lost, pos, self._reader.position,
                       self._reader)

    def receive(self, timeout: float | None = None) -> Message:
        """Block until a message arrives (at most ``timeout`` seconds; None = forever)."""
        msg = self.receive_nowait()
        if msg is None:
            msg = self._wait(timeout, self.receive_nowait)
        return msg

    def receive_bytes(self, timeout: float | None = None) -> bytes:
        """Copy path: the next message's bytes, released to the publisher at once.

        No Message object and no view to manage (``last_seq`` and ``lost`` tell the sequence
        number and the losses); in lossy mode a message overwritten while it was copied is
        skipped and counted in :attr:`lost` instead of raising.
        """
        if self.closed:
            self._closed()
        data = self._take_bytes()
        if data is None:
            data = self._wait(timeout, self._take_bytes)
        return data

    def receive_many(self, max_n: int, timeout: float | None = None) -> list[bytes]:
        """Copy path for batches: wait like :meth:`receive_bytes` for the first message (at most
        ``timeout`` seconds; ReceiveTimeout after), then return it with every further message
        already committed, up to ``max_n`` in all, oldest first, released to the publisher
        with one store.  ``last_seq`` and ``lost`` count them as ``receive_bytes`` does."""
        if self.closed:
            self._closed()
        if not isinstance(max_n, int) or max_n < 1:
            raise InvalidArgument(f"max_n must be a positive int, got {max_n!r}")
        take_many = self._reader.take_many_bytes
        out = take_many(max_n)
        if out is None:
            out = self._wait(timeout, lambda: take_many(max_n))
        return out

    def _closed(self):
        raise ChannelClosed(f"subscription to {self.channel.name!r} is closed (or belongs to the "
                            f"parent of this forked process)")

    def _wait(self, timeout: float | None, attempt):
        """Spin, then sleep, until ``attempt()`` returns something (bounded by ``timeout``)."""
        channel = self.channel
        channel._check()
        now = time.perf_counter()
        deadline = None if timeout is None else now + timeout
        # 1. Adaptive spin: poll for up to self._spin seconds (shrinks when spinning keeps
        #    failing, grows back when a message arrives soon after we would have given up),
        #    at most self._spin_cap.
        spin_end = now + self._spin
        if deadline is not None and spin_end > deadline:
            spin_end = deadline
        #    The first YIELD_AFTER_US poll without pause: a local publisher's next message is
        #    usually that close.
        has_data = self._has_data
        yield_at = now + YIELD_AFTER_US / 1e6
        while True:
            if has_data():
                msg = attempt()
                if msg is not None:
                    self._spin = min(self._spin * 2 or MIN_SPIN_US / 1e6, self._spin_cap)
                    return msg
            t = time.perf_counter()
            if t >= yield_at or t >= spin_end:
                break
        #    A longer wait: the ceiling is spin_us plus 1 us per SPIN_BYTES_PER_US bytes of the
        #    average message (frame) taken since the last wait this long.  The next large
        #    message is a copy of that size away (its publisher writes it; in a round trip the
        #    echo copies it out and back in): 1 MiB takes a publisher 30-200 us here, and a
        #    receiver that slept through it paid a wake-up on top (docs/performance.md, "Large
        #    messages on one node").  Done here, not per message: a message that comes within
        #    YIELD_AFTER_US costs the caller nothing for it.  spin_us=0 stays without spin.
        reader = self._reader
        pos, seq = reader.position, reader._expect
        if self._spin_max and seq > self._wait_seq:
            self._spin_cap = self._spin_max + ((pos - self._wait_pos) / (seq - self._wait_seq)
                                               / (SPIN_BYTES_PER_US * 1e6))
            if spin_end > now + self._spin_cap:
                spin_end = now + self._spin_cap
        self._wait_pos, self._wait_seq = pos, seq
        #    Each further poll yields the CPU first, as stream readers do: when the thread that
        #    produces what we wait for shares our CPU (a daemon's mirror threads for a replica,
        #    a publisher on a busy machine) it runs at once instead of waiting for our spin to
        #    end.  docs/performance.md has the figures.
        sched_yield = os.sched_yield
        while t < spin_end:
            sched_yield()
            if has_data():
                msg = attempt()
                if msg is not None:
                    self._spin = min(self._spin * 2 or MIN_SPIN_US / 1e6, self._spin_cap)
                    return msg
            t = time.perf_counter()
        # 2. Sleep on our semaphore, re-checking at least every MAX_SLEEP.
        slept_at = time.perf_counter()
        try:
            while True:
                self._epoch = epoch = ring.next_epoch(self._epoch)
                self._arm(epoch)
                # SYNC POINT (Dekker pair with RingWriter._commit): store waiting, FENCE, load
                # tail.  Either we see the new tail here, or the publisher sees our byte and
                # posts the semaphore.
                ring.fence()
                msg = attempt()
                if msg is not None:
                    break
                if self._rearm():
                    continue
                now = time.perf_counter()
                if deadline is not None and now >= deadline:
                    raise ReceiveTimeout(f"no message on {channel.name!r} within {timeout} s")
                wait = MAX_SLEEP if deadline is None else min(MAX_SLEEP, deadline - now)
                self._sleeps += 1
                try:
                    self._sem.acquire(wait)
                except posix_ipc.BusyError:
                    self._sleep_timeouts += 1
                    channel._check()
                    self._check_slot()
        finally:
            self._arm(0)
        # Woken soon after we stopped spinning: a longer spin would have caught it, or may be
        # what brings the message sooner (it keeps this CPU out of idle and yields it to the
        # threads that carry the message: a daemon's mirror threads on the same cores).  "Soon"
        # is SPIN_KEEP ceilings: with one, a cross-node round trip that ran past the ceiling
        # once let the spin collapse, and without the spin it stayed 2-4x slower (bimodal
        # runs; docs/performance.md, "Cross-node loan rows and a round trip that holds").
        if time.perf_counter() - slept_at < SPIN_KEEP * self._spin_cap:
            self._spin = min(self._spin * 2 or MIN_SPIN_US / 1e6, self._spin_cap)
        else:
            self._spin = max(self._spin / 2, MIN_SPIN_US / 1e6) if self._spin_max else 0.0
        return msg

    def _arm(self, epoch: int) -> None:
        """Store ``epoch`` (0 = awake) in our waiting byte: the publisher posts us when set."""
        self._waiting[0] = epoch

    def _rearm(self) -> bool:
        """True when the wait must arm again before sleeping (a group's membership changed)."""
        return False

    def _check_slot(self) -> None:
        if self._view.slot_state(self.slot) == ring.SLOT_EVICTED:
            raise ChannelClosed(
                f"subscription to {self.channel.name!r} was evicted: this process sent no "
                f"heartbeat for the daemon's lease_timeout; subscribe again")

    def __iter__(self):
        return self

    def __next__(self) -> Message:
        return self.receive()

    async def receive_async(self, timeout: float | None = None) -> Message:
        from .aio import receive_async
        return await receive_async(self, timeout)

    def __aiter__(self):
        return self

    async def __anext__(self) -> Message:
        return await self.receive_async()

    def _drop(self) -> None:
        """Let go of the old ring without telling the daemon (it is gone: ``Channel.reopen``)."""
        self.closed = True
        self._sem.close()
        self._waiting.release()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        channel = self.channel
        if self in channel._subs:
            channel._subs.remove(self)
        self._sem.close()
        self._waiting.release()
        if channel._fork_gen == fork_generation() and not channel._client.closed:
            # The message handed out last was received: release it, so the slot's position
            # (which the daemon reads when the slot goes) says how far this subscriber read
            # (docs/daemon.md, "Idle channels").  The slot stops holding the publisher back
            # at unsubscribe anyway.
            self._reader.release_to(self._reader.position)
            try:
                channel._client.request("unsubscribe", name=channel.name, slot=self.slot)
            except ShimmyError:
                pass

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self) -> "Subscription":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()
