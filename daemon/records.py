"""The records of the daemon's book of channels: a channel (``ChannelRecord``: its ring, slots,
roles, group members, idle state, and what it reports of itself), a subscriber slot (``Slot``), a
publisher's member ring of a multi-publisher channel (``Member``), and the reserved names member
rings are known by.

A member ring is a record of its own in the book, under a reserved name
(``<channel>/.p<id>.<node>``, :func:`member_alias`) that clients cannot open: the peer module
announces and mirrors it like any published channel, and a node with subscribers of the group
adds the replica it makes of another node's member to its own group (a remote member).

A record writes only ring words the daemon owns (spec/ring.md): slot states, through
``ring.daemon_set_slot_state``, and slot_high, when it restores them from its books.  It must
never create or delete a ring, a semaphore or another record (the registry does).
"""

from __future__ import annotations

import logging
import mmap
import re
import time
from dataclasses import dataclass, field

from shimmy import ring
from shimmy.errors import RingCorrupted

log = logging.getLogger("shimmy.daemon")


@dataclass
class Slot:
    index: int
    client: int
    pid: int
    generation: int
    seq: int = 0     # sequence number of the first message at the slot's start position


REMOTE = -1   # Member.client of a remote member while its node announces it
_NODE_CHARS = re.compile(r"[^A-Za-z0-9_-]")


def member_alias(channel: str, publisher: int, node: str) -> str:
    """The reserved name a member ring is known by in the book and across the cluster."""
    return f"{channel}/.p{publisher}.{_NODE_CHARS.sub('-', node)}"


def alias_prefix(channel: str) -> str:
    return channel + "/.p"


_ALIAS = re.compile(r".*/\.p[0-9]+\.[A-Za-z0-9_-]+")


def is_member_alias(name: str) -> bool:
    """Whether ``name`` has the shape of a member ring's reserved name (clients may not open
    such a name: it would take the place of a publisher's ring)."""
    return _ALIAS.fullmatch(name) is not None


@dataclass
class Member:
    """One publisher's member ring of a multi-publisher channel (``rec``: its own record)."""

    publisher: int                          # publisher id, unique for the channel's lifetime
    client: int | None                      # the client publishing (REMOTE: another node's
    key: int                                # publisher); None once it has left; ``key``: which
    pid: int                                # of the client's Channel objects
    rec: "ChannelRecord"
    node: str                               # where the publisher runs
    remote: bool = False
    starts: dict[int, tuple[int, int]] = field(default_factory=dict)  # slot -> (position, seq)

    @property
    def view(self) -> ring.RingView:
        return self.rec.view

    @property
    def shm_name(self) -> str:
        return self.rec.shm_name

    def drained(self) -> bool:
        """Every ACTIVE slot of the ring (the group's subscribers and any mirror reading it) has
        consumed up to the tail (the publisher is gone, so the tail no longer moves)."""
        view = self.view
        tail = view.q[ring.W_TAIL]
        return all(view.q[view.slot_word(i)] >= tail for i in self.rec.slots)

    def describe(self) -> dict:
        view = self.view
        try:
            published = ring.stream_point(view)[1]
        except RingCorrupted:
            published = None
        return {"id": self.publisher, "pid": self.pid or None, "live": self.client is not None,
                "node": self.node, "remote": self.remote, "shm": self.shm_name,
                "published": published, "tail": view.q[ring.W_TAIL]}


@dataclass
class ChannelRecord:
    name: str
    token: str
    mode: int
    capacity: int
    max_subscribers: int
    shm_name: str
    mm: mmap.mmap
    view: ring.RingView
    created: float = field(default_factory=time.time)
    publisher: int | None = None            # client id holding the publisher role
    slots: dict[int, Slot] = field(default_factory=dict)
    evicted: dict[int, Slot] = field(default_factory=dict)
    semaphores: int = 0                     # slots 0..semaphores-1 have a semaphore
    room_sem: str = ""                      # the ring's room semaphore (Segments.room_sem)
    generation: int = 0
    holders: set[int] = field(default_factory=set)   # clients that opened it
    idle_since: float | None = None
    max_publishers: int = 1                 # > 1: a publisher group (module docstring)
    members: dict[int, Member] = field(default_factory=dict)   # publisher id -> member ring
    next_publisher: int = 1
    group_of: "ChannelRecord | None" = None  # a member ring's record: its channel
    reclaimed_messages: int = 0             # published by members reclaimed since (metrics)
    reclaimed_bytes: int = 0                # bytes those members carried (metrics, stat)
    read_to: int = 0                        # furthest position a departed subscriber had read

    def attached(self) -> bool:
        """Something holds an end of the channel: a client that opened it (mirrors included),
        the publisher role, a subscriber slot (EVICTED too), a live member of a group."""
        return bool(self.holders or self.publisher is not None or self.slots or self.evicted
                    or any(m.client is not None for m in self.members.values()))

    def note_read(self, index: int) -> None:
        """Slot ``index`` is about to be freed: remember how far its subscriber had read."""
        try:
            self.read_to = max(self.read_to, self.view.q[self.view.slot_word(index)])
        except (ValueError, IndexError):
            pass   # a view already released: the channel is going anyway

    def unread_bytes(self) -> int:
        """Ring bytes no subscriber has read: past the furthest point a departed subscriber
        reached (or all the ring holds, when none ever read it).  A group's member rings are
        counted whole (its departed subscribers' positions are not kept per member)."""
        if self.group:
            return sum(max(0, m.view.q[ring.W_TAIL] - m.view.q[ring.W_HEAD])
                       for m in list(self.members.values()))
        q = self.view.q
        return max(0, q[ring.W_TAIL] - max(self.read_to, q[ring.W_HEAD]))

    @property
    def group(self) -> bool:
        return self.max_publishers > 1

    def live_publishers(self) -> list[Member]:
        """This node's publishers attached now (what ``max_publishers`` limits)."""
        return [m for m in self.members.values() if m.client is not None and not m.remote]

    def used_slots(self) -> set[int]:
        """Slot indexes taken in this ring or, for a group or a member, anywhere in the group
        (subscribers hold one index in every ring; a mirror reading one member holds one)."""
        top = self.group_of or self
        used = set(top.slots) | set(top.evicted)
        for m in top.members.values():
            used |= set(m.rec.slots) | set(m.rec.evicted)
        return used

    def describe(self) -> dict:
        """The channel's entry in ``list``/``stat``.  A ring whose words break the invariants is
        reported with ``broken`` (the reason) instead of failing the whole listing; the daemon
        first restores the words it owns (repair_daemon_words), so only the publisher's or a
        subscriber's words can leave it broken."""
        self.repair_daemon_words()
        view = self.view
        q = view.q
        entry = {
            "name": self.name, "mode": ring.MODE_NAMES.get(self.mode, str(self.mode)),
            "capacity": self.capacity, "max_message": ring.max_message_size(self.capacity),
            "max_subscribers": self.max_subscribers, "shm": self.shm_name,
            "publisher": self.publisher, "published": None, "tail": None, "head": None,
            "evicted": [s.index for s in self.evicted.values()],
            "holders": len(self.holders), "broken": None,
            "max_publishers": self.max_publishers,
        }
        try:
            entry["published"] = ring.stream_point(view)[1]
        except RingCorrupted as exc:
            entry["broken"] = str(exc)
        tail = q[ring.W_TAIL]
        entry["tail"], entry["head"] = tail, q[ring.W_HEAD]
        subs = []
        for s in self.slots.values():
            pos = q[view.slot_word(s.index)]
            subs.append({"slot": s.index, "client": s.client, "pid": s.pid, "position": pos,
                         "lag_bytes": max(tail - pos, 0)})
        entry["subscribers"] = subs
        if self.group:
            pubs = entry["publishers"] = [m.describe() for m in self.members.values()]
            entry["published"] = sum(p["published"] or 0 for p in pubs)
            entry["publisher"] = len(self.live_publishers()) or None
            # The control ring carries no messages: bytes are the member rings' (reclaimed
            # ones included, so the figure never goes back), a subscriber's lag its largest
            # over the member rings (what it has yet to read from the furthest-behind one).
            entry["tail"] = self.reclaimed_bytes + sum(p["tail"] for p in pubs)
            lags = self.member_lags()
            for sub in subs:
                sub["lag_bytes"] = lags.get(sub["slot"], 0)
        return entry

    def member_lags(self) -> dict[int, int]:
        """A group's subscribers (slot index) -> bytes not yet read, the most over its
        member rings (0 for an exclusive channel's or a member's record)."""
        lags = dict.fromkeys(self.slots, 0)
        for m in list(self.members.values()):
            q, v = m.view.q, m.view
            tail, head = q[ring.W_TAIL], q[ring.W_HEAD]
            for i in lags:
                lags[i] = max(lags[i], tail - max(q[v.slot_word(i)], head))
        return lags

    def repair_daemon_words(self) -> int:
        """Rewrite the ring words the daemon owns (slot_high, slot states) from its own books
        when they differ (a client with write access stored over them); returns how many."""
        view = self.view
        fixed = 0
        if view.u32[ring.I_SLOT_HIGH] != self.semaphores:
            log.warning("channel %s: slot_high was %d, restoring %d", self.name,
                        view.u32[ring.I_SLOT_HIGH], self.semaphores)
            view.u32[ring.I_SLOT_HIGH] = self.semaphores
            fixed += 1
        for index in range(self.semaphores):
            state = (ring.SLOT_ACTIVE if index in self.slots else
                     ring.SLOT_EVICTED if index in self.evicted else ring.SLOT_FREE)
            if view.slot_state(index) != state:
                log.warning("channel %s: slot %d state was %d, restoring %d", self.name, index,
                            view.slot_state(index), state)
                ring.daemon_set_slot_state(view, index, state)
                fixed += 1
        return fixed

    def set_slot_state(self, index: int, state: int) -> None:
        """``state`` for slot ``index`` in the channel's ring and every member ring.  A slot
        that leaves ACTIVE no longer holds a waiting publisher back: its room semaphore is
        posted (spec/ring.md, "Waiting for room")."""
        ring.daemon_set_slot_state(self.view, index, state)
        for m in self.members.values():
            ring.daemon_set_slot_state(m.view, index, state)
        if state != ring.SLOT_ACTIVE:
            ring.post_room(self.view, self.room_sem)
            for m in self.members.values():
                ring.post_room(m.view, m.rec.room_sem)
