"""The daemon's book of channels: which rings exist, who publishes, which slots are whose.

A channel created with ``max_publishers`` > 1 is a publisher group (spec/ring.md,
"Publisher groups"): its own ring holds the subscriber slots and the group epoch only, and every
publisher gets a member ring of its own (an ordinary single-writer ring) for as long as it
publishes and until every subscriber has read it to its end.  A subscriber holds the same slot
index in the channel's ring and in every member ring.

A member ring is also a record of its own in the book, under a reserved name (daemon/records.py,
which holds the records themselves).

Idle channels (docs/daemon.md, "Idle channels"): a channel with no ends attached - no client
holds it open, no publisher, no subscriber slot (EVICTED included), no mirror - is deleted after
``idle_channel_ttl`` when nothing in it is unread, and after ``idle_channel_unread_ttl`` when its
ring still holds messages past the furthest point a departed subscriber read (what a later
``start="oldest"`` subscriber would get).  ``ls`` and ``stat`` show each idle channel's unread
bytes and when it goes; the deletion is logged and counted.  Replicas a peer made for no local
client are the peer module's to keep or drop.

The registry alone creates and deletes rings, semaphores and records, and runs on the daemon's
loop thread only; it must never decide who may do what (daemon/callers.py does, before it is
called) nor talk to another node (the peer module does, and calls ``create`` and
``join_remote``).
"""

from __future__ import annotations

import logging
import socket
import time
from collections import Counter

import posix_ipc

from shimmy import ring
from shimmy.errors import (ChannelConflict, ChannelNotFound, InvalidArgument, LimitExceeded,
                           PublisherBusy, RingCorrupted)
from shimmy.names import object_token

from .config import Settings
from .records import REMOTE, ChannelRecord, Member, Slot, member_alias
from .segments import Segments

log = logging.getLogger("shimmy.daemon")


class Registry:
    def __init__(self, settings: Settings, segments: Segments):
        self.settings = settings
        self.segments = segments
        self.channels: dict[str, ChannelRecord] = {}
        self.node = settings.node or socket.gethostname()   # as the peer module names it
        self._joining: dict[str, ChannelRecord] = {}   # alias -> group, while its replica is made
        self.counters = Counter({"channels_reclaimed": 0, "channels_reclaimed_unread": 0,
                                 "unread_bytes_dropped": 0})

    # -- channels ------------------------------------------------------------------------------
    def open(self, client: int, name: str, mode: str | None, capacity: int | None,
             create: bool, max_publishers: int | None = None) -> ChannelRecord:
        rec = self.channels.get(name)
        if rec is not None and rec.group_of is not None:
            raise InvalidArgument(f"{name!r} is the ring of a publisher of channel "
                                  f"{rec.group_of.name!r}: open that channel")
        if rec is None:
            if not create:
                raise ChannelNotFound(f"channel {name!r} does not exist")
            rec = self.create(name, mode or "reliable", capacity, max_publishers)
        else:
            if max_publishers is not None and max_publishers != rec.max_publishers:
                raise ChannelConflict(
                    f"channel {name!r} exists with max_publishers={rec.max_publishers}, asked "
                    f"for max_publishers={max_publishers} (fixed when the channel is created)")
            if mode is not None and ring.MODES.get(mode) != rec.mode:
                raise ChannelConflict(
                    f"channel {name!r} exists with mode={ring.MODE_NAMES[rec.mode]!r}, "
                    f"asked for mode={mode!r}")
            if capacity is not None and capacity != rec.capacity:
                raise ChannelConflict(f"channel {name!r} exists with capacity={rec.capacity}, "
                                      f"asked for capacity={capacity}")
        rec.holders.add(client)
        rec.idle_since = None
        return rec

    def create(self, name: str, mode: str, capacity: int | None,
               max_publishers: int | None = None) -> ChannelRecord:
        """Create channel ``name`` (no holder yet): for ``open``, and for the peer module's
        replicas and continued streams, which no client opened.  Every creation limit applies."""
        s = self.settings
        if mode not in ring.MODES:
            raise InvalidArgument(f"mode {mode!r} is not one of {sorted(ring.MODES)}")
        pubs = s.default_max_publishers if max_publishers is None else max_publishers
        if not 1 <= pubs <= s.max_publishers:
            raise LimitExceeded(f"max_publishers={pubs} for channel {name!r}: must be 1.."
                                f"{s.max_publishers} (daemon setting max_publishers)")
        capacity = s.default_capacity if capacity is None else capacity
        try:
            ring.check_capacity(capacity)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if capacity > s.max_capacity:
            raise InvalidArgument(f"capacity {capacity} exceeds max_capacity {s.max_capacity}")
        if len(self.channels) >= s.max_channels:
            raise LimitExceeded(f"cannot create channel {name!r}: max_channels "
                                f"({s.max_channels}) channels exist")
        token = object_token(name)
        # A group's own ring carries no messages (its publishers write member rings): the
        # smallest capacity does, for its slot table and group epoch.
        shm_name, mm = self.segments.create_ring(
            token, name, ring.MODES[mode], ring.MIN_CAPACITY if pubs > 1 else capacity,
            s.max_subscribers)
        rec = ChannelRecord(name=name, token=token, mode=ring.MODES[mode], capacity=capacity,
                            max_subscribers=s.max_subscribers, shm_name=shm_name, mm=mm,
                            view=ring.RingView(mm), max_publishers=pubs,
                            room_sem=self.segments.room_sem(token))
        self.channels[name] = rec
        group = self._joining.pop(name, None)
        if group is not None:   # the replica of another node's member of our group
            rec.group_of = group
            rec.semaphores = group.semaphores
        log.info("created channel %s mode=%s capacity=%d max_publishers=%d shm=%s", name, mode,
                 capacity, pubs, shm_name)
        return rec

    def get(self, name: str) -> ChannelRecord:
        rec = self.channels.get(name)
        if rec is None:
            raise ChannelNotFound(f"channel {name!r} does not exist")
        return rec

    def delete(self, name: str) -> None:
        rec = self.get(name)
        self.channels.pop(name)
        for m in list(rec.members.values()):
            if m.rec.name in self.channels:
                self.delete(m.rec.name)
        rec.members.clear()
        group = rec.group_of
        if group is not None:   # a member ring going away with (or before) its channel
            for pub, m in list(group.members.items()):
                if m.rec is rec:
                    del group.members[pub]
                    self._bump_epoch(group, wake=False)
        rec.view.release()
        self.segments.destroy(rec.token, rec.mm, rec.semaphores)
        log.info("deleted channel %s", name)

    def close_all(self) -> None:
        for name in list(self.channels):
            if name in self.channels:   # (a group's members go with it)
                self.delete(name)

    # -- roles ---------------------------------------------------------------------------------
    def grant_publisher(self, rec: ChannelRecord, client: int, pid: int,
                        key: int = 0) -> Member | None:
        """The publisher role: the channel's ring (exclusive channel, returns None) or, in a
        group, a member ring of its own for the client's Channel object ``key`` (created now;
        returned): two Channel objects of one process are two publishers, never two writers
        of one ring."""
        if rec.group:
            return self._add_member(rec, client, pid, key)
        if rec.publisher is not None and rec.publisher != client:
            raise PublisherBusy(
                f"channel {rec.name!r} already has a publisher (client {rec.publisher}) and was "
                f"created with max_publishers=1: close it first, or create the channel with "
                f"max_publishers > 1")
        rec.publisher = client
        return None

    def release_publisher(self, rec: ChannelRecord, client: int, key: int | None = None) -> int:
        """The client (its Channel object ``key``; None: all of them) stops publishing: closed,
        unpublished or gone; returns roles dropped.  A group member ring is reclaimed once its
        subscribers drained it (reclaim_members)."""
        n = 0
        if rec.publisher == client:
            rec.publisher = None
            n += 1
        for m in rec.members.values():
            if m.client == client and (key is None or m.key == key):
                m.client = None
                n += 1
        if n and rec.members:
            self.reclaim_members(rec)
        return n

    def _add_member(self, rec: ChannelRecord, client: int, pid: int, key: int) -> Member:
        for m in rec.members.values():
            if m.client == client and m.key == key:
                return m   # already publishing here
        live = rec.live_publishers()
        if len(live) >= rec.max_publishers:
            raise PublisherBusy(
                f"channel {rec.name!r} has max_publishers={rec.max_publishers} publishers "
                f"already (pids {', '.join(str(m.pid) for m in live)}): close one, or create the "
                f"channel with a larger max_publishers (at most {self.settings.max_publishers}, "
                f"the daemon setting max_publishers)")
        rec.repair_daemon_words()
        pub = rec.next_publisher
        alias = member_alias(rec.name, pub, self.node)
        token = object_token(alias)
        own = self.segments.ownership(rec.token)
        if own is not None:
            self.segments.claim(token, own)   # the member's ring is owned like the channel's
        # The ring's header names the channel (what errors and tools show).
        shm_name, mm = self.segments.create_ring(token, rec.name, rec.mode, rec.capacity,
                                                 rec.max_subscribers)
        rec.next_publisher += 1
        mrec = ChannelRecord(name=alias, token=token, mode=rec.mode, capacity=rec.capacity,
                             max_subscribers=rec.max_subscribers, shm_name=shm_name, mm=mm,
                             view=ring.RingView(mm), publisher=client, group_of=rec,
                             room_sem=self.segments.room_sem(token))
        self.channels[alias] = mrec
        member = Member(pub, client, key, pid, mrec, self.node)
        self._join(rec, member, 0, 0)
        log.info("channel %s: publisher %d (client %d pid %d) joined, member ring %s", rec.name,
                 pub, client, pid, shm_name)
        return member

    def _join(self, rec: ChannelRecord, member: Member, position: int, seq: int) -> None:
        """Give every subscriber of ``rec`` its slot in ``member``'s ring at ``position``, then
        make the member known (epoch bump, every subscriber posted)."""
        mrec = member.rec
        view = mrec.view
        # slot_high first, then each slot's words with its state last (daemon_activate_slot).
        mrec.semaphores = max(mrec.semaphores, rec.semaphores)
        view.u32[ring.I_SLOT_HIGH] = mrec.semaphores
        for table, state in ((rec.slots, ring.SLOT_ACTIVE), (rec.evicted, ring.SLOT_EVICTED)):
            for index, slot in table.items():
                ring.daemon_activate_slot(view, index, position, slot.pid, slot.generation)
                if state != ring.SLOT_ACTIVE:
                    ring.daemon_set_slot_state(view, index, state)
                (mrec.slots if state == ring.SLOT_ACTIVE else mrec.evicted)[index] = slot
                member.starts[index] = (position, seq)
        rec.members[member.publisher] = member
        self._bump_epoch(rec, wake=True)

    def join_remote(self, rec: ChannelRecord, alias: str, node: str, make) -> Member | None:
        """Another node announces ``alias``, a member of our group ``rec``: ``make()`` (the peer
        module) creates its replica under that name; it joins the group as a remote member,
        read from its start by every subscriber here."""
        self._joining[alias] = rec
        try:
            make()
        finally:
            self._joining.pop(alias, None)
        mrec = self.channels.get(alias)
        if mrec is None or mrec.group_of is not rec:
            return None
        pub = rec.next_publisher
        rec.next_publisher += 1
        member = Member(pub, REMOTE, 0, 0, mrec, node, remote=True)
        position, seq = ring.stream_point(mrec.view)
        self._join(rec, member, position, seq)
        log.info("channel %s: publisher %d on node %s joined (replica %s)", rec.name, pub, node,
                 alias)
        return member

    def sem_prefix_of(self, rec: ChannelRecord) -> str:
        """Where the subscribers of ``rec``'s ring sleep: a member ring's are its channel's."""
        return self.segments.sem_prefix((rec.group_of or rec).token)

    def _bump_epoch(self, rec: ChannelRecord, wake: bool) -> None:
        """Publish a membership change: subscribers compare the epoch before every receive and
        before every sleep; ``wake`` also posts every subscriber (a sleeper must arm its waiting
        byte in the new member ring, spec/ring.md, "Publisher groups")."""
        u32 = rec.view.u32
        u32[ring.I_GROUP_EPOCH] = (u32[ring.I_GROUP_EPOCH] + 1) & 0xFFFFFFFF
        if not wake:
            return
        prefix = self.segments.sem_prefix(rec.token)
        for index in list(rec.slots):
            try:
                sem = posix_ipc.Semaphore(prefix + str(index))
            except posix_ipc.Error:
                continue
            try:
                sem.release()
            finally:
                sem.close()

    def reclaim_members(self, rec: ChannelRecord) -> int:
        """Retire the member rings whose publisher left and which every subscriber has read to
        the end; returns how many."""
        gone = [m for m in rec.members.values() if m.client is None and m.drained()]
        for m in gone:
            del rec.members[m.publisher]
            try:
                rec.reclaimed_bytes += m.view.q[ring.W_TAIL]
                rec.reclaimed_messages += ring.stream_point(m.view)[1]
            except RingCorrupted:
                pass
            log.info("channel %s: publisher %d left and was drained: member ring %s reclaimed",
                     rec.name, m.publisher, m.shm_name)
            if m.rec.name in self.channels:
                self.delete(m.rec.name)
        if gone:
            self._bump_epoch(rec, wake=False)
        return len(gone)

    def members_for(self, rec: ChannelRecord, index: int) -> list[dict]:
        """The member rings subscriber slot ``index`` reads, with where its slot started."""
        return [{"id": m.publisher, "shm": m.shm_name, "room_sem": m.rec.room_sem,
                 "pid": m.pid or None, "node": m.node,
                 "position": m.starts.get(index, (0, 0))[0], "seq": m.starts.get(index, (0, 0))[1]}
                for m in rec.members.values()]

    def add_subscriber(self, rec: ChannelRecord, client: int, pid: int, start: str) -> Slot:
        if start not in ("next", "oldest"):
            raise InvalidArgument(f"start must be 'next' or 'oldest', got {start!r}")
        rec.repair_daemon_words()
        used = rec.used_slots()
        index = next((i for i in range(rec.max_subscribers) if i not in used), None)
        if index is None:
            raise LimitExceeded(f"channel {rec.name!r} has max_subscribers "
                                f"({rec.max_subscribers}) subscribers")
        top = rec.group_of or rec   # a member's slots sleep on its channel's semaphores
        while top.semaphores <= index:
            self.segments.create_semaphore(top.token, top.semaphores)
            top.semaphores += 1
        for r in (top, *(m.rec for m in top.members.values())):
            r.semaphores = top.semaphores
        position, seq = ring.stream_point(rec.view, oldest=start == "oldest")
        starts = [(m, ring.stream_point(m.view, oldest=start == "oldest"))
                  for m in rec.members.values()]
        rec.generation += 1
        slot = Slot(index, client, pid, rec.generation, seq)
        for m, (mpos, mseq) in starts:
            ring.daemon_activate_slot(m.view, index, mpos, pid, rec.generation)
            m.starts[index] = (mpos, mseq)
            m.rec.slots[index] = slot
        ring.daemon_activate_slot(rec.view, index, position, pid, rec.generation)
        rec.slots[index] = slot
        return slot

    def remove_subscriber(self, rec: ChannelRecord, index: int, client: int) -> None:
        slot = rec.slots.get(index) or rec.evicted.get(index)
        if slot is None or slot.client != client:
            raise InvalidArgument(f"channel {rec.name!r}: slot {index} is not yours")
        rec.note_read(index)
        rec.slots.pop(index, None)
        rec.evicted.pop(index, None)
        rec.set_slot_state(index, ring.SLOT_FREE)
        for m in rec.members.values():
            m.rec.slots.pop(index, None)
            m.rec.evicted.pop(index, None)
        if rec.members:
            self.reclaim_members(rec)
        if rec.group_of is not None:   # a mirror stopped reading a member
            self.reclaim_members(rec.group_of)

    def evict_client_slots(self, client: int) -> int:
        """Lease expired: the publisher stops waiting for this client's slots; they stay reserved
        (EVICTED) until the client goes away, so a late write from it lands on its own slot."""
        n = 0
        for rec in self.channels.values():
            for index, slot in list(rec.slots.items()):
                if slot.client == client:
                    rec.set_slot_state(index, ring.SLOT_EVICTED)
                    rec.evicted[index] = rec.slots.pop(index)
                    for m in rec.members.values():
                        if m.rec.slots.pop(index, None) is not None:
                            m.rec.evicted[index] = slot
                    n += 1
            if n and rec.members:
                self.reclaim_members(rec)
        return n

    def drop_client(self, client: int) -> tuple[int, int]:
        """The client is gone: free its slots and publisher roles.  Returns (slots, roles)."""
        slots = roles = 0
        now = time.monotonic()
        for rec in list(self.channels.values()):
            if rec.name not in self.channels:
                continue   # a member reclaimed by an earlier pass of this loop
            for table in (rec.slots, rec.evicted):
                for index, slot in list(table.items()):
                    if slot.client == client:
                        rec.note_read(index)
                        rec.set_slot_state(index, ring.SLOT_FREE)
                        del table[index]
                        for m in rec.members.values():
                            m.rec.slots.pop(index, None)
                            m.rec.evicted.pop(index, None)
                        slots += 1
            roles += self.release_publisher(rec, client)
            if rec.members:
                self.reclaim_members(rec)
            rec.holders.discard(client)
            if not rec.holders and rec.idle_since is None:
                rec.idle_since = now
        return slots, roles

    def reclaim_all(self) -> None:
        """Housekeeping: reclaim drained member rings of departed publishers."""
        for rec in list(self.channels.values()):
            if rec.members and any(m.client is None for m in rec.members.values()):
                self.reclaim_members(rec)

    def reclaim_in(self, rec: ChannelRecord, now: float) -> tuple[float | None, int]:
        """(seconds until idle channel ``rec`` is deleted, or None: it is not idle or is kept;
        its unread bytes).  The rule is in the module docstring."""
        if rec.idle_since is None or rec.group_of is not None or rec.attached():
            return None, 0
        try:
            unread = rec.unread_bytes()
        except (ValueError, IndexError):
            unread = 0
        ttl = self.settings.idle_channel_unread_ttl if unread else self.settings.idle_channel_ttl
        if not ttl:
            return None, unread   # 0: kept until deleted
        return max(0.0, ttl - (now - rec.idle_since)), unread

    def expire_idle(self) -> None:
        now = time.monotonic()
        for name, rec in list(self.channels.items()):
            if name not in self.channels:
                continue   # a member deleted with its channel earlier in this pass
            left, unread = self.reclaim_in(rec, now)
            if left is None or left > 0:
                continue
            c = self.counters
            c["channels_reclaimed"] += 1
            if unread:
                c["channels_reclaimed_unread"] += 1
                c["unread_bytes_dropped"] += unread
                log.info("channel %s: no ends attached for idle_channel_unread_ttl=%.0fs; "
                         "deleting it with %d unread bytes", name,
                         self.settings.idle_channel_unread_ttl, unread)
            else:
                log.info("channel %s: no ends attached and nothing unread for "
                         "idle_channel_ttl=%.0fs; deleting it", name,
                         self.settings.idle_channel_ttl)
            self.delete(name)
