"""The daemon's book of channels: which rings exist, who publishes, which slots are whose."""

from __future__ import annotations

import logging
import mmap
import time
from dataclasses import dataclass, field

from shimmy import ring
from shimmy.errors import (ChannelConflict, ChannelNotFound, InvalidArgument, LimitExceeded,
                           PublisherBusy, RingCorrupted)
from shimmy.names import object_token

from .config import Settings
from .segments import Segments

log = logging.getLogger("shimmy.daemon")


@dataclass
class Slot:
    index: int
    client: int
    pid: int
    generation: int
    seq: int = 0     # sequence number of the first message at the slot's start position


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
    generation: int = 0
    holders: set[int] = field(default_factory=set)   # clients that opened it
    idle_since: float | None = None

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
        return entry

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


class Registry:
    def __init__(self, settings: Settings, segments: Segments):
        self.settings = settings
        self.segments = segments
        self.channels: dict[str, ChannelRecord] = {}

    # -- channels ------------------------------------------------------------------------------
    def open(self, client: int, name: str, mode: str | None, capacity: int | None,
             create: bool) -> ChannelRecord:
        rec = self.channels.get(name)
        if rec is None:
            if not create:
                raise ChannelNotFound(f"channel {name!r} does not exist")
            rec = self._create(name, mode or "reliable", capacity)
        else:
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

    def _create(self, name: str, mode: str, capacity: int | None) -> ChannelRecord:
        s = self.settings
        if mode not in ring.MODES:
            raise InvalidArgument(f"mode {mode!r} is not one of {sorted(ring.MODES)}")
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
        shm_name, mm = self.segments.create_ring(token, name, ring.MODES[mode], capacity,
                                                 s.max_subscribers)
        rec = ChannelRecord(name=name, token=token, mode=ring.MODES[mode], capacity=capacity,
                            max_subscribers=s.max_subscribers, shm_name=shm_name, mm=mm,
                            view=ring.RingView(mm))
        self.channels[name] = rec
        log.info("created channel %s mode=%s capacity=%d shm=%s", name, mode, capacity, shm_name)
        return rec

    def get(self, name: str) -> ChannelRecord:
        rec = self.channels.get(name)
        if rec is None:
            raise ChannelNotFound(f"channel {name!r} does not exist")
        return rec

    def delete(self, name: str) -> None:
        rec = self.get(name)
        self.channels.pop(name)
        rec.view.release()
        self.segments.destroy(rec.token, rec.mm, rec.semaphores)
        log.info("deleted channel %s", name)

    def close_all(self) -> None:
        for name in list(self.channels):
            self.delete(name)

    # -- roles ---------------------------------------------------------------------------------
    def grant_publisher(self, rec: ChannelRecord, client: int, pid: int) -> None:
        if rec.publisher is not None and rec.publisher != client:
            raise PublisherBusy(
                f"channel {rec.name!r} already has a publisher (client {rec.publisher}); one "
                f"publisher per channel: close it first or publish on another channel")
        rec.publisher = client

    def add_subscriber(self, rec: ChannelRecord, client: int, pid: int, start: str) -> Slot:
        if start not in ("next", "oldest"):
            raise InvalidArgument(f"start must be 'next' or 'oldest', got {start!r}")
        rec.repair_daemon_words()
        used = set(rec.slots) | set(rec.evicted)
        index = next((i for i in range(rec.max_subscribers) if i not in used), None)
        if index is None:
            raise LimitExceeded(f"channel {rec.name!r} has max_subscribers "
                                f"({rec.max_subscribers}) subscribers")
        while rec.semaphores <= index:
            self.segments.create_semaphore(rec.token, rec.semaphores)
            rec.semaphores += 1
        position, seq = ring.stream_point(rec.view, oldest=start == "oldest")
        rec.generation += 1
        slot = Slot(index, client, pid, rec.generation, seq)
        ring.daemon_activate_slot(rec.view, index, position, pid, rec.generation)
        rec.slots[index] = slot
        return slot

    def remove_subscriber(self, rec: ChannelRecord, index: int, client: int) -> None:
        slot = rec.slots.get(index) or rec.evicted.get(index)
        if slot is None or slot.client != client:
            raise InvalidArgument(f"channel {rec.name!r}: slot {index} is not yours")
        rec.slots.pop(index, None)
        rec.evicted.pop(index, None)
        ring.daemon_set_slot_state(rec.view, index, ring.SLOT_FREE)

    def evict_client_slots(self, client: int) -> int:
        """Lease expired: the publisher stops waiting for this client's slots; they stay reserved
        (EVICTED) until the client goes away, so a late write from it lands on its own slot."""
        n = 0
        for rec in self.channels.values():
            for index, slot in list(rec.slots.items()):
                if slot.client == client:
                    ring.daemon_set_slot_state(rec.view, index, ring.SLOT_EVICTED)
                    rec.evicted[index] = rec.slots.pop(index)
                    n += 1
        return n

    def drop_client(self, client: int) -> tuple[int, int]:
        """The client is gone: free its slots and publisher roles.  Returns (slots, roles)."""
        slots = roles = 0
        now = time.monotonic()
        for rec in self.channels.values():
            for table in (rec.slots, rec.evicted):
                for index, slot in list(table.items()):
                    if slot.client == client:
                        ring.daemon_set_slot_state(rec.view, index, ring.SLOT_FREE)
                        del table[index]
                        slots += 1
            if rec.publisher == client:
                rec.publisher = None
                roles += 1
            rec.holders.discard(client)
            if not rec.holders and rec.idle_since is None:
                rec.idle_since = now
        return slots, roles

    def expire_idle(self) -> None:
        ttl = self.settings.idle_channel_ttl
        now = time.monotonic()
        for name, rec in list(self.channels.items()):
            if rec.idle_since is not None and now - rec.idle_since >= ttl:
                log.info("channel %s idle for %.0f s (idle_channel_ttl): deleting", name, ttl)
                self.delete(name)
