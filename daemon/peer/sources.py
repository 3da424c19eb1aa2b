"""The source side of the peer module: this node's rings that peers mirror.

* mirror requests (``serve``, ``unmirror``): a mirror slot in the local ring and a
  ``MirrorSource`` thread per mirror, over the transport ``RdmaMirrors`` picks;
* held slots: a stopped reliable mirror's slot is kept for ``peer_hold`` seconds so a
  reconnect resumes with nothing lost (``stop``, ``expire``);
* the interest holds (``hold_for_interest``, ``hold_member``): a reliable ring published here is
  held for peers whose subscribers wait for it, until their mirror asks (docs/peering.md,
  "Interest");
* carried and continued streams (``carry``, ``continue_stream``): a restarted daemon's ring
  positioned where its stream left off, and held for the replicas that follow it.

Runs on the daemon's main thread (mirror source threads only read their ring and write their
slot).  It never makes a replica and never talks to the links' sockets itself (only
``Link.send_ctrl``).
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass

from shimmy import ring
from shimmy.errors import InvalidArgument, LimitExceeded

from .directory import OPEN, shape_conflict
from .mirror import MirrorSource, seed_stream
from .tcp import Link

log = logging.getLogger("shimmy.peer")

_MIRROR_CLIENT_BASE = -1000     # registry client ids of mirror source slots: -1000, -1001, ...
ANY_NODE = "*"                  # a held mirror slot for whichever replica asks first


@dataclass
class SourceEntry:
    link: Link
    mid: int
    name: str
    client: int                 # registry client id holding the slot
    slot: int
    source: MirrorSource
    node: str


@dataclass
class HeldSlot:
    name: str
    client: int
    slot: int
    since: float
    interest: bool = False      # held for a peer's subscriber until its mirror asks (not a resume)
    at: tuple[int, int] | None = None   # (position, seq) where that peer's fresh replica stands


class SourceSide:
    """The mirrors this node serves (``svc``: its ``PeerService``)."""

    def __init__(self, svc):
        self.svc = svc
        self.s = svc.s
        self.counters = svc.counters
        self.registry = svc.d.registry
        self.entries: dict[tuple[int, int], SourceEntry] = {}   # by (link id, mirror id)
        self.held: dict[tuple[str, str], HeldSlot] = {}          # by (node, channel name)
        self.origins: dict[str, tuple[int, int]] = {}   # continued streams: where they began
        self._next_client = _MIRROR_CLIENT_BASE

    # -- mirror requests (control messages) --------------------------------------------------------
    def serve(self, link: Link, obj: dict) -> None:
        """Source side: a peer wants a mirror of one of our channels."""
        mid, name = int(obj["id"]), str(obj["name"])
        resume = obj.get("resume")
        consumed = obj.get("consumed")
        rec = self.registry.channels.get(name)
        if rec is None or name in self.svc.replicas or \
                (rec.publisher is None and rec.view.q[ring.W_TAIL] == 0):
            # (Only open here, nothing published: a peer asking from what it knew before this
            # daemon restarted.  Serving it would name a stream before the publisher says which
            # one it carries over; it asks again once we announce the channel published.)
            link.send_ctrl({"t": "mirror_err", "id": mid,
                            "message": f"channel {name!r} is not published on {self.svc.node}"})
            return
        if (link.id, mid) in self.entries:
            self.stop((link.id, mid), hold=False)
        q = rec.view.q
        held = self.held.pop((link.remote, name), None) or self.held.pop((ANY_NODE, name), None)
        try:
            if held is not None and held.slot in rec.slots:
                client, slot = held.client, held.slot
            else:
                if held is not None:
                    self.free_slot(rec, held.client, held.slot)
                client = self._next_client
                self._next_client -= 1
                slot = self.registry.add_subscriber(rec, client, os.getpid(), "next").index
        except LimitExceeded as exc:
            link.send_ctrl({"t": "mirror_err", "id": mid, "message": str(exc)})
            return
        rec.holders.add(client)
        rec.idle_since = None
        head, tail = q[ring.W_HEAD], q[ring.W_TAIL]
        start_seq = None
        sid = self.stream_id(rec)
        rseq = obj.get("seq")
        if isinstance(resume, int) and resume >= 0 and obj.get("stream") not in (sid, 0):
            # The replica follows another stream of this name (this daemon restarted and its
            # ring began again): positions do not match even where they look alike.
            resume = tail + 1
        ahead = isinstance(resume, int) and resume > tail
        wait_seq = None
        fresh_at = held.at if held is not None and resume == -1 else None
        if fresh_at is not None and head <= fresh_at[0] <= tail and \
                obj.get("stream") in (sid, 0):
            # A fresh replica whose subscribers' interest we held for: it starts where it was
            # positioned (where its subscribers start), not at our tail, which has moved on
            # since (docs/peering.md, "Interest").
            resume_pos: int | None = None
            start, start_seq = fresh_at
        elif ahead and obj.get("stream") == sid and isinstance(rseq, int) and rseq >= 0:
            # Our stream, numbered on from the replica's, but at other positions than its
            # copy (a publisher carried it over from a ring whose last positions the replica
            # held, Channel.reopen; it may still be carrying): resume by sequence number, at
            # the first message numbered ``rseq`` or later, once the ring has it (the source
            # thread waits); a gap (messages no longer held) is then exact.
            resume_pos = resume
            start, wait_seq = tail, rseq
            ahead = False
            log.info("mirror %s to %s: replica ahead by position (%d, our tail %d): resuming at "
                     "seq %d", name, link.remote, resume, tail, rseq)
        elif not isinstance(resume, int) or resume < 0 or resume > tail:
            resume_pos = None if not isinstance(resume, int) or resume < 0 else resume
            # A fresh replica starts at our tail; one ahead of our stream (this daemon
            # restarted, the stream began again) has none of it: it gets all we still hold.
            start, start_seq = ring.stream_point(rec.view, oldest=resume_pos is not None)
            if resume_pos is not None:
                log.warning("mirror %s to %s: replica at %d is ahead of our tail %d (our stream "
                            "restarted): it continues with our oldest message at %d", name,
                            link.remote, resume, tail, start)
        elif resume < head:
            resume_pos = resume
            start, start_seq = ring.stream_point(rec.view, oldest=True)
            log.warning("mirror %s to %s: replica resumes at %d but we hold only from %d: gap",
                        name, link.remote, resume, start)
        else:
            resume_pos = start = resume
        hold_at = start
        if isinstance(consumed, int) and resume_pos is not None and not ahead and \
                0 <= consumed <= start:
            hold_at = consumed
        # SYNC POINT: the mirror's slot position; reliable publishers keep everything from here.
        q[rec.view.slot_word(slot)] = hold_at
        transport = self.svc.rdma.source_transport(link, mid, rec, obj.get("rdma"))
        origin = self.origins.get(name, (0, 0)) if ahead else None
        src = MirrorSource(name, rec.view, slot, self.registry.sem_prefix_of(rec) + str(slot),
                           transport, start, start_seq, resume_pos, origin, wait_seq,
                           rec.room_sem)
        src.credit = hold_at
        self.entries[(link.id, mid)] = SourceEntry(link, mid, name, client, slot, src, link.remote)
        self.counters["mirrors_served"] += 1
        link.send_ctrl({"t": "mirror_ok", "id": mid, "start": start,
                        "mode": ring.MODE_NAMES[rec.mode], "capacity": rec.capacity,
                        "transport": transport.kind, "stream": sid})
        log.info("mirror %s -> %s: start=%d resume=%s transport=%s", name, link.remote, start,
                 resume, transport.kind)
        src.start()

    def unmirror(self, link: Link, obj: dict) -> None:
        key = (link.id, int(obj["id"]))
        if key in self.entries:
            self.stop(key, hold=False)

    def stop(self, key, hold: bool) -> None:
        entry = self.entries.pop(key)
        entry.source.stop()
        entry.source.t.close()
        rec = self.registry.channels.get(entry.name)
        if rec is None:
            return
        if hold and rec.mode == ring.MODE_RELIABLE and self.s.peer_hold > 0:
            # Keep the slot (and so the unconsumed bytes) for peer_hold seconds: a reconnect
            # within that resumes with nothing lost.
            self.held[(entry.node, entry.name)] = HeldSlot(entry.name, entry.client, entry.slot,
                                                           time.monotonic())
            rec.view.q[rec.view.slot_word(entry.slot)] = entry.source.credit
        else:
            self.free_slot(rec, entry.client, entry.slot)

    def free_slot(self, rec, client: int, slot: int) -> None:
        try:
            self.registry.remove_subscriber(rec, slot, client)
        except InvalidArgument:
            pass
        rec.holders.discard(client)
        if not rec.holders and rec.idle_since is None:
            rec.idle_since = time.monotonic()

    def link_down(self, link: Link) -> None:
        for key, src in list(self.entries.items()):
            if src.link is link:
                self.stop(key, hold=True)

    def expire(self, now: float) -> None:
        """Periodic (``tick``): forget where deleted channels' streams began, stop the mirrors
        whose thread ended, release slots held past ``peer_hold``."""
        for name in self.origins.keys() - self.registry.channels.keys():
            del self.origins[name]   # deleted: a new channel of that name starts at 0
        for key, src in list(self.entries.items()):
            if src.source.stopped:
                self.stop(key, hold=True)
        for k, held in list(self.held.items()):
            if now - held.since > self.s.peer_hold:
                rec = self.registry.channels.get(held.name)
                log.warning("mirror %s to %s: no %s within peer_hold=%.1fs; releasing "
                            "its data (a later resume reports a gap)", held.name, k[0],
                            "mirror request" if held.interest else "reconnect", self.s.peer_hold)
                del self.held[k]
                if rec is not None:
                    self.free_slot(rec, held.client, held.slot)

    def forget_node(self, node: str) -> None:
        """``node`` left the cluster: release the slots held for it."""
        for k in [k for k in self.held if k[0] == node]:
            held = self.held.pop(k)
            rec = self.registry.channels.get(held.name)
            if rec is not None:
                self.free_slot(rec, held.client, held.slot)

    # -- streams -----------------------------------------------------------------------------------
    def stream_id(self, rec) -> int:
        """The id of the stream ``rec``'s ring holds: new per ring this node creates (random,
        never 0), kept by a ring that continues a stream after a restart (replicas' stream, or
        the one a publisher carries over).  It lives in the ring (``ring.OFF_STREAM``, a word
        only the daemon writes), so a publisher that outlives its daemon knows it."""
        sid = rec.view.stream_id()
        if not sid:
            sid = secrets.randbits(63) | 1
            rec.view.q[ring.W_STREAM] = sid
        return sid

    def continue_stream(self, name: str, mode: str | None, capacity: int | None) -> None:
        """Peers hold replicas of ``name`` fed by this node before it restarted: create the
        ring positioned where the furthest replica ends, with its next sequence number, so the
        replicas (and their subscribers) continue the stream instead of being retired."""
        held = self.svc.directory.replicas_of(name, self.svc.node)
        if not held:
            return
        node, e = max(held, key=lambda ne: ne[1].tail)
        want_mode = None if mode is None else ring.MODES.get(mode)
        if shape_conflict(name, node, e, want_mode, capacity) or \
                e.capacity > self.s.max_capacity or e.tail < ring.HEADER or e.seq < 1:
            return   # a different channel now: the replicas will see a conflict
        rec = self.registry.create(name, ring.MODE_NAMES[e.mode], e.capacity)
        seed_stream(rec.view, e.tail, e.seq)
        self.origins[name] = (e.tail, e.seq)
        rec.view.q[ring.W_STREAM] = e.stream   # the same stream, continued
        self.hold(rec, [rnode for rnode, _ in held])
        self.counters["streams_continued"] += 1
        log.info("channel %s: node %s holds its replica up to position %d (seq %d) from before "
                 "this daemon restarted; continuing the stream there", name, node, e.tail, e.seq)

    def carry(self, rec, carry: dict) -> None:
        """The new publisher carries its stream over from its ring of this node's previous
        daemon (``Channel.reopen`` after a restart, a SIGKILL included): ``carry`` names that
        stream, the position of the oldest message it still holds and that message's sequence
        number.  An empty ring is positioned there (``seed_stream``) with the stream's id, so
        the messages the publisher publishes again land at their old positions and replicas
        that hold a prefix of them resume by position; the stream is held for the replicas
        (``hold``).  A ring that already holds a stream (continued from replicas' positions,
        or published since) is left as it is: the publisher skips what it numbers already."""
        vals = [carry.get(k) for k in ("stream", "position", "seq")]
        ints = [x for x in vals if isinstance(x, int) and not isinstance(x, bool)
                and 0 <= x < 1 << 64]
        if len(ints) != 3 or ints[1] & 15:
            raise InvalidArgument("field 'carry' must map stream, position (a multiple of 16) "
                                  "and seq to non-negative 64-bit integers")
        stream, position, seq = ints
        view = rec.view
        if rec.name in self.svc.replicas or view.q[ring.W_TAIL] != 0:
            return
        if stream:
            view.q[ring.W_STREAM] = stream
        if position >= ring.HEADER:
            # The daemon holds the publisher role's words here: the client it granted the role
            # to builds its RingWriter only after this reply (spec/ring.md, "Carried
            # streams").
            seed_stream(view, position, seq)
            self.origins[rec.name] = (position, seq)
            for (_, name), held in self.held.items():
                if name == rec.name:   # held for a peer's subscriber (check_publish), at 0
                    view.q[view.slot_word(held.slot)] = position
        if self.svc.enabled:
            nodes = [n for n, _ in self.svc.directory.replicas_of(rec.name, self.svc.node)]
            if not nodes and not any(k[1] == rec.name for k in self.held):
                nodes = [ANY_NODE]
            self.hold(rec, [n for n in nodes if (n, rec.name) not in self.held])
        self.counters["streams_carried"] += 1
        log.info("channel %s: its publisher carries its stream over from before this daemon "
                 "restarted: position %d, seq %d", rec.name, position, seq)

    # -- holds -------------------------------------------------------------------------------------
    def hold(self, rec, nodes: list[str], start: str = "next", interest: bool = False) -> None:
        """Hold the stream from the ring's tail (``start="oldest"``: from the oldest message it
        still holds) for each of ``nodes`` (``ANY_NODE``: the first replica to ask) until its
        mirror request arrives (as for a reconnect, bounded by peer_hold): a reliable publisher
        that starts at once must not overwrite what the replicas have not received yet."""
        for rnode in nodes:
            try:
                client = self._next_client
                slot = self.registry.add_subscriber(rec, client, os.getpid(), start).index
            except LimitExceeded:
                break
            self._next_client -= 1
            rec.holders.add(client)
            self.held[(rnode, rec.name)] = HeldSlot(rec.name, client, slot, time.monotonic(),
                                                    interest)

    def follow_interest(self, name: str) -> None:
        """A peer's announcement of ``name`` changed: hold the rings this node publishes under
        that name (a publisher group's local member rings, for the group's name) for the peers
        now interested, and release the holds of those no longer interested."""
        rec = self.registry.channels.get(name)
        if rec is None or name in self.svc.replicas:
            return
        if rec.group:
            for m in list(rec.members.values()):
                if not m.remote and m.client is not None:
                    self.hold_for_interest(m.rec, name)
        elif rec.group_of is None and rec.publisher is not None:
            self.hold_for_interest(rec, name)

    def hold_for_interest(self, rec, interest: str) -> None:
        """Hold the reliable ring ``rec`` (published here, or about to be) for every peer with a
        subscriber of ``interest`` (the channel's name; a member ring's group) that no mirror
        serves yet, until that peer's mirror asks, at most ``peer_hold``; release the holds of
        peers whose subscribers left before asking (docs/peering.md, "Interest").  A peer whose
        channel is still local (it converts to the replica and resumes at the stream's first
        message) is held from the oldest message the ring holds, one with a replica from the
        tail (its mirror starts there).  Lossy rings never hold: their mirrors count gaps."""
        if rec.mode != ring.MODE_RELIABLE or rec.name in self.svc.replicas:
            return
        holders = self.svc.directory.holders(interest)
        member = rec.group_of is not None
        # Only nodes whose channel will take this ring's stream (same mode; the same capacity,
        # or a group for a group's member ring): one in conflict never asks.
        nodes = [n for n in self.svc.directory.interested(interest, self.svc.node)
                 if holders[n].mode == rec.mode and (holders[n].publishers > 1 if member else
                                                     holders[n].publishers == 1 and
                                                     holders[n].capacity == rec.capacity)]
        for key, held in list(self.held.items()):
            if key[1] == rec.name and held.interest and key[0] not in nodes and \
                    key[0] not in self.svc.directory.down_since:
                del self.held[key]    # its subscribers left before its mirror asked
                self.free_slot(rec, held.client, held.slot)
        if self.s.peer_hold <= 0 or (ANY_NODE, rec.name) in self.held:
            return
        served = {e.node for e in self.entries.values() if e.name == rec.name}
        head, tail = rec.view.q[ring.W_HEAD], rec.view.q[ring.W_TAIL]
        for node in nodes:
            if (node, rec.name) in self.held or node in served:
                continue
            e = holders[node]
            if e.kind == OPEN:
                self.hold(rec, [node], "oldest", interest=True)
                continue
            self.hold(rec, [node], "next", interest=True)
            h = self.held.get((node, rec.name))
            if h is not None and e.stream == self.stream_id(rec) and head <= e.tail <= tail:
                # Its replica stands at our tail as we announced it: hold from there (a frame
                # boundary we still hold) and start its mirror there.  Moving the slot back
                # races with a publisher passing it, as any "oldest" subscriber does: the
                # mirror reads the head again, so the worst case is a counted gap.
                rec.view.q[rec.view.slot_word(h.slot)] = e.tail
                h.at = (e.tail, e.seq)

    def hold_member(self, group: str, mrec) -> None:
        """A publisher joined the publisher group ``group`` here: hold its new member ring from
        its first message for every peer with a subscriber of ``group``.  Their daemons make the
        member's replica once our directory announces it (a housekeeping tick later); until
        their mirror asks, the held slot keeps a reliable publisher from overwriting what they
        have not received (bounded by peer_hold, as for a reconnect).  Lossy publishers never
        wait: a late mirror counts the gap."""
        if self.svc.enabled:
            self.hold_for_interest(mrec, group)

    # -- shutdown ----------------------------------------------------------------------------------
    def drain(self) -> None:
        """Before the rings go: mark mirrored channels retired (their publishers stop and
        reopen), then let every mirror send what its ring still holds and, for reliable
        channels, hear the replica's credit for it, for at most ``peer_drain_timeout``.  A
        graceful restart of a publishing node so loses nothing its publishers' ``publish``
        returned for, and the replicas' positions are where the restarted daemon continues."""
        live = [e for e in self.entries.values() if not e.source.stopped]
        if not live:
            return
        for e in live:
            rec = self.registry.channels.get(e.name)
            if rec is not None:
                rec.view.q[ring.W_RETIRED] = 1
        time.sleep(0.02)   # a publish that passed its retired check just before commits now
        deadline = time.monotonic() + self.s.peer_drain_timeout
        while time.monotonic() < deadline:
            # (TCP mirrors wait for the replica's credit for their last batch; RDMA mirrors are
            # drained once it is posted.)
            pending = [e for e in live if not e.source.stopped and (
                e.source.pos != e.source.v.q[ring.W_TAIL] or
                (e.source.t.kind == "tcp" and e.source.t.replica_tail < e.source.pos))]
            if not pending:
                return
            time.sleep(0.005)
        log.warning("shutdown: %d mirrors not drained within peer_drain_timeout=%.1fs",
                    len(pending), self.s.peer_drain_timeout)

    def stop_all(self) -> None:
        for src in self.entries.values():
            src.source.stop()

    def join(self) -> None:
        for src in self.entries.values():
            src.source.thread.join(1.0)
        self.entries.clear()
