"""Receiving from a channel: ``Subscription`` (one subscriber's slot and position in a ring,
and how it waits: spin, then sleep on its semaphore) and ``Message`` (a received message, a view
into the ring).

The subscription reads the ring it is bound to; the daemon is asked only at subscribe (by
``Channel.subscribe``) and unsubscribe.  It must never write anything of the ring but its own
slot's position and waiting byte (spec/ring.md, one writer per shared word), and never import
``channel`` (but for type hints): a channel makes subscriptions, a subscription only reads the
channel it was given.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import posix_ipc

from shimmy import ring
from shimmy.errors import (ChannelClosed, InvalidArgument, MessageOverwritten, ReceiveTimeout,
                           ShimmyError)

from . import aio
from .client import fork_generation, open_semaphore

if TYPE_CHECKING:
    from .channel import Channel

DEFAULT_SPIN_US = 100            # adaptive spin ceiling before a receiver sleeps
MIN_SPIN_US = 2                # the adaptive spin never shrinks below this
YIELD_AFTER_US = 5             # a spinning receiver yields its CPU between polls after this
SPIN_KEEP = 4                  # a wait up to this many spin ceilings keeps the spin
SPIN_BYTES_PER_US = 2048       # ... and may spin 1 us longer per this many bytes of message
MAX_SLEEP = 0.25               # a sleeping receiver re-checks at least this often


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
        self._reader = ring.RingReader(channel._view, slot, position, seq,
                                       room=channel._room_sem)
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
        # Frame bytes only: a PAD (at the wrap point, or before each rewound frame, where a
        # large message's position moves a whole lap: spec/ring.md, "Rewind") is no message.
        pos, seq = reader.position - reader.padded, reader._expect
        if self._spin_max and seq > self._wait_seq:
            self._spin_cap = self._spin_max + ((pos - self._wait_pos) / (seq - self._wait_seq)
                                               / (SPIN_BYTES_PER_US * 1e6))
            if spin_end > now + self._spin_cap:
                spin_end = now + self._spin_cap
        self._wait_pos, self._wait_seq = pos, seq
        #    Each further poll yields the CPU first, as stream readers do: when the thread that
        #    produces what we wait for shares our CPU (a daemon's mirror threads for a replica,
        #    a publisher on a busy machine) it runs at once instead of waiting for our spin to
        #    end.  docs/performance.md has the figures.  The poll is the first loop's, written
        #    out again: a helper call per poll would cost every spin (the hot path).
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
        # runs; docs/performance.md, "Cross-node loan rows, CPU per MiB and a
        # round trip that holds").
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
        return await aio.receive_async(self, timeout)

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
