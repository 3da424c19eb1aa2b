"""The subscriber of a multi-publisher channel: one slot index, read in every member ring.

Each publisher of a group writes a member ring of its own (an ordinary single-writer ring,
spec/ring.md, "Publisher groups"); the daemon gives a subscriber's slot the same index in
the channel's ring and in every member ring, and bumps the channel ring's group epoch whenever a
member is added or reclaimed.  :class:`GroupSubscription` compares that epoch before every
receive batch (one u32 load where a member's tail is reloaded, ring.GroupReader) and asks the
daemon for the member list only when it changed, merges the
members round-robin (each receive starts at the member after the one that delivered last, so a
fast publisher never starves a slow one), and sleeps on the channel's one semaphore with its
waiting byte armed in every member ring.  It must never write a member ring beyond its own
slot's position and waiting byte, and never ask the daemon on a receive whose epoch is unchanged.
"""

from __future__ import annotations

import mmap
from typing import TYPE_CHECKING

from shimmy import ring
from shimmy.errors import ChannelRetired, InvalidArgument

from .client import open_shared_memory
from .subscription import Message, Subscription

if TYPE_CHECKING:
    from .channel import Channel


class _Member:
    """This subscriber's mapping of, and cursor in, one member ring."""

    __slots__ = ("id", "mm", "view", "reader", "ro", "waiting")

    def __init__(self, info: dict, slot: int, group: memoryview, epoch: int):
        shm = open_shared_memory(info["shm"])
        try:
            self.mm = mmap.mmap(shm.fd, shm.size)
        finally:
            shm.close_fd()
        self.view = ring.RingView(self.mm)
        self.id = info["id"]
        self.reader = ring.GroupReader(self.view, slot, info["position"], info["seq"], group,
                                       epoch, publisher=info["id"], node=info.get("node"),
                                       pid=info.get("pid"), room=info.get("room_sem"))
        self.ro = self.view.mv.toreadonly()
        at = ring.waiting_offset(slot)
        self.waiting = self.view.mv[at:at + 1]

    def close(self) -> None:
        self.waiting[0] = 0
        self.waiting.release()
        self.ro.release()
        self.view.release()
        try:
            self.mm.close()
        except BufferError:
            pass  # a Message still holds a view of it; the mapping goes with the last one


class GroupSubscription(Subscription):
    """A :class:`Subscription` of a channel with ``max_publishers`` > 1 (same API)."""

    def __init__(self, channel: Channel, reply: dict, spin_us: int):
        super().__init__(channel, reply["slot"], reply["position"], reply["seq"], spin_us)
        self._gq = channel._view.u32
        self._gepoch = reply["epoch"]      # group epoch the member list below is for
        self._armed = -1                   # group epoch when the waiting bytes were last armed
        self._members: list[_Member] = []
        self._cur: _Member | None = None   # the member read first (the one that delivered last)
        self._next = 0                     # where the round goes on: the member after _cur
        self._last: ring.RingReader = self._reader   # reader of the message received last
        self._lost_gone: dict[int, int] = {}   # publisher id -> losses, members reclaimed since
        self._set_members(reply["members"], reply["epoch"])
        self._has_data = self._any_data

    # -- membership -------------------------------------------------------------------------
    def _set_members(self, infos: list[dict], epoch: int) -> None:
        have = {m.id: m for m in self._members}
        keep: list[_Member] = []
        for info in infos:
            m = have.pop(info["id"], None)
            if m is None:
                try:
                    m = _Member(info, self.slot, self._gq, epoch)
                except ChannelRetired:
                    continue  # reclaimed since the reply: every subscriber had drained it
            m.reader.group_epoch = epoch
            keep.append(m)
        for m in have.values():   # reclaimed: we (like every subscriber) read it to its end
            self._lost_gone[m.id] = m.reader.lost_total
            m.close()   # (self._last may stay its reader: only its ints are read after this)
        merged = len(keep) > 1
        for m in keep:
            m.reader.merged = merged
            m.reader.turn = False
        self._members = keep
        if keep:
            self._use(keep[0], 1 % len(keep))
        else:
            self._cur = None
            self._next = 0
            self._take_bytes = self._nothing
        self._gepoch = epoch

    def _refresh(self) -> None:
        self.channel._check()   # retired (deleted, daemon stopped): ChannelClosed, as ever
        reply = self.channel._client.request("members", name=self.channel.name, slot=self.slot)
        self._set_members(reply["members"], reply["epoch"])

    # -- receiving --------------------------------------------------------------------------
    # ``_cur`` is the member read last: each receive first asks its reader (the one reader of a
    # one-publisher group, called as straight as on an exclusive channel); when it has nothing
    # (its batch is done, it is caught up, or the group epoch moved) the next members are
    # tried in turn (``_rotate``), refreshing the member list first if the epoch moved.
    def receive_nowait(self) -> Message | None:
        if self.closed:
            self._closed()
        m = self._cur
        if m is not None:
            reader = m.reader
            got = reader.take()
            if got is not None:
                pos, off, length, seq, lost = got
                return Message(self, m.ro[off:off + length], seq, lost, pos, reader.position,
                               reader)
        return self._receive_rotate()

    def _rotate(self, take):
        """The members in turn from ``_next``: the first ``take(reader)`` that is not None, as
        ``(member, result)``, that member then read first; None when every member is caught up.
        Refreshes the member list first when the group epoch moved (a publisher joined or was
        reclaimed).  Off the per-message path: only when the current member has nothing."""
        if self._gq[ring.I_GROUP_EPOCH] != self._gepoch:
            self._refresh()
        members = self._members
        n = len(members)
        i = self._next
        for _ in range(n):
            m = members[i]
            i = i + 1 if i + 1 < n else 0
            got = take(m.reader)
            if got is not None:
                self._use(m, i)   # the next round starts at the member after this one
                return m, got
        return None

    def _receive_rotate(self) -> Message | None:
        found = self._rotate(ring.GroupReader.take)
        if found is None:
            return None
        m, (pos, off, length, seq, lost) = found
        return Message(self, m.ro[off:off + length], seq, lost, pos, m.reader.position, m.reader)

    def receive_bytes(self, timeout: float | None = None) -> bytes:
        if self.closed:
            self._closed()
        data = self._take_bytes()   # the current member's reader.take_bytes, straight
        if data is None:
            data = self._take_bytes_rotate()
            if data is None:
                data = self._wait(timeout, self._take_bytes_rotate)
        return data

    def _take_bytes_rotate(self) -> bytes | None:
        found = self._rotate(ring.GroupReader.take_bytes)
        return None if found is None else found[1]

    def receive_many(self, max_n: int, timeout: float | None = None) -> list[bytes]:
        """:meth:`Subscription.receive_many` of a group: each call copies the messages of one
        member ring (up to ``max_n``), the members in turn, so no publisher starves another;
        each publisher's messages stay in its order.  ``last_publisher`` names the member the
        batch came from."""
        if self.closed:
            self._closed()
        if not isinstance(max_n, int) or isinstance(max_n, bool) or max_n < 1:
            raise InvalidArgument(f"max_n must be a positive int, got {max_n!r}")
        out = self._take_many_rotate(max_n)
        if out is None:
            out = self._wait(timeout, lambda: self._take_many_rotate(max_n))
        return out

    def _take_many_rotate(self, max_n: int) -> list[bytes] | None:
        found = self._rotate(lambda reader: reader.take_many_bytes(max_n))
        return None if found is None else found[1]

    def _use(self, m: _Member, following: int) -> None:
        """``m`` delivered: read it first from now on; the round goes on at ``following``."""
        self._cur = m
        self._next = following
        self._last = m.reader
        self._take_bytes = m.reader.take_bytes

    @staticmethod
    def _nothing() -> None:
        return None

    def _any_data(self) -> bool:
        if self._gq[ring.I_GROUP_EPOCH] != self._gepoch:
            return True
        for m in self._members:
            if m.reader.has_data():
                return True
        return False

    # -- sleeping ---------------------------------------------------------------------------
    def _arm(self, epoch: int) -> None:
        # Every member ring's waiting byte for our slot, then (caller) one fence and one
        # re-check of every tail: whichever publisher commits after our check sees its byte.
        self._armed = self._gepoch
        for m in self._members:
            m.waiting[0] = epoch

    def _rearm(self) -> bool:
        # The member list changed during the re-check (a new member is not armed yet), or is
        # about to: arm again before sleeping.
        return self._armed != self._gepoch or self._gq[ring.I_GROUP_EPOCH] != self._gepoch

    # -- counters ---------------------------------------------------------------------------
    @property
    def lost(self) -> int:
        """Messages missed so far, all publishers together (lossy mode)."""
        return sum(self._lost_gone.values()) + sum(m.reader.lost_total for m in self._members)

    def lost_by_publisher(self) -> dict[int, int]:
        """Messages missed so far, per publisher id (publishers that left included)."""
        return {**self._lost_gone, **{m.id: m.reader.lost_total for m in self._members}}

    @property
    def last_seq(self) -> int:
        """Sequence number (in its publisher's numbering) of the message received last."""
        return self._last._expect - 1

    @property
    def last_publisher(self) -> int:
        """Publisher id of the message received last (0 before the first)."""
        return self._last.publisher

    @property
    def publishers(self) -> list[int]:
        """Ids of the publishers whose rings this subscription reads now."""
        return [m.id for m in self._members]

    def _drop(self) -> None:
        """``Channel.reopen``: let go of every member ring too (a group subscription ends)."""
        for m in self._members:
            m.close()
        self._members = []
        self._cur = None
        super()._drop()

    def close(self) -> None:
        if self.closed:
            return
        for m in self._members:
            m.close()
        self._members = []
        self._cur = None
        super().close()
