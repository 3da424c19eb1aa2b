"""The replica side of the peer module: this node's rings that mirror a peer's channel.

* open and convert (``prepare_open``, ``replicate``, ``reconcile``): a channel published on a
  peer is created here as its replica (``MirrorReplica`` is its one publisher); a local channel
  that waited for a publisher which then appeared on a peer becomes one; anything that does not
  fit is a conflict;
* mirror requests (``request_mirrors``): each replica with subscribers asks the publishing
  node for a mirror, resuming at its committed tail, and is detached when its link goes or its
  last subscriber leaves;
* credits: each replica's consumed position goes back to its source (``Link.send_credit``,
  received by the source's ``Transport.credited``), from the commit path when one is due
  (``make``'s ``on_commit``), else from a thread (``credit_loop``).

Runs on the daemon's main thread, except the credits, which only read: the commit path runs in
the transport's receiving thread, the rest in the credit thread.  It never serves a
mirror (``sources.py``) and never reads a link's socket (the link's reader feeds the
``MirrorReplica`` registered in ``Link.sinks``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from shimmy import ring
from shimmy.errors import ChannelConflict, LimitExceeded

from .directory import OPEN, shape_conflict
from .mirror import MirrorReplica
from .tcp import Link
from .transport import TransportClosed

log = logging.getLogger("shimmy.peer")

REPLICA_PUBLISHER = -1          # registry publisher id meaning "the daemon (peer module)"
CREDIT_STEP = 4                 # replicas credit their source in steps of capacity / 4


@dataclass
class ReplicaEntry:
    name: str
    node: str                   # publishing node
    sink: MirrorReplica
    state: str = "idle"         # idle | requested | streaming | failed
    link: Link | None = None
    mid: int = 0
    last_subscriber: float = field(default_factory=time.monotonic)
    retry_at: float = 0.0
    reconnects: int = 0
    streams: int = 0
    last_credit: int = -1
    converted: bool = False     # was a local channel waiting for a publisher (resume from 0)
    stream: int = 0             # the source stream this replica follows (0: none yet)


class ReplicaSide:
    """The replicas this node holds (``svc``: its ``PeerService``)."""

    def __init__(self, svc):
        self.svc = svc
        self.s = svc.s
        self.counters = svc.counters
        self.registry = svc.d.registry
        self.entries: dict[str, ReplicaEntry] = {}
        self.conflicts: dict[str, str] = {}     # channel name -> what conflicts (ls, logs)
        self._credit_wake = threading.Event()   # set by replica commits
        self._next_mid = 1

    def get(self, name: str) -> ReplicaEntry | None:
        return self.entries.get(name)

    # -- open and convert --------------------------------------------------------------------------
    def prepare_open(self, name: str, mode: str | None, capacity: int | None) -> None:
        """Before ``op_open`` of a channel this node lacks: make it a replica if a peer
        publishes it (same mode and capacity as the source); or, if peers hold replicas of it
        fed by this node (our daemon restarted), continue their stream."""
        if not self.svc.enabled or name in self.registry.channels:
            return
        link, info = self.svc.find_publisher(name)
        if link is None or info is None:
            self.svc.source_side.continue_stream(name, mode, capacity)
            if name not in self.registry.channels:
                self.adopt_shape(name, mode, capacity)
            return
        want_mode = None if mode is None else ring.MODES.get(mode)
        conflict = shape_conflict(name, link.remote, info, want_mode, capacity)
        if conflict:
            raise ChannelConflict(conflict)
        if len(self.entries) >= self.s.peer_max_replicas:
            raise LimitExceeded(f"cannot mirror {name!r}: peer_max_replicas "
                                f"({self.s.peer_max_replicas}) replicas exist")
        if info.capacity > self.s.max_capacity:
            raise LimitExceeded(f"cannot mirror {name!r}: its capacity {info.capacity} exceeds "
                                f"this node's max_capacity {self.s.max_capacity}")
        rec = self.registry.create(name, ring.MODE_NAMES[info.mode], info.capacity)
        self.make(name, link.remote, rec, converted=False, stream=info.stream)
        # Position the replica at the source's tail as last announced, before any subscriber
        # can attach: "next" subscribers then start there with the exact sequence number, and
        # the mirror resumes from it (or reports the gap if the source no longer holds it).
        self.entries[name].sink.jump(info.tail, info.seq)
        log.info("channel %s is published on %s: created replica", name, link.remote)

    def replicate(self, name: str, node: str) -> None:
        """Make the replica of ``name`` (published on ``node``), fed from the start of the
        source's stream: the ring of another node's publisher of one of our publisher groups
        (registry.join_remote; spec/ring.md, "Publisher groups")."""
        link, info = self.svc.find_publisher(name)
        if link is None or info is None or link.remote != node:
            return
        if len(self.entries) >= self.s.peer_max_replicas:
            raise LimitExceeded(f"cannot mirror {name!r}: peer_max_replicas "
                                f"({self.s.peer_max_replicas}) replicas exist")
        rec = self.registry.create(name, ring.MODE_NAMES[info.mode], info.capacity)
        self.make(name, node, rec, converted=False, stream=info.stream)
        self.entries[name].sink.fed = True   # resume at our tail, 0: the source's first message

    def adopt_shape(self, name: str, mode: str | None, capacity: int | None) -> None:
        """Peers hold ``name`` open but nobody publishes it yet: where the opener left mode or
        capacity to the channel, take them from the peers' announcements, so this channel can
        become the replica when a publisher there starts (a default-capacity channel would be a
        conflict with a publisher that opened it with another capacity).  When peers announce
        several shapes, the ones other than this node's defaults were asked for explicitly; if
        that still leaves more than one, nothing is adopted (the conflict is then reported)."""
        want = None if mode is None else ring.MODES.get(mode)
        default = (ring.MODE_RELIABLE, self.s.default_capacity)
        shapes = {(e.mode, e.capacity) for _, e in self.svc.directory.names().get(name, [])
                  if e.kind == OPEN and want in (None, e.mode) and capacity in (None, e.capacity)}
        if len(shapes) > 1:
            shapes.discard(default)
        if len(shapes) != 1:
            return
        ((m, cap),) = shapes
        if (want, capacity) == (m, cap) or (m, cap) == default or cap > self.s.max_capacity:
            return   # nothing to adopt (or too large here: the registry names the limit)
        self.registry.create(name, ring.MODE_NAMES[m], cap)
        log.info("channel %s: opened on peers as mode=%s capacity=%d before anyone publishes "
                 "it; created with that shape", name, ring.MODE_NAMES[m], cap)

    def make(self, name: str, node: str, rec, converted: bool, stream: int) -> None:
        rec.publisher = REPLICA_PUBLISHER
        sink = MirrorReplica(rec.view, self.registry.sem_prefix_of(rec))
        sink.set_link(ring.LINK_DOWN)
        entry = self.entries[name] = ReplicaEntry(name, node, sink, converted=converted,
                                                   stream=stream)
        step = rec.capacity // CREDIT_STEP
        half = rec.capacity // 2
        wake = self._credit_wake.set

        check_at = 0   # the replica tail from which the next commit looks at the credit

        def on_commit() -> None:
            """The transport's receiving thread, after each replica commit: send the credit
            when one is due (credit_loop's rule), here, without waking another thread; leave
            it to the credit thread when the link is busy, or when none is due yet but the
            source may be waiting for one (it is polled for while that holds).  A look that
            finds none due skips the commits of the next sixteenth of a ring: with a slow
            subscriber every commit would look (a pass over the subscriber slots) in vain."""
            nonlocal check_at
            tail = sink.source_tail
            # (check_at is at most step // 4 ahead unless our positions moved back: a rebase)
            if tail - entry.last_credit < step or 0 < check_at - tail <= step // 4:
                return
            link = entry.link
            if link is None or entry.state != "streaming":
                return
            c = sink.consumed()
            if c - entry.last_credit >= step:
                if link.try_send_credit(entry.mid, c, tail):
                    entry.last_credit = c
                else:
                    wake()
                return
            check_at = tail + step // 4
            if tail - entry.last_credit > half:
                wake()
        sink.on_commit = on_commit
        if converted:
            # Subscribers here were waiting before the publisher existed: they get the source's
            # stream from its start (or from its oldest message still held, the gap counted).
            sink.fed = True
            self.counters["replicas_converted"] += 1
        sink.wakeups.post_all()

    def reconcile(self) -> None:
        """Local channels that wait for a publisher which now exists on a peer become replicas
        (same mode and capacity); anything else that does not fit is a conflict, reported in
        the logs, in ``ls`` and (for waiting subscribers) in ``Subscription.status``."""
        found: dict[str, str] = {}
        for name, rec in self.registry.channels.items():
            pubs = self.svc.directory.publishers(name)
            if not pubs or name in self.entries:
                continue
            if getattr(rec, "group", False):
                # A multi-publisher channel (its members mirror one by one) is never turned
                # into a replica of a single-publisher channel elsewhere.
                found[name] = (f"channel {name!r} is a multi-publisher channel on this node "
                               f"and a single-publisher channel published on node "
                               f"{pubs[0][0]!r}: their messages do not meet")
                continue
            local_pub = rec.publisher is not None or rec.view.q[ring.W_TAIL] != 0
            if local_pub:
                found[name] = (f"channel {name!r} has publishers on this node and on node "
                               f"{pubs[0][0]!r} (one publisher per channel): their messages do "
                               f"not meet")
                continue
            node, e = pubs[0]
            conflict = shape_conflict(name, node, e, rec.mode, rec.capacity)
            if conflict:
                found[name] = conflict + ": this node's subscribers receive nothing from it"
                rec.view.u32[ring.I_LINK] = ring.LINK_CONFLICT
                continue
            if len(self.entries) >= self.s.peer_max_replicas:
                found[name] = (f"channel {name!r} is published on node {node!r} but "
                               f"peer_max_replicas ({self.s.peer_max_replicas}) replicas exist")
                continue
            self.make(name, node, rec, converted=True, stream=e.stream)
            log.info("channel %s: publisher appeared on node %s; the local channel is now its "
                     "replica", name, node)
        for name, text in found.items():
            if self.conflicts.get(name) != text:
                self.counters["conflicts"] += 1
                log.warning("peer conflict: %s", text)
        for name in self.conflicts.keys() - found.keys():
            rec = self.registry.channels.get(name)
            if rec is not None and rec.view.u32[ring.I_LINK] == ring.LINK_CONFLICT:
                rec.view.u32[ring.I_LINK] = ring.LINK_LOCAL
        self.conflicts = found

    # -- mirrors -----------------------------------------------------------------------------------
    def request_mirrors(self) -> None:
        now = time.monotonic()
        for entry in self.entries.values():
            if entry.state not in ("idle", "failed") or entry.retry_at > now:
                continue
            rec = self.registry.channels.get(entry.name)
            if rec is None or not rec.slots:
                continue
            link, _ = self.svc.find_publisher(entry.name)
            if link is None:
                continue
            mid = self._next_mid
            self._next_mid += 1
            entry.link, entry.mid, entry.state = link, mid, "requested"
            entry.node = link.remote
            entry.last_credit = -1
            sink = entry.sink
            # (a put of an earlier mirror that was never committed is dropped by the sink
            # itself, in the link reader's order: MirrorReplica.put_target / jump)
            link.sinks[mid] = sink
            link.send_ctrl({"t": "mirror", "id": mid, "name": entry.name, "stream": entry.stream,
                            "resume": sink.source_tail if sink.fed else -1,
                            "seq": sink.source_seq if sink.fed else -1,
                            "consumed": sink.consumed() if sink.fed else -1,
                            "rdma": self.svc.rdma.offer(entry, rec)})
            self.counters["mirrors_requested"] += 1

    def mirror_ok(self, link: Link, obj: dict) -> None:
        mid = int(obj["id"])
        for entry in self.entries.values():
            if entry.link is link and entry.mid == mid and entry.state == "requested":
                entry.state = "streaming"
                entry.streams += 1
                if isinstance(obj.get("stream"), int):
                    entry.stream = obj["stream"]
                entry.sink.set_link(ring.LINK_UP)
                self._credit_wake.set()   # commits that landed before this may owe a credit
                log.info("replica %s streaming from %s (start=%s)", entry.name, link.remote,
                         obj.get("start"))

    def mirror_err(self, link: Link, obj: dict) -> None:
        mid = int(obj["id"])
        for entry in self.entries.values():
            if entry.link is link and entry.mid == mid:
                log.warning("replica %s: %s refused the mirror: %s", entry.name, link.remote,
                            obj.get("message"))
                self.detach(entry, reconnect=True)
                entry.retry_at = time.monotonic() + self.s.peer_backoff_max

    def detach(self, entry: ReplicaEntry, reconnect: bool) -> None:
        self.svc.rdma.release(entry.name)
        if entry.link is not None:
            entry.link.sinks.pop(entry.mid, None)
        if entry.state == "streaming" and reconnect:
            entry.reconnects += 1
        entry.link = None
        entry.state = "idle"
        entry.sink.set_link(ring.LINK_DOWN, bump=reconnect)
        entry.sink.wakeups.post_all()   # subscribers re-read the link state

    def restart(self, entry: ReplicaEntry) -> None:
        """Detach ``entry``'s mirror (its transport failed) and ask for a new one at once."""
        self.detach(entry, reconnect=True)
        self.request_mirrors()

    def link_down(self, link: Link) -> None:
        for entry in self.entries.values():
            if entry.link is link:
                self.detach(entry, reconnect=True)

    def on_subscribe(self, name: str) -> None:
        entry = self.entries.get(name)
        if entry is not None:
            entry.last_subscriber = time.monotonic()
            if entry.state in ("idle", "failed"):
                self.request_mirrors()

    def forget(self, entry: ReplicaEntry) -> None:
        self.svc.rdma.release(entry.name)
        if entry.link is not None:
            entry.link.sinks.pop(entry.mid, None)
            entry.link.send_ctrl({"t": "unmirror", "id": entry.mid})
        entry.sink.close()
        self.entries.pop(entry.name, None)

    def forget_node(self, node: str) -> None:
        """``node`` left the cluster: its replicas here become plain local channels
        (subscribers keep them; a new publisher anywhere takes the channel over)."""
        for name, entry in list(self.entries.items()):
            if entry.node == node and entry.link is None:
                rec = self.registry.channels.get(name)
                del self.entries[name]
                if rec is not None:
                    rec.publisher = None
                    rec.view.u32[ring.I_LINK] = ring.LINK_LOCAL
                entry.sink.wakeups.post_all()   # subscribers re-read the link state
                entry.sink.close()

    def maintain(self, now: float) -> None:
        """Periodic (``tick``): forget deleted replicas, retire those whose source restarted
        below them, stop the mirrors of replicas whose last subscriber left, ask for the rest."""
        for name, entry in list(self.entries.items()):
            rec = self.registry.channels.get(name)
            if rec is None:  # deleted (idle ttl, rm): forget it
                self.forget(entry)
                continue
            if entry.sink.reset_needed:
                self.counters["replica_resets"] += 1
                log.warning("replica %s: source %s restarted its stream below ours; retiring "
                            "the replica (subscribers reopen)", name, entry.node)
                self.forget(entry)
                self.registry.delete(name)
                continue
            if rec.slots:
                entry.last_subscriber = now
            elif entry.state in ("requested", "streaming") and \
                    now - entry.last_subscriber >= self.s.peer_unmirror_grace:
                log.info("replica %s: last subscriber left; stopping the mirror", name)
                if entry.link is not None:
                    entry.link.send_ctrl({"t": "unmirror", "id": entry.mid})
                self.detach(entry, reconnect=False)
        self.request_mirrors()

    # -- credits (a thread) ------------------------------------------------------------------------
    def credit_loop(self) -> None:
        """Report each replica's consumed position to its source, in steps of a quarter of the
        ring (``CREDIT_STEP``): a credit for every message would cost a packet and a wake-up
        of the source's link reader per message (two per round trip).  A source then holds at
        most a quarter ring of bytes the replica has consumed, which leaves room for the
        largest message (half the ring), so a reliable publisher never waits on a credit not
        sent.

        Most credits leave from the commit path (``make``'s ``on_commit``): each commit that
        finds one due sends it.  This thread sends what that path cannot: a credit due while
        the link was busy (it wakes us), and one that comes due after the last commit, as
        subscribers consume what it brought.  Only the second needs polling, and only while
        the source may be waiting for room: a reliable publisher waits only when a message
        (at most half the ring, a wrap PAD committed on its own) would end more than a ring
        past the credit, so while the replica's tail is at most half a ring past the last
        credit it is not waiting, or a commit is still to come and will carry the credit.  So
        poll every ``peer_credit_interval`` while some replica's tail is more than half a ring
        past its last credit; otherwise sleep until a commit wakes us, or 0.25 s, after which
        the current position is repeated (so a credit the source could not apply never
        leaves a reliable publisher waiting)."""
        interval = self.s.peer_credit_interval
        refresh = False
        while not self.svc.stopping.is_set():
            self._credit_wake.clear()
            poll = False
            for entry in list(self.entries.values()):
                link = entry.link
                if entry.state != "streaming" or link is None or link.closed:
                    continue
                sink = entry.sink
                tail = sink.source_tail
                c = sink.consumed()
                if c - entry.last_credit >= sink.cap // CREDIT_STEP or refresh:
                    entry.last_credit = c
                    try:
                        link.send_credit(entry.mid, c, tail)
                    except TransportClosed:
                        pass
                if tail - entry.last_credit > sink.cap // 2:
                    poll = True
            if poll:
                self.svc.stopping.wait(interval)
                refresh = False
            else:
                refresh = not self._credit_wake.wait(0.25)

    def close(self) -> None:
        for entry in self.entries.values():
            entry.sink.close()
